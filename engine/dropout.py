"""Dropout with a fast CPU mask draw, for the continual-learning nets (GPM's AlexNet drops 20-50 %).

ATen's CPU ``bernoulli_`` draws one MT19937 number per element: on a (64, 64, 29, 29) activation it took
28.5 ms, a sixth of an alexnet-cl training step at batch 64 on one thread. :class:`FastDropout` draws the
keep mask from numpy's PCG64 stream, 16 bits per element (:func:`keep_mask`; 2.4 ms there), seeded from
torch's global generator, so ``torch.manual_seed`` still fixes every mask and a run stays reproducible.
The keep probability is ``p`` rounded to 2⁻³² (exact for every practical ``p``); the output is
``x · mask / (1 − p)`` as in ``F.dropout``. It saves the bool mask (1 byte per element, where ``nn.Dropout``
keeps its float noise on CPU); :class:`engine.packing.PackedFastDropout` keeps it as bits, computing the
same numbers bit for bit. Off CPU (CUDA's fused kernel is fast) and in eval mode it is ``nn.Dropout``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

_SEED_HIGH = 2 ** 63 - 1


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """bool ``shape``: each element kept with probability ``1 − p`` (rounded to 2⁻³²), from a PCG64 stream
    seeded by one draw of torch's global CPU generator.

    With ``T = round((1 − p)·2³²) = T_hi·2¹⁶ + T_lo``: element i draws ``u_i``, the i-th uint16 of the stream's raw
    64-bit outputs (four per output, low half first), and is kept when ``u_i < T_hi``; where ``u_i == T_hi``
    (one element in 65,536) the next uint16 ``v`` of the stream, in element order, decides: kept when
    ``v < T_lo``. So ``P(keep) = T / 2³²`` exactly, from 16 random bits per element instead of 32
    (on (64, 64, 29, 29): 3.7 → 2.4 ms, ``docs/bench/conv_stage_ops.json``)."""
    seed = int(torch.randint(0, _SEED_HIGH, (1,)).item())
    n = 1
    for s in shape:
        n *= int(s)
    threshold = min(int(round((1.0 - p) * 2 ** 32)), 2 ** 32 - 1)
    high, low = threshold >> 16, threshold & 0xFFFF
    stream = np.random.PCG64(seed)
    draws = stream.random_raw((n + 3) // 4).view(np.uint16)[:n]
    keep = draws < high
    ties = np.flatnonzero(draws == high)
    if ties.size:
        keep[ties] = stream.random_raw((ties.size + 3) // 4).view(np.uint16)[:ties.size] < low
    return torch.from_numpy(keep).view(tuple(shape))


class _MaskedDropout(torch.autograd.Function):
    """y = x · mask / (1 − p); the mask is saved as given by ``save`` (the bool mask or its packed bits)."""

    @staticmethod
    def forward(ctx, x, p, pack):
        mask = keep_mask(x.shape, p)
        ctx.p, ctx.shape, ctx.pack = p, x.shape, pack
        ctx.save_for_backward(pack[0](mask) if pack is not None else mask)
        return apply_mask(x, mask, p)

    @staticmethod
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        mask = ctx.pack[1](saved, ctx.shape) if ctx.pack is not None else saved
        return apply_mask(grad, mask, ctx.p), None, None


def apply_mask(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``x · mask · 1/(1 − p)`` in one pass: ``addcmul`` on a 0-d zero, with the bool mask read as its 0/1 bytes
    (a float·bool product casts the mask to a float copy first, 5× slower on (64, 64, 29, 29)). The same numbers
    as ``x · mask`` then ``· scale`` (the mask is 0 or 1): 1.44 → 1.12 ms there."""
    return torch.addcmul(x.new_zeros(()), x, mask.view(torch.uint8), value=_scale(p, x.dtype))


def _scale(p: float, dtype: torch.dtype) -> float:
    """``1 / (1 − p)`` rounded as ``F.dropout`` rounds it: computed in ``dtype`` (float32: 1.0f / 0.8f)."""
    return float(torch.ones((), dtype=dtype) / torch.tensor(1.0 - p, dtype=dtype))


def dropout_fast(x: torch.Tensor, p: float, pack=None) -> torch.Tensor:
    """Training-mode dropout of ``x`` (CPU) with :func:`keep_mask`; ``pack``: ``(pack_bits, unpack_bits)`` to
    save the mask as bits."""
    return _MaskedDropout.apply(x, float(p), pack)


class FastDropout(nn.Dropout):
    """``nn.Dropout(p)`` whose CPU training mask comes from :func:`keep_mask` (≈3× faster than ``bernoulli_``)."""

    def forward(self, x):
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.device.type != "cpu" or x.numel() == 0:
            return super().forward(x)
        return dropout_fast(x, self.p)
