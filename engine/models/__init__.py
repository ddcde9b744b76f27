"""Backbones: MCUNet (from the upstream JSON config), torchvision models, a DeiT-Tiny-shaped ViT,
the continual-learning networks of GPM/LANCE and a tiny CNN.

``build_backbone(name, weights=None|"imagenet"|"none"|PATH, num_classes=None, weights_dir=None)``
returns a :class:`Backbone` (model, resolution, mean, std, name). Every model has ``stages()``
(see :mod:`engine.models.stages`). Weight files: :mod:`engine.models.weights`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import cl_nets, mcunet, small_cnn, torchvision_models, vit  # noqa: F401 (each registers its entries)
from . import weights as W
from .cl_nets import build_multihead
from .mcunet import mcunet_config
from .registry import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    REGISTRY,
    BackboneEntry,
    Weights,
)
from .registry import get as backbone_spec
from .stages import Stage, StageSequence, first_trainable_stage, split_at_stage, stage_of_layer
from .weights import WeightsMissing, load_state_dict_file
from .weights import weights_dir as resolve_weights_dir

BackboneSpec = BackboneEntry  # the name the rest of the project has used

_FAMILY_ORDER = ("mcunet", "torchvision", "vit", "small", "continual")
# every registered backbone, family by family (a new family goes last)
SPECS: dict[str, BackboneEntry] = dict(sorted(
    REGISTRY.items(), key=lambda kv: _FAMILY_ORDER.index(kv[1].family) if kv[1].family in _FAMILY_ORDER
    else len(_FAMILY_ORDER)))


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


def available_backbones() -> list[str]:
    """Every backbone name ``build_backbone`` knows (whether or not its weights are present here)."""
    return list(SPECS)


def bundled_weights(name: str) -> Path | None:
    """The weights file installed with the package for ``name`` (``small-cnn-digits``), else None."""
    file = backbone_spec(name).meta.get("weights_file")
    return Path(__file__).resolve().parent / "pretrained" / file if file else None


def default_weights(name: str) -> str:
    """The bundled weights file where there is one, ``"imagenet"`` for backbones with ImageNet weights,
    else ``"none"``."""
    bundled = bundled_weights(name)
    if bundled is not None:
        return str(bundled)
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


# ---------------------------------------------------------------- weights of an entry
def weight_files(name: str) -> tuple[list[str], str]:
    """(accepted file names of ``name``'s ImageNet weights, upstream download URL)."""
    entry = backbone_spec(name)
    if entry.weights is None:
        raise ValueError(f"backbone {name!r} has no pretrained weights (it is trained from scratch); "
                         f"use weights='none' (--weights none)")
    return list(entry.weights.file_names), entry.weights.url


def imagenet_file(name: str, folder: Path, download: bool = True) -> Path:
    """Path of the ImageNet state_dict file for ``name`` (local, torch hub cache, or downloaded)."""
    names, url = weight_files(name)
    published = backbone_spec(name).weights
    looked_in = [folder]
    if published.torch_hub:
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
        return W.download(url, folder / name / names[0], sha256=published.sha256)
    except OSError as error:
        reason = f"{type(error).__name__}: {error}"
        raise WeightsMissing(W.missing_message(name, names, looked_in, url, reason)) from None


def weights_available(name: str, weights_dir: str | os.PathLike | None = None) -> Path | None:
    """The local ImageNet weights file for ``name`` if present here (no download), else None."""
    try:
        return imagenet_file(name, resolve_weights_dir(weights_dir), download=False)
    except (WeightsMissing, ValueError):
        return None


def build_backbone(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                   weights_dir: str | os.PathLike | None = None) -> Backbone:
    """Build ``name`` with weights ``"imagenet"``, ``"bundled"`` (the file installed with the package,
    ``small-cnn-digits``), ``"none"`` (random init) or a state_dict PATH.

    weights=None means the backbone's default (``imagenet`` where it has pretrained weights, else
    ``none``). The head is replaced by a fresh ``Linear(in, num_classes)`` when ``num_classes`` differs
    from the loaded head. Raises :class:`WeightsMissing` (what, where it looked, how to fix) when
    ImageNet weights are neither local nor downloadable.
    """
    spec = backbone_spec(name)
    folder = resolve_weights_dir(weights_dir)
    weights = default_weights(name) if weights is None else weights
    weights_str = str(weights)
    if weights_str == "bundled":
        if bundled_weights(name) is None:
            raise ValueError(f"backbone {name!r} has no bundled weights; use imagenet, none or a file")
        weights_str = str(bundled_weights(name))
    model = spec.builder(folder)
    source = "none"
    if weights_str == "imagenet":
        path = imagenet_file(name, folder)
        _load_strict(model, load_state_dict_file(path), str(path))
        source = f"imagenet:{path}"
    elif weights_str != "none":
        _load_strict(model, load_state_dict_file(weights_str), weights_str)
        source = str(Path(weights_str).expanduser().resolve())
    fresh_head = bool(spec.meta.get("fresh_head")) and source != "none"
    if num_classes is not None and (fresh_head or head_features(model)[1] != num_classes):
        replace_head(model, int(num_classes))  # a pretrained head is for the pretraining classes
    resolution = int(getattr(model, "resolution", spec.resolution))
    return Backbone(model=model, resolution=resolution, mean=tuple(spec.mean), std=tuple(spec.std),
                    name=name, weights=source, num_classes=head_features(model)[1])


__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "IMAGENET_MEAN", "IMAGENET_STD", "REGISTRY", "BackboneEntry", "Weights",
    "Backbone", "BackboneSpec", "SPECS", "Stage", "StageSequence", "WeightsMissing", "available_backbones",
    "backbone_spec", "build_backbone", "build_multihead", "bundled_weights", "default_weights", "first_trainable_stage",
    "head_features", "imagenet_file", "weight_files", "mcunet_config", "replace_head", "split_at_stage",
    "stage_of_layer", "weights_available",
]
