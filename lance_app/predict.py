"""Predicted FLOPs of one training step at the chosen ASI ranks, against vanilla. No Streamlit calls.

Counted by the engine's own counters (2 FLOPs per multiply-add; forward, input gradient, weight
gradient and compression work of the fine-tuned layers) on a fresh copy of the backbone, for two
steps on one calibration batch; the second (warm-started) step is reported. The copy is built here
and thrown away: the app never touches a model that a job trains.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine import compress_model
from engine.data import get_dataset, num_classes
from engine.models import build_backbone


def step_flops(backbone: str, weights: str, dataset: str, ranks_by_layer: dict[str, tuple[int, ...]],
               batch_size: int, resolution: int | None = None, seed: int = 0) -> dict[str, int]:
    """{"vanilla": FLOPs, "asi": FLOPs} of one training step of the layers in ``ranks_by_layer``."""

    torch.manual_seed(seed)
    bb = build_backbone(backbone, weights=weights, num_classes=num_classes(dataset))
    data = get_dataset(dataset, split="train", resolution=int(resolution or bb.resolution), mean=bb.mean,
                       std=bb.std, seed=seed)
    x, y = next(iter(DataLoader(data, batch_size=batch_size, shuffle=False)))
    layers = list(ranks_by_layer)
    out = {}
    for method, options in (("vanilla", {}), ("asi", {"ranks": dict(ranks_by_layer)})):
        model = copy.deepcopy(bb.model)
        handle = compress_model(model, method, layers=layers, options=options, seed=seed)
        handle.train_mode()
        total = 0
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            total = sum(sum(int(v) for v in stats["flops"].values()) for stats in handle.stats().values())
        out[method] = total
    return out
