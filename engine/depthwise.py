"""The depthwise conv weight gradient as products of small matrices ("taps"), exact or from a Tucker core.

ATen's CPU depthwise weight gradient for kernels of 10+ taps runs at 2-4 GFLOP/s (NCHW or channels_last). For a
depthwise conv (one input channel per group, channel multiplier ``m = C'/C``) with kernel ``kh×kw``, stride
``s``, dilation ``d`` and the input ``A ≈ core ×_1 U_B ×_2 U_C ×_3 U_H ×_4 U_W`` (``None`` factors: the mode kept
whole, i.e. the identity; the raw activation is the core with every factor ``None``)::

    dW[o, i, j] = Σ_{q,t,u} K[o,q,t,u] Σ_{h,w} Z1[q,o,h,w] U_Hp[h·s + i·d, t] U_Wp[w·s + j·d, u]

with ``Z1 = G ×_1 U_Bᵀ``, ``K = core ×_2 U_C`` (row ``o // m`` of ``U_C`` for output channel ``o``) and ``U_p``
the factors with zero rows for the padding. :func:`taps_weight_grad` computes it as one product of ``G`` with
``U_B``, one batched product per output channel over the batch rank (``(H'·W') × (r_H·r_W)`` per channel), and
the width then height "tap" matrices (:func:`kernel_taps`). Its main product costs ``r_H·r_W`` multiply-adds per
output position and batch sample where a correlation costs ``kh·kw``, but as dense products (:func:`taps_cheaper`
decides; ``python3 docs/bench/depthwise_weight_grad.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine.matmul import mm

Tensor = torch.Tensor

#: kernels with at least this many taps are "large": ATen is slow on them (engine.geometry keeps its own copy of
#: the threshold for its channels_last rule)
LARGE_KERNEL_TAPS = 10
#: the cost model of the route against a correlation (ATen's, the better of NCHW and channels_last): the taps
#: route runs where ``r_H·r_W·(b + TAPS_FIXED_BATCH) ≤ TAPS_RATIO·kh·kw·b``, ``b`` the batch (rank) of the
#: correlation. Its batched product scales with ``b·r_H·r_W``, its tap products and copies do not (≈ 10 samples'
#: worth); a correlation scales with ``b·kh·kw`` at ≈ 4-5× lower throughput. Fitted to 1-thread timings
#: (``python3 docs/bench/depthwise_weight_grad.py``): raw (r = H, W) (64, 480, 6, 6) 7×7 25.1 → 4.6 ms,
#: (64, 240, 12, 12) 7×7 33.0 → 15.7 ms, (4, 480, 6, 6) 7×7 3.3 → 1.6 ms; kept off at (1, 480, 6, 6) 7×7 (0.92 ms
#: against 1.51), (4, 240, 12, 12) 7×7 (3.0 against 8.4) and (64, 96, 22, 22) 7×7 (38 against 72); compressed at
#: batch rank 8, (32, 480, 12, 12) 5×5 r 6: 7.9 → 5.5 ms, kept off at (64, 96, 22, 22) 7×7 r 11 (7.9 against 14.3).
TAPS_FIXED_BATCH = 10
TAPS_RATIO = 4


def taps_cheaper(spatial_ranks: int, taps: int, batch: int) -> bool:
    """The cost model above: ``spatial_ranks = r_H·r_W``, ``taps = kh·kw``, ``batch`` = the correlation's batch."""
    return spatial_ranks * (batch + TAPS_FIXED_BATCH) <= TAPS_RATIO * taps * batch


def _depthwise(geometry, weight_shape) -> bool:
    return geometry.groups > 1 and int(weight_shape[1]) == 1


def taps_route(core_shape, factors: Sequence[Tensor | None], geometry, weight_shape) -> bool:
    """Whether the compressed dW of a depthwise conv from ``core (r_B, r_C, r_H, r_W)`` goes through
    :func:`taps_weight_grad`: both spatial modes factored, a kernel of at least :data:`LARGE_KERNEL_TAPS` taps,
    and :func:`taps_cheaper` at batch ``r_B``."""
    kh, kw = geometry.kernel
    return (_depthwise(geometry, weight_shape) and factors[2] is not None and factors[3] is not None
            and kh * kw >= LARGE_KERNEL_TAPS
            and taps_cheaper(int(core_shape[2]) * int(core_shape[3]), kh * kw, int(core_shape[0])))


def exact_taps_route(input_shape, geometry, weight_shape) -> bool:
    """Whether the exact dW of a depthwise conv on an input ``(B, C, H, W)`` goes through :func:`taps_weight_grad`
    (identity spatial factors): a kernel of at least :data:`LARGE_KERNEL_TAPS` taps and :func:`taps_cheaper`
    with ``r_H·r_W = H·W``."""
    kh, kw = geometry.kernel
    return (_depthwise(geometry, weight_shape) and kh * kw >= LARGE_KERNEL_TAPS
            and taps_cheaper(int(input_shape[2]) * int(input_shape[3]), kh * kw, int(input_shape[0])))


def kernel_taps(factor: Tensor, before: int, after: int, out_len: int, kernel: int, stride: int,
                dilation: int) -> Tensor:
    """The rows of the zero-padded factor ``(D, r)`` that each (output position, kernel tap) reads, as a matrix:
    ``[(o, r), k] = U_pad[o·stride + k·dilation, r]`` → ``(out_len·r, kernel)``."""
    padded = F.pad(factor, (0, 0, before, after)) if before or after else factor
    index = (torch.arange(out_len, device=factor.device)[:, None] * stride
             + torch.arange(kernel, device=factor.device)[None, :] * dilation)
    return padded[index].permute(0, 2, 1).reshape(out_len * factor.shape[1], kernel)


def taps_weight_grad(core: Tensor, factors: Sequence[Tensor | None], grad_output: Tensor, geometry, weight_shape,
                     padding: tuple[int, int, int, int] | None = None) -> Tensor:
    """dW ``(C', 1, kh, kw)`` of a depthwise conv from ``core (r_B, r_C, r_H, r_W)`` and ``factors``
    ``[U_B | None, U_C | None, U_H | None, U_W | None]`` (``None``: the mode whole) and ``grad_output
    (B, C', H', W')``; ``geometry``: a :class:`engine.geometry.ConvGeometry` (``padding`` overrides its padding:
    ``(0, 0, 0, 0)`` for an input padded beforehand). Exact for any stride, dilation and (asymmetric) padding.

    1. ``Z1ᵀ`` ``(C', H'·W', r_B)``: one product of ``G`` with ``U_B``;
    2. per output channel, ``Z1ᵀ K`` over the batch rank → ``(C', H', W', r_H, r_W)`` (a batched product);
    3. the width taps ``(W'·r_W, kw)``, then the height taps ``(H'·r_H, kh)`` (:func:`kernel_taps`).
    """
    u_batch, u_channel, u_height, u_width = factors
    batch, out_channels, out_h, out_w = grad_output.shape
    rank_b, rank_c, rank_h, rank_w = core.shape
    multiplier = out_channels // geometry.in_channels
    if u_batch is None:
        z1t = grad_output.permute(1, 2, 3, 0).reshape(out_channels, out_h * out_w, batch)
    else:
        # a plain matmul: oneDNN (engine.matmul.mm) copies the transposed operand first (0.68 against 0.16 ms)
        z1t = torch.matmul(grad_output.reshape(batch, -1).T, u_batch).view(out_channels, out_h * out_w, rank_b)
    core_c = core.permute(1, 0, 2, 3).reshape(rank_c, -1)  # (r_C, r_B·r_H·r_W)
    if u_channel is None:
        k = core_c if multiplier == 1 else core_c.repeat_interleave(multiplier, 0)
    else:
        k = mm(u_channel if multiplier == 1 else u_channel.repeat_interleave(multiplier, 0), core_c)
    z2 = torch.bmm(z1t, k.view(out_channels, rank_b, rank_h * rank_w))  # (C', H'·W', r_H·r_W)
    z2 = z2.view(out_channels, out_h, out_w, rank_h, rank_w).permute(0, 1, 3, 2, 4)
    top, bottom, left, right = geometry.padding if padding is None else padding
    kh, kw = geometry.kernel

    def factor(u: Tensor | None, size: int) -> Tensor:  # a mode kept whole: the identity
        return torch.eye(size, dtype=core.dtype, device=core.device) if u is None else u

    taps_w = kernel_taps(factor(u_width, rank_w), left, right, out_w, kw, geometry.stride[1], geometry.dilation[1])
    taps_h = kernel_taps(factor(u_height, rank_h), top, bottom, out_h, kh, geometry.stride[0], geometry.dilation[0])
    y = mm(z2.reshape(out_channels * out_h * rank_h, out_w * rank_w), taps_w)  # (C'·H'·r_H, kw)
    return torch.matmul(taps_h.T, y.view(out_channels, out_h * rank_h, kw)).view(tuple(weight_shape))
