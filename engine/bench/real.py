"""Real layers for `lance bench layers --real`: MCUNet-in3 (ImageNet weights) on real CIFAR-10 images.

The last four compressible layers of MCUNet-in3 at its 176 px resolution, with a fresh 10-class head;
inputs are what those layers receive from real images, output gradients are the real cross-entropy
gradients through the network (eval mode, frozen prefix). A second, disjoint batch of images is the
LANCE calibration batch. Needs ``../shared`` (or ``$LANCE_SHARED``) holding ``weights/mcunet-in3`` and
``datasets/cifar10-jpeg``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.data import get_dataset
from engine.models import build_backbone
from engine.surgery import resolve_layers

BACKBONE = "mcunet-in3"
DATASET = "cifar10-jpeg"


def shared_root() -> Path:
    """``$LANCE_SHARED``, else ``../shared`` beside the repository."""
    env = os.environ.get("LANCE_SHARED")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2].parent / "shared"


def missing_reason(root: Path | None = None) -> str | None:
    """Why the real bench cannot run here (None when it can)."""
    root = root or shared_root()
    weights = root / "weights" / BACKBONE / "mcunet-in3_imagenet.pth"
    images = root / "datasets" / DATASET / "train"
    if not weights.is_file():
        return f"MCUNet-in3 ImageNet weights not found at {weights}"
    if not images.is_dir():
        return f"real CIFAR-10 JPEGs not found at {images}"
    return None


@dataclass(frozen=True)
class RealLayer:
    name: str
    module: nn.Module

    @property
    def label(self) -> str:
        return f"{BACKBONE}(real):{self.name}"

    @property
    def backbone(self) -> str:
        return BACKBONE

    def build(self) -> nn.Module:
        return self.module


class RealLayers:
    """Captured inputs / output gradients of the last four layers for up to ``max_batch`` images."""

    def __init__(self, max_batch: int, device: str | torch.device = "cpu", root: Path | None = None, seed: int = 0):
        root = root or shared_root()
        reason = missing_reason(root)
        if reason:
            raise FileNotFoundError(reason + " (pass without --real, or point LANCE_SHARED at the shared folder)")
        self.device = torch.device(device)
        backbone = build_backbone(BACKBONE, weights="imagenet", num_classes=10, weights_dir=root / "weights")
        per_class = -(-2 * max_batch // 10) * 2  # the train split keeps ~90%: enough for two disjoint batches
        data = get_dataset(DATASET, "train", resolution=backbone.resolution, mean=backbone.mean, std=backbone.std,
                           max_per_class=per_class, data_root=root / "datasets", seed=seed)
        n = min(len(data), 2 * max_batch)
        images = torch.stack([data[i][0] for i in range(n)])
        labels = torch.tensor([int(data[i][1]) for i in range(n)])
        model = backbone.model.to(self.device).eval()
        names = resolve_layers(model, last_k=4)
        self.layers = [RealLayer(name, model.get_submodule(name)) for name in names]
        self._captured = self._capture(model, names, images.to(self.device), labels.to(self.device), max_batch)

    @staticmethod
    def _capture(model: nn.Module, names: list[str], images, labels, max_batch: int) -> dict:
        for p in model.parameters():
            p.requires_grad_(False)
        inputs: dict[str, list] = {n: [] for n in names}
        grads: dict[str, list] = {n: [] for n in names}
        hooks = []
        for name in names:
            module = model.get_submodule(name)
            module.weight.requires_grad_(True)

            def hook(mod, args, out, name=name):
                inputs[name].append(args[0].detach())
                out.register_hook(lambda g, name=name: grads[name].append(g.detach()))

            hooks.append(module.register_forward_hook(hook))
        try:
            for start in range(0, images.shape[0], max_batch):  # batch 0: timed; batch 1: LANCE calibration
                x, y = images[start : start + max_batch], labels[start : start + max_batch]
                F.cross_entropy(model(x), y, reduction="sum").div(max_batch).backward()
        finally:
            for h in hooks:
                h.remove()
        return {n: (inputs[n], grads[n]) for n in names}

    def inputs_for(self, layer: RealLayer, batch_size: int):
        """``(module, x (B, …), grad_output (B, …), calibration x)`` for the first ``batch_size`` images."""
        xs, gs = self._captured[layer.name]
        calibration = xs[1] if len(xs) > 1 else xs[0]
        module = layer.module
        return module, xs[0][:batch_size], gs[0][:batch_size], calibration[:batch_size]
