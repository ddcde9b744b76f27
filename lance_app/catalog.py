"""What this machine offers: backbones, weights and datasets, each available or missing with why.

No Streamlit here. A missing dataset or weights file becomes a readable :class:`Unavailable` message.

Places looked at (in this order):
- datasets: ``$LANCE_DATA_ROOT``, then ``<repo>/../shared/datasets`` (``$LANCE_SHARED`` overrides it);
- weights: ``$LANCE_WEIGHTS_DIR``, then ``<repo>/../shared/weights``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.data import available_datasets, locate
from engine.models import available_backbones, backbone_spec, bundled_weights, weights_available
from engine.models.weights import weights_dir
from engine.shared import apply_shared_defaults as engine_apply_shared_defaults
from engine.shared import shared_root as engine_shared_root

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BACKBONE = "small-cnn-digits"  # bundled weights, pretrained on digits 0-4 (engine.models.pretrain_default)
DEFAULT_DATASET = "digits-5to9"        # the five digits it never saw
DEFAULT_WEIGHTS = "bundled"
DEFAULT_CONTINUAL_BENCHMARK = "split-digits"


class Unavailable(RuntimeError):
    """A piece of the engine or a file the page needs is not here; the message says what to do."""


def shared_root() -> Path:
    """``$LANCE_SHARED`` or ``<repo>/../shared`` (developer and CI machines only)."""
    return engine_shared_root()


def apply_shared_defaults(environ=os.environ) -> dict:
    """Point LANCE_DATA_ROOT / LANCE_WEIGHTS_DIR at ``../shared`` when it is there and they are unset
    (``engine.shared.apply_shared_defaults``: the CLI does the same). Returns what was set."""
    return engine_apply_shared_defaults(environ)


@dataclass(frozen=True)
class Option:
    """One choice on the Setup page. ``value`` is what the CLI / engine receives."""

    label: str
    value: str
    available: bool
    detail: str  # where it was found, or where we looked and how to get it


def dataset_options() -> list[Option]:
    """Every dataset engine.data knows, the embedded default first; each found here or not (with why)."""
    names = list(available_datasets())
    if DEFAULT_DATASET in names:
        names.remove(DEFAULT_DATASET)
        names.insert(0, DEFAULT_DATASET)
    opts = []
    for name in names:
        try:
            folder = locate(name)
            detail = "bundled with scikit-learn; always available offline" if folder is None else f"found at {folder}"
            opts.append(Option(name, name, True, detail))
        except Exception as exc:  # DatasetMissing: which, where it looked, how to get it
            opts.append(Option(name, name, False, str(exc)))
    return opts


def backbone_names() -> list[str]:
    """engine.models.available_backbones(), the default first. Raises Unavailable."""
    names = list(available_backbones())
    if DEFAULT_BACKBONE in names:
        names.remove(DEFAULT_BACKBONE)
        names.insert(0, DEFAULT_BACKBONE)
    return names


def backbone_summary(backbone: str) -> str:
    """One line from the backbone's registry entry: what it is, its size, resolution and weights source."""
    entry = backbone_spec(backbone)
    parts = [entry.description, f"{entry.num_params / 1e6:.2f} M parameters", f"native {entry.resolution} px"]
    if entry.macs:
        parts.append(f"{entry.macs / 1e6:.1f} M MACs")
    if entry.weights is not None:
        parts.append(f"{entry.weights.dataset} weights: {entry.weights.url}")
    return " · ".join(parts)


def weights_options(backbone: str) -> list[Option]:
    """Random init always; ImageNet weights for pretrained backbones, marked found here or not."""
    opts = [Option("random init (none)", "none", True, "no download needed")]
    bundled = bundled_weights(backbone)
    if bundled is not None:
        opts.insert(0, Option("pretrained on digits 0-4 (bundled)", "bundled", bundled.is_file(),
                              f"installed with the package at {bundled}" if bundled.is_file() else
                              f"missing at {bundled}: run `python -m engine.models.pretrain_default`"))
    spec = backbone_spec(backbone)
    if not spec.pretrained:
        return opts
    path = weights_available(backbone)
    if path is not None:
        opts.append(Option("ImageNet", "imagenet", True, f"found at {path}"))
    else:
        wdir = weights_dir()
        opts.append(Option("ImageNet", "imagenet", False,
                           f"not found under {wdir} (LANCE_WEIGHTS_DIR) or the torch cache; put the file "
                           f"in {wdir}/{backbone}/, or go online so that `lance finetune --weights imagenet` "
                           "downloads it"))
    return opts


def continual_benchmarks() -> list[Option]:
    """Benchmarks, with split-cifar10 built from cifar10-jpeg where the real CIFAR-10 is not here."""
    opts = [Option("split-digits (5 tasks × 2 classes, embedded)", "split-digits", True,
                   "built from scikit-learn's digits; always available")]
    found = {o.value: o for o in dataset_options() if o.available}
    if "cifar10" in found:
        opts.append(Option("split-cifar10 (5 × 2)", "split-cifar10", True, found["cifar10"].detail))
    elif "cifar10-jpeg" in found:
        opts.append(Option("split-cifar10 from cifar10-jpeg (5 × 2)", "split-cifar10|cifar10-jpeg", True,
                           found["cifar10-jpeg"].detail))
    else:
        opts.append(Option("split-cifar10 (5 × 2)", "split-cifar10", False,
                           "needs CIFAR-10 or cifar10-jpeg under LANCE_DATA_ROOT (see the Setup page)"))
    if "cifar100" in found:
        opts.append(Option("split-cifar100 (10 × 10)", "split-cifar100", True, found["cifar100"].detail))
    return opts
