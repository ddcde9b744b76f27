"""Backbones: MCUNet (from the upstream JSON config), torchvision models, a DeiT-Tiny-shaped ViT,
the continual-learning networks of GPM/LANCE and a tiny CNN.

``build_backbone(name, weights=None|"imagenet"|"none"|PATH, num_classes=None, weights_dir=None)``
returns a :class:`Backbone` (model, resolution, mean, std, name). Every model has ``stages()``
(see :mod:`engine.models.stages`). Weight files: :mod:`engine.models.weights`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .stages import Stage, StageSequence, first_trainable_stage, split_at_stage, stage_of_layer
from .weights import WeightsMissing, load_state_dict_file
from .weights import weights_dir as resolve_weights_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # GPM's normalisation
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class Backbone:
    """A built backbone: ``model`` expects (B, 3, resolution, resolution) inputs normalised by mean/std."""

    model: nn.Module
    resolution: int
    mean: tuple
    std: tuple
    name: str
    weights: str = "none"  # where the weights came from: "none", "imagenet:<file>", or a path
    num_classes: int | None = None


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str          # mcunet | torchvision | vit | small | continual
    resolution: int
    mean: tuple
    std: tuple
    pretrained: bool     # has ImageNet weights
    description: str
    linear_input: str = "2-D"  # what its nn.Linear layers see: 2-D (B,F), 3-D (B,L,F), 4-D (B,H,W,F)
    default_classes: int = 1000
    extra: dict = field(default_factory=dict)


def _specs() -> dict[str, BackboneSpec]:
    from .mcunet import MCUNET_RELEASES

    specs = {}
    mcunet_res = {"mcunet-in0": 48, "mcunet-in1": 96, "mcunet-in2": 160, "mcunet-in3": 176, "mcunet-in4": 160}
    for name, release in MCUNET_RELEASES.items():
        specs[name] = BackboneSpec(name, "mcunet", mcunet_res[name], IMAGENET_MEAN, IMAGENET_STD, True,
                                   f"MCUNet {release} (ImageNet), built from the upstream JSON config",
                                   extra={"release": release})
    for name, desc in [("mobilenet_v2", "torchvision MobileNetV2"), ("resnet18", "torchvision ResNet-18"),
                       ("resnet34", "torchvision ResNet-34"), ("swin_t", "torchvision Swin-T (4-D linear inputs)")]:
        specs[name] = BackboneSpec(name, "torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, True, desc,
                                   linear_input="4-D" if name == "swin_t" else "2-D")
    specs["vit-tiny"] = BackboneSpec("vit-tiny", "vit", 224, IMAGENET_MEAN, IMAGENET_STD, True,
                                     "ViT with the DeiT-Tiny shape (patch 16, dim 192, depth 12, heads 3)",
                                     linear_input="3-D")
    specs["small-cnn"] = BackboneSpec("small-cnn", "small", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False,
                                      "tiny CNN (3 conv+BN+ReLU, linear head), random init, 32 px", default_classes=10)
    specs["alexnet-cl"] = BackboneSpec("alexnet-cl", "continual", 32, CIFAR_MEAN, CIFAR_STD, False,
                                       "GPM's 5-layer AlexNet (conv 64-128-256, fc 2048-2048), one head per task",
                                       default_classes=10)
    specs["resnet18-reduced"] = BackboneSpec("resnet18-reduced", "continual", 32, CIFAR_MEAN, CIFAR_STD, False,
                                             "GPM's reduced ResNet-18 (nf = 20), one head per task", default_classes=10)
    return specs


SPECS = _specs()


def available_backbones() -> list[str]:
    """Every backbone name ``build_backbone`` knows (whether or not its weights are present here)."""
    return list(SPECS)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(SPECS)}")
    return SPECS[name]


def default_weights(name: str) -> str:
    """``"imagenet"`` for backbones with pretrained weights, else ``"none"``."""
    return "imagenet" if backbone_spec(name).pretrained else "none"


def _head_path(model: nn.Module) -> str:
    return getattr(model, "head_path", None) or "classifier.linear"


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the classifier for a fresh ``nn.Linear(in, num_classes)`` (same bias setting)."""
    path = _head_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def head_features(model: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the classifier head."""
    head = model.get_submodule(_head_path(model))
    return head.in_features, head.out_features


def _load_strict(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load every key (head resized first when the file's head has another number of classes)."""
    head_key = _head_path(model) + ".weight"
    if head_key in state_dict and state_dict[head_key].shape[0] != head_features(model)[1]:
        replace_head(model, state_dict[head_key].shape[0])
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"weights {source} do not match this backbone: missing {result.missing_keys[:8]}"
                         f"{'…' if len(result.missing_keys) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
                         f"{'…' if len(result.unexpected_keys) > 8 else ''}")


# ---------------------------------------------------------------- per family: model + ImageNet file
def mcunet_config(name: str, folder: Path, allow_download: bool = True) -> dict:
    """The upstream JSON config of an MCUNet variant: local file, built-in table, or download."""
    from . import weights as W
    from .mcunet import MCUNET_RELEASES, MCUNET_URL_BASE
    from .mcunet_configs import BUILTIN_CONFIGS

    release = MCUNET_RELEASES[name]
    names = [f"{name}_imagenet.json", f"{release}.json"]
    local = W.find_local(name, names, folder)
    if local:
        return json.loads(local.read_text())
    if name in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[name]()
    url = MCUNET_URL_BASE + release + ".json"
    if allow_download:
        try:
            return json.loads(W.download(url, folder / name / f"{release}.json").read_text())
        except OSError as error:
            raise WeightsMissing(W.missing_message(name, names, [folder], url, str(error))) from None
    raise WeightsMissing(W.missing_message(name, names, [folder], url))


def weight_files(name: str) -> tuple[list[str], str]:
    """(accepted file names of ``name``'s ImageNet weights, upstream download URL)."""
    spec = backbone_spec(name)
    if not spec.pretrained:
        raise ValueError(f"backbone {name!r} has no pretrained weights (it is trained from scratch); "
                         f"use weights='none' (--weights none)")
    if spec.family == "mcunet":
        from .mcunet import MCUNET_URL_BASE

        release = spec.extra["release"]
        return [f"{name}_imagenet.pth", f"{release}.pth"], MCUNET_URL_BASE + release + ".pth"
    if spec.family == "vit":
        from .vit import DEIT_TINY_URL

        return [os.path.basename(DEIT_TINY_URL), f"{name}.pth"], DEIT_TINY_URL
    from .torchvision_models import weights_enum

    url = weights_enum(name).url
    return [os.path.basename(url), f"{name}.pth"], url


def imagenet_file(name: str, folder: Path, download: bool = True) -> Path:
    """Path of the ImageNet state_dict file for ``name`` (local, torch hub cache, or downloaded)."""
    from . import weights as W

    names, url = weight_files(name)
    looked_in = [folder]
    if backbone_spec(name).family == "torchvision":
        import torch

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        looked_in.append(hub)
        if (hub / names[0]).is_file():
            return hub / names[0]
    local = W.find_local(name, names, folder)
    if local:
        return local
    if not download:
        raise WeightsMissing(W.missing_message(name, names, looked_in, url, "download disabled"))
    try:
        return W.download(url, folder / name / names[0])
    except OSError as error:
        reason = f"{type(error).__name__}: {error}"
        raise WeightsMissing(W.missing_message(name, names, looked_in, url, reason)) from None


def weights_available(name: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The local ImageNet weights file for ``name`` if present here (no download), else None."""
    try:
        return imagenet_file(name, resolve_weights_dir(weights_dir), download=False)
    except (WeightsMissing, ValueError):
        return None


def _build_architecture(spec: BackboneSpec, folder: Path, need_file: bool) -> nn.Module:
    if spec.family == "mcunet":
        from .mcunet import ProxylessNASNet

        return ProxylessNASNet(mcunet_config(spec.name, folder, allow_download=True))
    if spec.family == "torchvision":
        from .torchvision_models import BUILDERS

        return BUILDERS[spec.name]()
    if spec.family == "vit":
        from .vit import VisionTransformer

        return VisionTransformer(num_classes=1000)
    if spec.family == "small":
        from .small_cnn import SmallCNN

        return SmallCNN(num_classes=spec.default_classes)
    if spec.family == "continual":
        from .cl_nets import build_multihead

        return build_multihead(spec.name, [spec.default_classes], spec.resolution)
    raise AssertionError(spec.family)


def build_backbone(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                   weights_dir: str | os.PathLike | None = None) -> Backbone:
    """Build ``name`` with weights ``"imagenet"``, ``"none"`` (random init) or a state_dict PATH.

    weights=None means the backbone's default (``imagenet`` where it has pretrained weights, else
    ``none``). The head is replaced by a fresh ``Linear(in, num_classes)`` when ``num_classes`` differs
    from the loaded head. Raises :class:`WeightsMissing` (what, where it looked, how to fix) when
    ImageNet weights are neither local nor downloadable.
    """
    spec = backbone_spec(name)
    folder = resolve_weights_dir(weights_dir)
    weights = default_weights(name) if weights is None else weights
    weights_str = str(weights)
    model = _build_architecture(spec, folder, need_file=weights_str != "none")
    source = "none"
    if weights_str == "imagenet":
        path = imagenet_file(name, folder)
        _load_strict(model, load_state_dict_file(path), str(path))
        source = f"imagenet:{path}"
    elif weights_str != "none":
        _load_strict(model, load_state_dict_file(weights_str), weights_str)
        source = str(Path(weights_str).expanduser().resolve())
    if num_classes is not None and head_features(model)[1] != num_classes:
        replace_head(model, int(num_classes))
    resolution = int(getattr(model, "resolution", spec.resolution))
    return Backbone(model=model, resolution=resolution, mean=tuple(spec.mean), std=tuple(spec.std),
                    name=name, weights=source, num_classes=head_features(model)[1])


def build_multihead(name: str, task_classes: list[int], resolution: int = 32, seed: int | None = None):
    """Multi-head CL network (``alexnet-cl`` | ``resnet18-reduced``): ``forward(x, task)``, ``features``."""
    from .cl_nets import build_multihead as _build

    return _build(name, task_classes, resolution, seed)


__all__ = [
    "Backbone", "BackboneSpec", "SPECS", "Stage", "StageSequence", "WeightsMissing", "available_backbones",
    "backbone_spec", "build_backbone", "build_multihead", "default_weights", "first_trainable_stage",
    "head_features", "imagenet_file", "weight_files", "mcunet_config", "replace_head", "split_at_stage",
    "stage_of_layer", "weights_available",
]
