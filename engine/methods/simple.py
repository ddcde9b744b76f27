"""The two baselines that need no decomposition: vanilla backprop and gradient filtering."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from engine.matmul import mm
from engine.methods.base import Method, Stash, exact_weight_grad

Tensor = torch.Tensor


class Vanilla(Method):
    """Plain last-k backprop: the input itself is kept for dW."""

    name = "vanilla"

    def compress(self, layer, x: Tensor) -> Stash:
        return Stash([x], {"ranks": list(x.shape), "flops_compress": 0})

    def weight_grad(self, layer, tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
        return exact_weight_grad(layer, tensors[0], grad_output)


class GradientFilter(Method):
    """Gradient filtering (Yang et al., CVPR 2023) with patch ``R``.

    Conv layers: the output ``(B, C', H', W')`` is cut into non-overlapping ``R×R`` patches (the last
    row / column of patches partial when ``R`` does not divide ``H'`` / ``W'``): a grid ``h×w`` with
    ``h = ⌈H'/R⌉``. ``G`` is averaged over each patch; ``A`` is averaged over the matching
    non-overlapping input patches of ``(s_h·R)×(s_w·R)`` pixels (stride ``s``; ``R×R`` at stride 1),
    the last partial too, on the same ``h×w`` grid. dW gets one value per kernel tap pair
    ``Σ_patches |patch|·Ḡ·Ā`` (every tap the same), with ``|patch|`` the patch's output pixel count.
    The input gradient is the exact transposed convolution of ``Ḡ`` broadcast back over each patch
    (approximate, so errors compound with depth); it is computed on the ``h×w`` grid where that is
    the same number and measured faster (1×1 convs; grouped convs with ``R`` dividing ``H'`` and ``W'``),
    ``R²`` resp. ≈2-3× cheaper in FLOPs.
    Linear layers have no spatial patches: they stay exact (vanilla storage).
    """

    name = "gradient_filter"
    exact_input_grad = False

    def __init__(self, layer_name: str = "", seed: int = 0, patch: int = 2):
        super().__init__(layer_name, seed)
        if int(patch) < 1:
            raise ValueError(f"gradient_filter patch must be a positive integer, got {patch!r}")
        self.patch = int(patch)

    def describe(self) -> dict:
        return {"method": self.name, "patch": self.patch}

    def _grid(self, out_h: int, out_w: int) -> tuple[int, int]:
        return math.ceil(out_h / self.patch), math.ceil(out_w / self.patch)

    def pool_activation(self, layer, x: Tensor) -> Tensor:
        """``Ā``: x ``(B, C, H, W)`` averaged over non-overlapping ``(s_h·R)×(s_w·R)`` patches → ``(B, C, h, w)``."""
        geometry = layer.geometry
        grid = self._grid(*geometry.output_hw(x.shape[2], x.shape[3]))
        sums, counts = patch_sums(x, (geometry.stride[0] * self.patch, geometry.stride[1] * self.patch), grid)
        return sums / counts

    def compress(self, layer, x: Tensor) -> Stash:
        if layer.kind != "conv":
            return Stash([x], {"ranks": list(x.shape), "flops_compress": 0, "exact": True})
        pooled = self.pool_activation(layer, x).contiguous()
        return Stash([pooled], {"ranks": list(pooled.shape), "flops_compress": x.numel(), "exact": False})

    def pool_grad(self, grad_output: Tensor, meta: dict | None = None) -> tuple[Tensor, Tensor]:
        """(Ḡ ``(B, C', h, w)`` average over each ``R×R`` output patch, patch pixel counts ``(h, w)``).

        With the step's ``meta``, the patch sums are left there for :meth:`weight_grad` of the same backward
        (input gradient first, then weight gradient: one pass over ``G`` instead of two)."""
        sums, counts = patch_sums(grad_output, (self.patch, self.patch), self._grid(*grad_output.shape[2:]))
        if meta is not None:
            meta["_grad_sums"] = (grad_output, sums)
        return sums / counts, counts

    def _grad_sums(self, grad_output: Tensor, meta: dict) -> Tensor:
        """The patch sums of ``grad_output``: those :meth:`pool_grad` left for this very tensor, else computed."""
        cached = meta.pop("_grad_sums", None)
        if cached is not None and cached[0] is grad_output:
            return cached[1]
        return patch_sums(grad_output, (self.patch, self.patch), self._grid(*grad_output.shape[2:]))[0]

    def weight_grad(self, layer, tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
        (saved,) = tensors
        if meta.get("exact"):
            return exact_weight_grad(layer, saved, grad_output)
        geometry = layer.geometry
        g_sum = self._grad_sums(grad_output, meta)
        groups = geometry.groups
        batch, out_ch = g_sum.shape[:2]
        in_per_group = saved.shape[1] // groups
        g = g_sum.reshape(batch, groups, out_ch // groups, -1)
        a = saved.reshape(batch, groups, in_per_group, -1)
        if groups == 1:  # a 1×1 conv's weight gradient on the grid: mkldnn, ≈2× faster than einsum's bmm
            per_tap = torch.ops.aten.convolution_backward(
                g_sum, saved, saved.new_empty((out_ch, in_per_group, 1, 1)), None, [1, 1], [0, 0], [1, 1],
                False, [0, 0], 1, [False, True, False],
            )[1].reshape(out_ch, in_per_group)
        elif g.shape[2] == 1 and a.shape[2] == 1:  # depthwise: one product per channel (≈4× faster than einsum)
            per_tap = (g * a).sum((0, 3)).reshape(out_ch, in_per_group)
        else:
            per_tap = torch.einsum("bgop,bgcp->goc", g, a).reshape(out_ch, in_per_group)
        kh, kw = geometry.kernel
        return per_tap[:, :, None, None].expand(out_ch, in_per_group, kh, kw).contiguous()

    def input_grad_route(self, layer, out_shape, input_shape) -> str:
        """How :meth:`input_grad` computes dX for a conv with output ``out_shape (B, C', H', W')``:
        ``pointwise`` (1×1, the channel mix on the grid), ``grid`` (grouped, ``R`` divides ``H'``, ``W'``: one
        strided transposed conv of Ḡ), ``taps`` (dense, where :func:`taps_route_cheaper` says so) or
        ``broadcast`` (the exact transposed conv of G̃)."""
        geometry = layer.geometry
        out_h, out_w = out_shape[2:]
        r = self.patch
        plain = geometry.dilation == (1, 1) and geometry.symmetric
        if plain and geometry.kernel == (1, 1) and geometry.padding == (0, 0, 0, 0):
            return "pointwise"
        if plain and geometry.groups > 1 and out_h % r == 0 and out_w % r == 0:
            # grouped (depthwise) only: there the grid's strided transposed conv is ~2× faster than the
            # broadcast one; for dense k×k convs mkldnn's strided transposed conv is 1.2-1.5× slower
            # (measured at (32, 512, 8, 8) and (64, 256, 6, 6), docs/speed.md)
            return "grid"
        grid_shape = (out_shape[0], out_shape[1]) + self._grid(out_h, out_w)
        if geometry.groups == 1 and taps_route_cheaper(grid_shape, layer.weight.shape, (out_h, out_w), input_shape):
            return "taps"
        return "broadcast"

    def input_grad(self, layer, tensors, meta, grad_output: Tensor, weight: Tensor, input_shape) -> Tensor:
        if meta.get("exact"):
            return layer.exact_input_grad(grad_output, weight, input_shape)
        g_avg, _ = self.pool_grad(grad_output, meta)
        geometry, r, out_hw = layer.geometry, self.patch, tuple(grad_output.shape[2:])
        route = self.input_grad_route(layer, grad_output.shape, input_shape)
        if route == "pointwise":
            return _filtered_input_grad_pointwise(g_avg, weight, geometry, r, out_hw, input_shape)
        if route == "grid":
            return _filtered_input_grad_grid(g_avg, weight, geometry, r, input_shape)
        if route == "taps":
            return filtered_input_grad_taps(g_avg, weight, geometry, r, out_hw, input_shape)
        return layer.exact_input_grad(broadcast_patches(g_avg, r, out_hw), weight, input_shape)

    def input_grad_flops(self, layer, x: Tensor, out: Tensor, meta: dict) -> int:
        """The route's FLOPs: ``pointwise`` ``2·B·C'·C·h·w``; ``grid`` ``2·B·C'·(C/g)·h·w·K_h·K_w`` with the
        combined kernel ``K = s(R−1) + k``; ``taps`` ``2·(B·h·w·C'·C·T + B·C·T·h·w·H·W)``; else exact."""
        if meta.get("exact") or layer.kind != "conv":
            return super().input_grad_flops(layer, x, out, meta)
        route = self.input_grad_route(layer, out.shape, x.shape)
        batch, out_ch = out.shape[:2]
        gh, gw = self._grid(*out.shape[2:])
        in_per_group = x.shape[1] // layer.geometry.groups
        kh, kw = layer.geometry.kernel
        sh, sw = layer.geometry.stride
        if route == "pointwise":
            return 2 * batch * out_ch * in_per_group * gh * gw
        cells = batch * gh * gw
        if route == "grid":
            return 2 * cells * out_ch * in_per_group * (sh * (self.patch - 1) + kh) * (sw * (self.patch - 1) + kw)
        if route == "taps":
            taps = kh * kw
            return 2 * cells * x.shape[1] * taps * (out_ch + x.shape[2] * x.shape[3])
        return super().input_grad_flops(layer, x, out, meta)


def patch_sums(t: Tensor, patch_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Sums of ``t (B, C, H, W)`` over non-overlapping ``kh×kw`` patches on a ``h×w`` grid → (sums ``(B, C, h, w)``,
    in-bounds pixel counts ``(h, w)``). Rows/columns past ``h·kh``/``w·kw`` belong to no patch; a last patch
    past the border is partial (zero-padded, counted by its in-bounds pixels). Strided adds over a view:
    5-10× faster than ``avg_pool2d(ceil_mode=True)`` on CPU (profiled at (64, 480, 6, 6): 0.8 ms vs 9 ms)."""
    (kh, kw), (gh, gw) = patch_hw, grid_hw
    height, width = min(t.shape[2], gh * kh), min(t.shape[3], gw * kw)
    partial = height < gh * kh or width < gw * kw
    entries = t.shape[2] * t.shape[3] * gh * gw
    if (partial or kh * kw > 4 or entries <= POOL_MATRIX_ALIGNED_MAX_ENTRIES) and entries <= POOL_MATRIX_MAX_ENTRIES:
        # one matmul with a 0/1 (H·W, h·w) matrix: no padded copy (2-3× faster at (128, 960, 7, 7), R = 2)
        pool = pool_matrix(t.shape[2:], patch_hw, grid_hw, t.dtype, t.device)
        sums = mm(t.reshape(-1, t.shape[2] * t.shape[3]), pool).reshape(t.shape[0], t.shape[1], gh, gw)
        return sums, _patch_counts(height, width, patch_hw, grid_hw, t)
    t = t[:, :, :height, :width]
    if height < gh * kh or width < gw * kw:
        t = F.pad(t, (0, gw * kw - width, 0, gh * kh - height))
    b, c = t.shape[:2]
    cols_view = t.reshape(b, c, gh * kh, gw, kw)
    rows_sum = cols_view[..., 0]
    for j in range(1, kw):  # strided adds over the patch columns, then rows: ~10× faster than .sum(dim)
        rows_sum = rows_sum + cols_view[..., j]
    rows_view = rows_sum.reshape(b, c, gh, kh, gw)
    sums = rows_view[:, :, :, 0]
    for i in range(1, kh):
        sums = sums + rows_view[:, :, :, i]
    sums = sums.clone() if kh == 1 else sums
    return sums, _patch_counts(height, width, patch_hw, grid_hw, t)


def _patch_counts(height: int, width: int, patch_hw, grid_hw, like: Tensor) -> Tensor:
    """In-bounds pixel count of each patch ``(h, w)``."""
    (kh, kw), (gh, gw) = patch_hw, grid_hw
    rows = (height - torch.arange(gh, device=like.device) * kh).clamp(max=kh)
    cols = (width - torch.arange(gw, device=like.device) * kw).clamp(max=kw)
    return (rows[:, None] * cols[None, :]).to(like.dtype)


# patch_sums' matmul route holds a dense (H·W) × (h·w) matrix; larger maps take the strided adds.
POOL_MATRIX_MAX_ENTRIES = 1 << 16
# … and patches that tile the map exactly take it too up to this many entries (8×8 at R = 2), where one small
# matmul beats the strided adds (1 thread: (32, 480, 6, 6) 0.36 → 0.26 ms, (64, 480, 6, 6) 0.78 → 0.43,
# (32, 512, 8, 8) 0.64 → 0.42; (32, 320, 10, 10) 0.57 either way, (32, 256, 12, 12) 0.67 against 0.86)
POOL_MATRIX_ALIGNED_MAX_ENTRIES = 1 << 10


def pool_matrix(in_hw, patch_hw, grid_hw, dtype, device) -> Tensor:
    """``P ((H·W), (h·w))``: 1 where pixel ``(y, x)`` lies in patch ``(y // kh, x // kw)`` of the grid, else 0
    (pixels past ``h·kh`` / ``w·kw`` belong to no patch). Cached per shape."""
    return _pool_matrix(tuple(in_hw), tuple(patch_hw), tuple(grid_hw), dtype, str(device))


@functools.lru_cache(maxsize=64)
def _pool_matrix(in_hw, patch_hw, grid_hw, dtype, device) -> Tensor:
    (height, width), (kh, kw), (gh, gw) = in_hw, patch_hw, grid_hw
    rows = torch.zeros(height, gh, dtype=torch.float64)
    cols = torch.zeros(width, gw, dtype=torch.float64)
    for y in range(min(height, gh * kh)):
        rows[y, y // kh] = 1
    for x in range(min(width, gw * kw)):
        cols[x, x // kw] = 1
    return torch.einsum("ya,xb->yxab", rows, cols).reshape(height * width, gh * gw).to(dtype=dtype, device=device)


def broadcast_patches(pooled: Tensor, patch: int, out_hw: tuple[int, int]) -> Tensor:
    """``G̃``: pooled ``(B, C', h, w)`` repeated over each ``R×R`` patch and cropped → ``(B, C', H', W')``."""
    b, c, h, w = pooled.shape
    if out_hw[0] * out_hw[1] * h * w <= POOL_MATRIX_MAX_ENTRIES:
        # a matmul with the pool matrix's transpose: 4-7× faster than the expanded 6-D copy below on CPU
        lift = pool_matrix(out_hw, (patch, patch), (h, w), pooled.dtype, pooled.device).T
        return mm(pooled.reshape(b * c, h * w), lift).reshape(b, c, out_hw[0], out_hw[1])
    full = pooled[:, :, :, None, :, None].expand(b, c, h, patch, w, patch).reshape(b, c, h * patch, w * patch)
    return full[:, :, : out_hw[0], : out_hw[1]].contiguous()


def _filtered_input_grad_pointwise(g_avg: Tensor, weight: Tensor, geometry, patch: int, out_hw, input_shape) -> Tensor:
    """A 1×1 conv, no padding: ``dX[::s, ::s] = broadcast(Wᵀ Ḡ)`` — the channel mix runs on the ``h×w`` grid."""
    b, _, h, w = g_avg.shape
    mixed = torch.ops.aten.convolution_backward(
        g_avg, g_avg.new_empty((b, input_shape[1], h, w)), weight, None, [1, 1], [0, 0], [1, 1],
        False, [0, 0], geometry.groups, [True, False, False],
    )[0]  # (B, C, h, w)
    lifted = broadcast_patches(mixed, patch, out_hw)  # (B, C, H', W')
    if geometry.stride == (1, 1) and tuple(lifted.shape) == tuple(input_shape):
        return lifted
    grad = g_avg.new_zeros(input_shape)
    sh, sw = geometry.stride
    grad[:, :, : out_hw[0] * sh : sh, : out_hw[1] * sw : sw] = lifted
    return grad


def _filtered_input_grad_grid(g_avg: Tensor, weight: Tensor, geometry, patch: int, input_shape) -> Tensor:
    """``R`` divides ``H'`` and ``W'``: broadcasting ``Ḡ`` and a transposed conv by ``W`` (stride ``s``) equal one
    transposed conv of ``Ḡ`` itself by the combined kernel ``K[a] = Σ_{t<R} W[a − s·t]`` at stride ``s·R``."""
    sh, sw = geometry.stride
    out_ch, in_per_group, kh, kw = weight.shape
    combined = weight.new_zeros(out_ch, in_per_group, sh * (patch - 1) + kh, sw * (patch - 1) + kw)
    for th in range(patch):
        for tw in range(patch):
            combined[:, :, sh * th : sh * th + kh, sw * tw : sw * tw + kw] += weight
    top, _, left, _ = geometry.padding
    return torch.ops.aten.convolution_backward(
        g_avg, g_avg.new_empty(tuple(input_shape)), combined, None, [sh * patch, sw * patch],
        [top, left], [1, 1], False, [0, 0], geometry.groups, [True, False, False],
    )[0]


# The taps route's scatter matrix is dense (T·h·w) × (H·W); past this many entries the broadcast conv is used.
TAPS_SCATTER_MAX_ENTRIES = 1 << 20


def taps_route_cheaper(grid_shape, weight_shape, out_hw, input_shape) -> bool:
    """FLOP model for a dense conv's filtered input gradient: the taps route (``B·h·w·C'·C·T`` for the channel
    mix on the grid, plus the scatter matmul ``B·C·T·h·w·H·W`` counted twice: it runs as a BLAS matmul at about
    half the conv kernels' rate on the CPUs measured) against the broadcast transposed conv ``B·C·C'·H'·W'·T``."""
    batch, out_ch, gh, gw = grid_shape
    _, in_ch, kh, kw = weight_shape
    taps, cells, in_pixels = kh * kw, gh * gw, input_shape[2] * input_shape[3]
    if taps * cells * in_pixels > TAPS_SCATTER_MAX_ENTRIES:
        return False
    mix = batch * cells * out_ch * in_ch * taps
    scatter = batch * in_ch * taps * cells * in_pixels
    broadcast = batch * in_ch * out_ch * out_hw[0] * out_hw[1] * taps
    return mix + 2 * scatter < broadcast


def tap_scatter_matrix(geometry, patch: int, out_hw, in_hw, dtype, device) -> Tensor:
    """``S ((T·h·w), (H·W))``: ``S[(t, p), (y, x)]`` = how many output pixels of grid cell ``p`` kernel tap ``t``
    sends to input pixel ``(y, x)`` (0/1 per axis; any stride, dilation, padding). Cached per geometry."""
    return _tap_scatter_matrix(geometry, patch, tuple(out_hw), tuple(in_hw), dtype, str(device))


@functools.lru_cache(maxsize=64)
def _tap_scatter_matrix(geometry, patch: int, out_hw, in_hw, dtype, device) -> Tensor:
    top, _, left, _ = geometry.padding

    def axis(kernel, stride, dilation, pad, n_out, n_in):  # (k, cells, n_in)
        m = torch.zeros(kernel, math.ceil(n_out / patch), n_in, dtype=torch.float64)
        for tap in range(kernel):
            for o in range(n_out):
                pos = o * stride - pad + tap * dilation
                if 0 <= pos < n_in:
                    m[tap, o // patch, pos] += 1
        return m

    rows = axis(geometry.kernel[0], geometry.stride[0], geometry.dilation[0], top, out_hw[0], in_hw[0])
    cols = axis(geometry.kernel[1], geometry.stride[1], geometry.dilation[1], left, out_hw[1], in_hw[1])
    scatter = torch.einsum("iay,jbx->ijabyx", rows, cols).reshape(-1, in_hw[0] * in_hw[1])
    return scatter.to(dtype=dtype, device=device)


def filtered_input_grad_taps(g_avg: Tensor, weight: Tensor, geometry, patch: int, out_hw, input_shape) -> Tensor:
    """Dense conv (groups 1), any stride / dilation / padding, ``R`` dividing ``H'`` or not: the transposed conv of
    the broadcast ``G̃`` as ``Z = Wᵀ Ḡ`` on the ``h×w`` grid per kernel tap (one 1×1 transposed conv:
    ``(B, C', h, w) → (B, C·T, h, w)``), then ``dX = Z S`` with the fixed 0/1 scatter matrix
    :func:`tap_scatter_matrix` → ``(B, C, H, W)``. The same number as the broadcast path (float64: ≤ 1e-15)."""
    batch, out_ch, gh, gw = g_avg.shape
    _, in_ch, kh, kw = weight.shape
    mixed = torch.ops.aten.convolution_backward(
        g_avg, g_avg.new_empty((batch, in_ch * kh * kw, gh, gw)), weight.reshape(out_ch, in_ch * kh * kw, 1, 1),
        None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False],
    )[0]  # (B, C·T, h, w), laid out (B, C, T, h, w)
    scatter = tap_scatter_matrix(geometry, patch, out_hw, input_shape[2:], g_avg.dtype, g_avg.device)
    return mm(mixed.reshape(batch * in_ch, kh * kw * gh * gw), scatter).reshape(tuple(input_shape))
