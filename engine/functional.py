"""Weight gradients in compressed space (methods.md §3) and helpers that need no module state.

A Tucker form is ``(core, factors)``: ``core`` has one mode per activation mode, ``factors[m]`` is
an orthonormal ``(D_m, r_m)`` matrix or ``None`` when mode ``m`` is kept whole (then the core keeps
``D_m`` there). The activation is never rebuilt at full size: the output gradient is projected onto
the batch factor, the spatial factors are zero-padded in factor space, the correlation runs with the
compressed batch as batch and the compressed channels as input channels, and the channel factor lifts
the result back. Grouped and depthwise convs lift the channel mode before a grouped correlation,
so no ``C'×r_C`` cross terms are formed only to keep a diagonal.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import spectra as S
from engine import tensor_ops as T
from engine.depthwise import taps_route, taps_weight_grad
from engine.geometry import ConvGeometry, conv_geometry
from engine.matmul import mm

Tensor = torch.Tensor
Factors = Sequence[Tensor | None]


def _pad_rows(factor: Tensor, before: int, after: int) -> Tensor:
    """Zero rows above and below: the input's zero padding, done in factor space. ``(D, r) → (D+before+after, r)``."""
    if before == 0 and after == 0:
        return factor
    return F.pad(factor, (0, 0, before, after))


def conv_weight_grad(core: Tensor, factors: Factors, grad_output: Tensor, geometry: ConvGeometry,
                     weight_shape: torch.Size) -> Tensor:
    """dW of a conv from a Tucker-compressed input.

    core ``(r_B, r_C, r_H, r_W)``, factors ``[U_B (B, r_B) | None, U_C (C, r_C) | None, U_H (H, r_H) | None,
    U_W (W, r_W) | None]``, grad_output ``(B, C', H', W')`` → dW ``(C', C/groups, kh, kw)``.
    """
    u_batch, u_channel, u_height, u_width = factors
    if taps_route(core.shape, factors, geometry, weight_shape):
        return taps_weight_grad(core, factors, grad_output, geometry, weight_shape)
    z1 = grad_output if u_batch is None else T.mode_product(grad_output, u_batch, 0)  # (r_B, C', H', W')
    spatial = u_height is not None or u_width is not None
    # Where the kernel pads: a depthwise conv with symmetric padding is expanded to the unpadded map and ATen
    # pads (its depthwise kernels do that for free; a large kernel then runs in channels_last,
    # engine.geometry.DEPTHWISE_CHANNELS_LAST_MIN_TAPS). MobileNetV2's 3×3 (32, 960, 7, 7) at ranks
    # (8, 120, 4, 4): 1.72 → 1.47 ms (the lift to 7×7, not 9×9; docs/bench/depthwise_weight_grad.py). Otherwise
    # the padding is done in factor space (methods.md §3, step 2).
    kernel_pads = spatial and geometry.symmetric and geometry.groups > 1 and int(weight_shape[1]) == 1
    top, bottom, left, right = (0, 0, 0, 0) if kernel_pads else geometry.padding
    padded = spatial and not kernel_pads

    def expand_spatial(x: Tensor) -> Tensor:
        # Expand the spatial modes with zero-padded factors; a mode kept whole is padded directly.
        if u_height is not None and u_width is not None and T.pair_fits(u_height.shape[0], u_width.shape[0]):
            return T.pair_expand(x, _pad_rows(u_height, top, bottom), _pad_rows(u_width, left, right))
        if u_height is not None:
            x = T.mode_expand(x, _pad_rows(u_height, top, bottom), 2)
        elif top or bottom:
            x = F.pad(x, (0, 0, top, bottom))
        if u_width is not None:
            x = T.mode_expand(x, _pad_rows(u_width, left, right), 3)
        elif left or right:
            x = F.pad(x, (left, right, 0, 0))
        return x

    if geometry.groups == 1:
        x = expand_spatial(core) if spatial else core
        reduced_shape = (weight_shape[0], x.shape[1], weight_shape[2], weight_shape[3])
        z4 = geometry.weight_grad(x, z1, reduced_shape, groups=1, padded=padded)  # (C', r_C, kh, kw)
        return z4 if u_channel is None else T.mode_expand(z4, u_channel, 1)
    # Grouped: the channels are expanded too, (r_B, C, Hp, Wp), batch still compressed. Lifting a mode of a
    # tensor of n elements from r to D costs n·D multiply-adds, so the order matters: for MobileNetV2's
    # (8, 120, 4, 4) core of a 960-channel depthwise conv, channels first is 18 M, spatial first 75 M.
    x = core
    if u_channel is not None and spatial and _channels_first_is_cheaper(core.shape, _full_shape(factors, core),
                                                                         (top, bottom, left, right)):
        x = expand_spatial(T.mode_expand(x, u_channel, 1))
    else:
        x = expand_spatial(x) if spatial else x
        if u_channel is not None:
            x = T.mode_expand(x, u_channel, 1)
    return geometry.weight_grad(x, z1, weight_shape, groups=geometry.groups, padded=padded)


def _full_shape(factors: Factors, core: Tensor) -> tuple[int, ...]:
    """The full sizes of the modes: a factor's rows, or the core's size for a mode kept whole."""
    return tuple(int(core.shape[m]) if f is None else int(f.shape[0]) for m, f in enumerate(factors))


def _channels_first_is_cheaper(core_shape, full_shape, padding) -> bool:
    """Compare the multiply-adds of lifting channels then spatial modes with spatial then channels."""
    top, bottom, left, right = padding
    _, r_c, r_h, r_w = (int(v) for v in core_shape)
    _, c, h, w = (int(v) for v in full_shape)
    hp, wp = h + top + bottom, w + left + right
    n = math.prod(int(v) for v in core_shape)
    channels_first = n * c + n * c / r_c * hp + n * c / r_c * hp / r_h * wp
    spatial_first = n * hp + n * hp / r_h * wp + n * hp / r_h * wp / r_w * c
    return channels_first < spatial_first


def linear_weight_grad(core: Tensor, factors: Factors, grad_output: Tensor) -> Tensor:
    """dW of a linear layer from a Tucker-compressed input.

    core ``(r_0, …, r_F)`` for an input ``(B, F)``, ``(B, L, F)`` or ``(B, H, W, F)``; grad_output has the
    input's leading modes and ``out`` features last → dW ``(out, F)``.
    """
    z = grad_output
    for mode, factor in enumerate(factors[:-1]):
        if factor is not None:
            z = T.mode_product(z, factor, mode)
    out_features = z.shape[-1]
    dw = mm(z.reshape(-1, out_features).T, core.reshape(-1, core.shape[-1]))  # (out, r_F)
    return dw if factors[-1] is None else mm(dw, factors[-1].T)


def tucker_weight_grad(layer: nn.Module, core: Tensor, factors: Factors, grad_output: Tensor) -> Tensor:
    """dW of ``layer`` (``nn.Conv2d`` or ``nn.Linear``) from a Tucker-compressed input."""
    if isinstance(layer, nn.Conv2d):
        return conv_weight_grad(core, factors, grad_output, conv_geometry(layer), layer.weight.shape)
    if isinstance(layer, nn.Linear):
        return linear_weight_grad(core, factors, grad_output)
    raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")


@torch.no_grad()
def hosvd(activation: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor | None]]:
    """Truncated HOSVD at fixed per-mode ranks (a mode whose rank reaches its size is kept whole).

    activation ``(D_0, …)`` → core ``(r_0, …)``, factors ``[(D_m, r_m) | None]``.
    """
    x = activation.detach()
    factors: list[Tensor | None] = []
    for mode, rank in enumerate(ranks):
        size = x.shape[mode]
        factors.append(None if rank >= size else S.leading_subspace(T.mode_gram(x, mode), rank))
    core = x
    for mode, factor in enumerate(factors):
        if factor is not None:
            core = T.mode_product(core, factor, mode)
    return core, factors


@torch.no_grad()
def hosvd_ranks(activation: Tensor, eps: float) -> tuple[int, ...]:
    """Per-mode ranks reaching energy ``eps`` of every unfolding (:func:`engine.spectra.rank_for_energy`)."""
    x = activation.detach()
    return tuple(S.rank_for_energy(S.eigh_descending(T.mode_gram(x, mode))[0], eps) for mode in range(x.dim()))


def tucker_weight_grad_at_ranks(layer: nn.Module, activation: Tensor, grad_output: Tensor,
                                ranks: Sequence[int]) -> Tensor:
    """The compressed dW after truncating ``activation`` to ``ranks`` by HOSVD (the calibration's perplexity)."""
    core, factors = hosvd(activation, ranks)
    with torch.no_grad():
        return tucker_weight_grad(layer, core, factors, grad_output.detach())


def tucker_elements(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored elements ``Π r_m + Σ D_m r_m`` (a mode with ``r_m ≥ D_m`` is kept whole: no factor)."""
    kept = [min(r, d) for r, d in zip(ranks, shape)]
    return math.prod(kept) + sum(d * r for d, r in zip(shape, kept) if r < d)


def tucker_bytes(shape: Sequence[int], ranks: Sequence[int], element_bytes: int = 4) -> int:
    """Bytes of core + factors (see :func:`tucker_elements`)."""
    return tucker_elements(shape, ranks) * element_bytes


def default_asi_ranks(shape: Sequence[int], kind: str, batch_rank: int = 8) -> tuple[int, ...]:
    """ASI's default ranks for an activation ``shape`` (batch first).

    conv ``(B, C, H, W)`` → ``(8, ⌈C/8⌉, ⌈H/2⌉, ⌈W/2⌉)``; linear ``(B, [L | H, W,] F)`` →
    ``(8, [⌈L/2⌉ | ⌈H/2⌉, ⌈W/2⌉,] ⌈F/8⌉)``.
    """
    if kind == "conv":
        _, channels, height, width = shape
        return (batch_rank, math.ceil(channels / 8), math.ceil(height / 2), math.ceil(width / 2))
    return (batch_rank,) + tuple(math.ceil(d / 2) for d in shape[1:-1]) + (math.ceil(shape[-1] / 8),)
