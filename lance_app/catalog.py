"""What this machine offers: backbones, weights and datasets, each available or missing with why.

No Streamlit here. Engine pieces are imported lazily; a missing piece becomes a readable
:class:`Unavailable` message instead of an ImportError on the page.

Places looked at (in this order):
- datasets: ``$LANCE_DATA_ROOT``, then ``<repo>/../shared/datasets`` (``$LANCE_SHARED`` overrides it);
- weights: ``$LANCE_WEIGHTS_DIR``, then ``<repo>/../shared/weights``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BACKBONE = "small-cnn"
DEFAULT_DATASET = "digits"
DEFAULT_WEIGHTS = "none"
DEFAULT_CONTINUAL_BENCHMARK = "split-digits"


class Unavailable(RuntimeError):
    """A piece of the engine or a file the page needs is not here; the message says what to do."""


def engine_attr(module: str, attr: str):
    """``module.attr`` from the engine, or raise :class:`Unavailable` with a readable message."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"`{module}` is not available in this installation ({exc}). "
                          f"Update the checkout and run `pip install -e .[dev]`.") from exc
    try:
        return getattr(mod, attr)
    except AttributeError as exc:
        raise Unavailable(f"`{module}.{attr}` is not available in this installation. "
                          f"Update the checkout and run `pip install -e .[dev]`.") from exc


def shared_root() -> Path:
    return Path(os.environ.get("LANCE_SHARED", REPO_ROOT.parent / "shared"))


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("LANCE_DATA_ROOT"):
        roots.append(Path(os.environ["LANCE_DATA_ROOT"]).expanduser())
    roots.append(shared_root() / "datasets")
    return roots


def weights_roots() -> list[Path]:
    roots = []
    if os.environ.get("LANCE_WEIGHTS_DIR"):
        roots.append(Path(os.environ["LANCE_WEIGHTS_DIR"]).expanduser())
    roots.append(shared_root() / "weights")
    return roots


@dataclass(frozen=True)
class Option:
    """One choice on the Setup page. ``value`` is what the CLI / engine receives."""

    label: str
    value: str
    available: bool
    detail: str  # where it was found, or where we looked and how to get it


# -- datasets --------------------------------------------------------------------------------------
def dataset_options() -> list[Option]:
    """The embedded default (digits) first, then datasets found under the data roots."""
    opts = []
    try:
        importlib.import_module("sklearn.datasets")
        opts.append(Option("digits (embedded, 1797 images, 10 classes)", "digits", True,
                           "scikit-learn's bundled handwritten digits; always available offline"))
    except ImportError:
        opts.append(Option("digits", "digits", False, "needs scikit-learn: `pip install scikit-learn`"))
    looked = [str(r) for r in data_roots()]
    found_jpeg = next((r / "cifar10-jpeg" for r in data_roots() if (r / "cifar10-jpeg" / "train").is_dir()), None)
    if found_jpeg is not None:
        opts.append(Option("cifar10-jpeg (image folder, 10 classes)", f"imagefolder:{found_jpeg}", True,
                           f"found at {found_jpeg}"))
    else:
        opts.append(Option("cifar10-jpeg (image folder)", "imagefolder:cifar10-jpeg", False,
                           f"looked for cifar10-jpeg/train/<class>/*.jpg in {', '.join(looked)}; set "
                           "LANCE_DATA_ROOT to a folder that holds it, or use imagefolder:PATH"))
    found_cifar = next((r for r in data_roots() if (r / "cifar-10-batches-py").is_dir()), None)
    if found_cifar is not None:
        opts.append(Option("cifar10 (python batches)", "cifar10", True, f"found at {found_cifar}"))
    else:
        opts.append(Option("cifar10 (python batches)", "cifar10", False,
                           f"looked for cifar-10-batches-py in {', '.join(looked)}; run "
                           "`lance finetune --dataset cifar10 ...` once online to download it, or set "
                           "LANCE_DATA_ROOT to a folder that holds it"))
    return opts


# -- backbones and weights -------------------------------------------------------------------------
def backbone_names() -> list[str]:
    """engine.models.available_backbones(), the default first. Raises Unavailable."""
    names = list(engine_attr("engine.models", "available_backbones")())
    if DEFAULT_BACKBONE in names:
        names.remove(DEFAULT_BACKBONE)
        names.insert(0, DEFAULT_BACKBONE)
    return names


def _mcunet_weights(name: str) -> Path | None:
    for root in weights_roots():
        for candidate in (root / name / f"{name}_imagenet.pth", root / f"{name}_imagenet.pth"):
            if candidate.is_file():
                return candidate
    return None


def weights_options(backbone: str) -> list[Option]:
    """Random init always; ImageNet weights where they are known to be here."""
    opts = [Option("random init (none)", "none", True, "no download needed")]
    if backbone == DEFAULT_BACKBONE or backbone.endswith("-cl") or backbone.endswith("-reduced"):
        return opts
    if backbone.startswith("mcunet"):
        path = _mcunet_weights(backbone)
        if path is not None:
            opts.append(Option("ImageNet (local)", "imagenet", True, f"found at {path}"))
        else:
            looked = ", ".join(str(r / backbone) for r in weights_roots())
            opts.append(Option("ImageNet", "imagenet", False,
                               f"looked for {backbone}_imagenet.pth in {looked}; set LANCE_WEIGHTS_DIR "
                               "to a folder with <name>/<name>_imagenet.pth (+ .json), or go online "
                               "so that it downloads"))
        return opts
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    cached = list((torch_home / "hub" / "checkpoints").glob("*.pth")) if torch_home.is_dir() else []
    opts.append(Option("ImageNet (torchvision)", "imagenet", True,
                       f"from the torch cache ({len(cached)} checkpoint(s) in {torch_home}) "
                       "or downloaded when online"))
    return opts


def backbone_available(backbone: str) -> bool:
    """MCUNet variants need their network JSON: listed but marked missing when absent."""
    if not backbone.startswith("mcunet"):
        return True
    return _mcunet_weights(backbone) is not None


def continual_benchmarks() -> list[Option]:
    opts = [Option("split-digits (5 tasks × 2 classes, embedded)", "split-digits", True,
                   "built from scikit-learn's digits; always available")]
    jpeg = next((o for o in dataset_options() if o.value.startswith("imagefolder:") and o.available), None)
    if jpeg is not None:
        opts.append(Option("split-cifar10 from cifar10-jpeg (5 × 2)", f"split-cifar10|{jpeg.value}", True,
                           jpeg.detail))
    else:
        opts.append(Option("split-cifar10 (5 × 2)", "split-cifar10", False,
                           "needs CIFAR-10: set LANCE_DATA_ROOT (see the Setup page)"))
    return opts
