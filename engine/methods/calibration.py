"""One-shot calibration of per-mode subspaces from a data loader (LANCE, methods.md §2).

For every chosen layer, each non-batch mode's Gram ``A_(m) A_(m)ᵀ`` is accumulated over the
calibration batches and divided by the total number of samples: a true mean in which every sample
counts the same (the reference code over-weights its first batch). The batch mode has no fixed size;
its rank at ε is measured on each calibration batch and averaged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from engine import tensor_ops as T

Tensor = torch.Tensor


@dataclass
class ModeStatistics:
    """Running statistics of one layer's input: ``shape`` is a single input's shape with batch first."""

    shape: tuple[int, ...] = ()
    gram_sums: dict[int, Tensor] = field(default_factory=dict)
    samples: int = 0
    batch_spectra: list[Tensor] = field(default_factory=list)
    _eig: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        x = x.detach()
        if self.shape and tuple(x.shape[1:]) != tuple(self.shape[1:]):
            raise ValueError(f"calibration inputs changed shape: {tuple(x.shape)} after {self.shape}")
        self.shape = (max(self.shape[0], x.shape[0]) if self.shape else x.shape[0],) + tuple(x.shape[1:])
        xd = x.double() if x.dtype != torch.float64 else x
        for mode in range(1, x.dim()):
            g = T.mode_gram(xd, mode)
            self.gram_sums[mode] = g if mode not in self.gram_sums else self.gram_sums[mode] + g
        values, _ = T.gram_eigh(T.mode_gram(xd, 0))
        self.batch_spectra.append(values.cpu())
        self.samples += x.shape[0]
        self._eig.clear()

    def mean_gram(self, mode: int) -> Tensor:
        return self.gram_sums[mode] / max(self.samples, 1)

    def eigh(self, mode: int) -> tuple[Tensor, Tensor]:
        if mode not in self._eig:
            self._eig[mode] = T.gram_eigh(self.mean_gram(mode))
        return self._eig[mode]

    def batch_rank_at(self, eps: float) -> int:
        ranks = [T.rank_for_energy(values, eps) for values in self.batch_spectra]
        return max(1, math.ceil(sum(ranks) / len(ranks)))

    def ranks_at(self, eps: float) -> tuple[int, ...]:
        return (self.batch_rank_at(eps),) + tuple(
            T.rank_for_energy(self.eigh(mode)[0], eps) for mode in range(1, len(self.shape))
        )

    def factor(self, mode: int, rank: int, dtype=torch.float32) -> Tensor:
        return self.eigh(mode)[1][:, :rank].to(dtype).contiguous()


def _first(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def calibrate_layers(model: nn.Module, layer_names: list[str], loader: Iterable, batches: int | None = None,
                     forward=None) -> dict[str, ModeStatistics]:
    """Run up to ``batches`` batches of ``loader`` through ``model`` (eval mode, no grad) and collect
    :class:`ModeStatistics` of the inputs of ``layer_names``. ``forward(model, batch)`` overrides the call
    (default: ``model(x)`` with ``x`` the batch or its first element, moved to the model's device).
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise KeyError(f"no such layers: {missing}")
    stats = {name: ModeStatistics() for name in layer_names}
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, inputs, _n=name: stats[_n].update(inputs[0]))
        for name in layer_names
    ]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        seen = 0
        for batch in loader:
            if batches is not None and seen >= batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                model(_first(batch).to(device))
            seen += 1
        if seen == 0:
            raise ValueError("calibration loader yielded no batches")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
