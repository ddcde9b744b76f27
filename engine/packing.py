"""Lossless packing of what the rest of the trained region saves for backward.

Around the compressed layers, autograd keeps whole activations for ops whose backward needs far less:

| op | autograd keeps | packed form (exact) |
|---|---|---|
| BatchNorm in eval, affine params frozen | its input (B, C, …) float | nothing: the input gradient is ``grad · w / sqrt(running_var + eps)`` (per channel, from the module's own parameters and buffers) |
| ReLU | its output, float | 1 bit per element (``y > 0``) |
| ReLU6 / Hardtanh(a, b) | its input, float | 1 bit per element (``a < x < b``) |
| Hardsigmoid | its input, float | 1 bit per element (``-3 < x < 3``; the slope there is 1/6) |
| LeakyReLU | its input, float | 1 bit per element (``x > 0``) |
| Dropout (CPU) | the scaled noise, float | 1 bit per element (the kept mask); the scale is recomputed bit for bit |
| Dropout (CUDA) | the bool mask, 1 byte | 1 bit per element |
| FastDropout (CPU, `engine.dropout`) | the bool mask, 1 byte | 1 bit per element |
| MaxPool2d | its input (float) + int64 indices | the argmax' offset inside its window, in the narrowest integer type (uint8 up to 256 window positions) |
| AvgPool2d / AdaptiveAvgPool2d | its input, float (for its shape) | nothing (the shape) |
| ReLU → FastDropout (`PackedReLU.fuse_next`) | ReLU's bit + dropout's bit per element | one combined bit per element |
| ReLU → FastDropout → 2×2 MaxPool (maps ≥ 36 positions) | two bits per input element + offsets | one bit per pooled output (the combined mask at the argmax) + uint8 offsets |

Bits are packed 8 to a ``torch.uint8`` (little-endian within the byte). Hard-swish has no exact compact
form (its slope ``(2x + 3)/6`` on (-3, 3) needs ``x``, and ``x`` cannot be recovered exactly from the
output), so it keeps its input. BatchNorm that normalises with batch statistics (training mode, or
``track_running_stats=False`` as in the continual nets) keeps what its backward needs (the input and
the per-channel mean and inverse std) untouched. Everything else is left to autograd and listed by
:meth:`engine.memory.SavedBytesMeter.saved_by_op`.

Packing works by swapping a module's class for a subclass (``PackedReLU6`` for ``nn.ReLU6`` …): the
parameters, buffers, ``state_dict`` keys and ``isinstance`` checks are unchanged, forward values are
computed by the original op (bit for bit), and where a packed form does not apply (no grad needed,
BatchNorm in training mode or with trained affine parameters, ``inplace=True``, ``return_indices``) the
original forward runs. :func:`pack_region` / :func:`unpack_region` switch it on and off.
"""  # noqa: E501 (a Markdown table)
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.batchnorm import FastBatchNorm2d
from engine.dropout import FastDropout, apply_mask, dropout_fast, keep_mask

_SHIFTS: dict[torch.device, torch.Tensor] = {}
_ONE_SIXTH = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))  # ATen's hardsigmoid slope: 1.0f / 6.0f


# ---------------------------------------------------------------------------- bits
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape, n elements) -> uint8 (⌈n/8⌉,), element i in bit i % 8 of byte i // 8.

    On CPU numpy's packbits (one C pass: ~30× faster than the shift-and-sum below at 3.4M elements)."""
    if mask.device.type == "cpu" and mask.dtype == torch.bool:
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = _shifts(flat.device)
    return (flat.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (⌈n/8⌉,) -> bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    if packed.device.type == "cpu":  # numpy's unpackbits: 0/1 bytes, viewed as bool without a copy (~12× faster)
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little")).view(torch.bool).view(shape)
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS[device] = shifts
    return shifts


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


# ---------------------------------------------------------------------------- frozen BatchNorm
class _FrozenBatchNorm(torch.autograd.Function):
    """y = batch_norm(x) with running statistics; saves only the module's own var/weight (model state)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        ctx.eps = eps
        ctx.has_weight = weight is not None
        ctx.save_for_backward(running_var, *([weight] if weight is not None else []))
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        running_var, *rest = ctx.saved_tensors
        shape = [1, -1] + [1] * (grad.dim() - 2)
        # bit for bit what ATen's CPU kernel does: invstd in double, then (dy · invstd) · w
        invstd = (1.0 / torch.sqrt(running_var.double() + ctx.eps)).to(grad.dtype)
        grad_in = grad * invstd.view(shape)
        if ctx.has_weight:
            grad_in = grad_in * rest[0].to(grad.dtype).view(shape)
        return grad_in, None, None, None, None, None


class _PackedBatchNormMixin:
    def forward(self, x):
        frozen = (not self.training and self.running_mean is not None and self.running_var is not None
                  and not any(p is not None and p.requires_grad for p in (self.weight, self.bias)))
        if not frozen or not _wants_grad(x):
            return super().forward(x)
        self._check_input_dim(x)
        return _FrozenBatchNorm.apply(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class PackedBatchNorm1d(_PackedBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that saves nothing for backward when frozen in eval mode."""


class PackedBatchNorm2d(_PackedBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that saves nothing for backward when frozen in eval mode."""


class PackedBatchNorm3d(_PackedBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that saves nothing for backward when frozen in eval mode."""


class PackedFastBatchNorm2d(_PackedBatchNormMixin, FastBatchNorm2d):
    """:class:`engine.batchnorm.FastBatchNorm2d` that saves nothing for backward when frozen in eval mode."""


# ---------------------------------------------------------------------------- masked activations
class _MaskedGrad(torch.autograd.Function):
    """y = fn(x) (the original op, bit for bit); backward = grad where ``mask_fn`` holds, scaled as ATen does.

    The mask is saved as packed bits. ``kind``: ``relu``/``hardtanh`` (grad inside, 0 outside),
    ``hardsigmoid`` (grad · 1/6 inside, 0 outside), ``leaky_relu`` (grad inside, grad · ``slope`` outside).
    """

    @staticmethod
    def forward(ctx, x, fn, mask_fn, kind, slope):
        y = fn(x)
        mask = mask_fn(x, y)
        ctx.shape = mask.shape
        ctx.kind = kind
        ctx.slope = slope
        ctx.save_for_backward(pack_bits(mask))
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        if ctx.kind == "hardsigmoid":
            grad_in = torch.where(mask, grad * _ONE_SIXTH, grad.new_zeros(()))
        elif ctx.kind == "leaky_relu":
            grad_in = torch.where(mask, grad, grad * ctx.slope)
        else:  # relu, hardtanh: grad where the mask holds, 0 elsewhere (ATen's own kernel: ~7× masked_fill's speed)
            grad_in = torch.ops.aten.threshold_backward(grad, mask.to(grad.dtype), 0.5)
        return grad_in, None, None, None, None


class _PackedReluDropout(torch.autograd.Function):
    """ReLU then :class:`engine.dropout.FastDropout` in one op: ``y = x · c / (1 − p)``, ``c = (x > 0) ∧ keep``.

    The keep mask is the one the dropout alone would draw (the same generator call), so the outputs and the
    input gradient are the two ops' own numbers; the one combined mask is saved as bits (1 bit per element,
    not ReLU's bit plus dropout's). A NaN gradient where ``x ≤ 0`` stays NaN (ReLU's backward alone gives 0).
    On conv1's (64, 64, 29, 29): forward 4.6 → 3.4 ms in isolation; the backward loses ReLU's mask cast and
    ``threshold_backward``.
    """

    @staticmethod
    def forward(ctx, x, p):
        combined = (x > 0) & keep_mask(x.shape, p)
        ctx.p, ctx.shape = p, x.shape
        ctx.save_for_backward(pack_bits(combined))
        return apply_mask(x, combined, p)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return apply_mask(grad, unpack_bits(packed, ctx.shape), ctx.p), None


class _PackedReluDropoutPool(torch.autograd.Function):
    """ReLU → :class:`engine.dropout.FastDropout` → 2×2 / stride-2 max-pool as one op; saves only the pool's
    window offsets (uint8) and one bit per *output*: whether the combined mask held at the window's argmax.

    Forward: the two ops' own numbers (``y = x · c / (1 − p)``, ``c = (x > 0) ∧ keep`` with the keep mask the
    dropout alone draws), pooled by :func:`max_pool_2x2`. Backward: the pool's gradient reaches only each
    window's argmax, so the mask and scale apply there, on the quarter-size output gradient, before the scatter
    (the same products, so the same numbers, bit for bit). That bit is ``pooled > 0``: a window's maximum is
    positive exactly where its argmax survived both masks (a NaN input gives a NaN output either way). Against
    the pair then the pool: no full-size mask bits saved or unpacked and no full-size masked product in the
    backward (1 bit per input element less kept).
    """

    @staticmethod
    def forward(ctx, x, p):
        combined = (x > 0) & keep_mask(x.shape, p)
        pooled, offsets = max_pool_2x2(apply_mask(x, combined, p))
        kept = pooled > 0
        ctx.p, ctx.in_shape, ctx.in_dtype, ctx.kept_shape = p, x.shape, x.dtype, kept.shape
        ctx.save_for_backward(offsets, pack_bits(kept))
        return pooled

    @staticmethod
    def backward(ctx, grad):
        offsets, packed = ctx.saved_tensors
        grad = apply_mask(grad, unpack_bits(packed, ctx.kept_shape), ctx.p)
        return _unpool(grad, offsets, ctx.in_shape, ctx.in_dtype, _PLAIN_2X2, False), None


def _masked(x, fn, mask_fn, kind, slope=None):
    return _MaskedGrad.apply(x, fn, mask_fn, kind, slope)


class PackedReLU(nn.ReLU):
    """``nn.ReLU`` saving 1 bit per element (``y > 0``) instead of its output."""

    def fuse_next(self, following: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """Run this ReLU and the modules after it as one op where they allow it: ``(output, how many of
        following it ran)``, or ``None``.

        A packed dropout then a plain 2×2 / stride-2 max-pool: :class:`_PackedReluDropoutPool` (2); a packed
        dropout alone: :class:`_PackedReluDropout` (1). Declines (``None``) where either op would take another
        path: inplace, eval, no grad, off CPU, ``p`` ∉ (0, 1)."""
        nxt = following[0] if following else None
        if (type(nxt) is not PackedFastDropout or self.inplace or nxt.inplace or not nxt.training
                or not 0.0 < nxt.p < 1.0 or not _wants_grad(x) or x.device.type != "cpu" or x.numel() == 0):
            return None
        if len(following) > 1 and _is_plain_2x2_pool(following[1], x):
            return _PackedReluDropoutPool.apply(x, float(nxt.p)), 2
        return _PackedReluDropout.apply(x, float(nxt.p)), 1

    def forward(self, x):
        if self.inplace or not _wants_grad(x):
            return super().forward(x)
        return _masked(x, torch.relu, lambda x, y: y > 0, "relu")


class _PackedHardtanhMixin:
    def forward(self, x):
        if self.inplace or not _wants_grad(x):
            return super().forward(x)
        lo, hi = self.min_val, self.max_val
        return _masked(x, super().forward, lambda x, y: (x > lo) & (x < hi), "hardtanh")


class PackedHardtanh(_PackedHardtanhMixin, nn.Hardtanh):
    """``nn.Hardtanh`` saving 1 bit per element (``min < x < max``) instead of its input."""


class PackedReLU6(_PackedHardtanhMixin, nn.ReLU6):
    """``nn.ReLU6`` saving 1 bit per element (``0 < x < 6``) instead of its input."""


class PackedHardsigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` saving 1 bit per element (``-3 < x < 3``, where the slope is 1/6)."""

    def forward(self, x):
        if self.inplace or not _wants_grad(x):
            return super().forward(x)
        return _masked(x, super().forward, lambda x, y: (x > -3) & (x < 3), "hardsigmoid")


class PackedLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` saving 1 bit per element (``x > 0``) instead of its input."""

    def forward(self, x):
        if self.inplace or not _wants_grad(x):
            return super().forward(x)
        return _masked(x, super().forward, lambda x, y: x > 0, "leaky_relu", float(self.negative_slope))


# ---------------------------------------------------------------------------- dropout
_FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")


class _PackedDropout(torch.autograd.Function):
    """Dropout drawing exactly what ``F.dropout`` draws (same RNG calls), keeping the mask as bits."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        ctx.shape = x.shape
        ctx.fused = x.device.type in _FUSED_DROPOUT_DEVICES
        if ctx.fused:  # ATen: native_dropout on these devices
            y, mask = torch.native_dropout(x, p, True)
        else:  # ATen's _dropout: noise = bernoulli(1 - p) / (1 - p); y = x * noise
            noise = torch.empty_like(x).bernoulli_(1 - p)
            mask = noise.bool()
            noise.div_(1 - p)
            y = x * noise
        ctx.dtype = x.dtype
        ctx.save_for_backward(pack_bits(mask))
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        if ctx.fused:
            return torch.ops.aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - ctx.p)), None
        noise = mask.to(ctx.dtype).div_(1 - ctx.p)
        return grad * noise, None


class PackedDropout(nn.Dropout):
    """``nn.Dropout`` keeping its mask as 1 bit per element (the same masks as ``F.dropout``)."""

    def forward(self, x):
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or not _wants_grad(x) or x.numel() == 0:
            return super().forward(x)
        return _PackedDropout.apply(x, float(self.p))


class PackedFastDropout(FastDropout):
    """:class:`engine.dropout.FastDropout` keeping its mask as 1 bit per element (the same masks and numbers)."""

    def forward(self, x):
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.numel() == 0 or not _wants_grad(x):
            return super().forward(x)
        if x.device.type != "cpu":  # FastDropout is nn.Dropout there: the packed native dropout
            return _PackedDropout.apply(x, float(self.p))
        return dropout_fast(x, self.p, pack=(pack_bits, unpack_bits))


# ---------------------------------------------------------------------------- max-pool
def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def offset_dtype(window: int) -> torch.dtype:
    """The narrowest integer type holding offsets ``0 .. window - 1``."""
    if window <= 256:
        return torch.uint8
    if window <= 2 ** 15:
        return torch.int16
    return torch.int32


def _channels_last_wins(x: torch.Tensor) -> bool:
    """ATen's CPU max-pool vectorises over channels in channels_last: with the two layout copies it is still
    2-4× faster on an NCHW activation (training (64, 64, 29, 29) 10-25×; evaluation at batch 256: 69 → 34 ms,
    (256, 128, 12, 12) 27 → 6.6 ms), with the same maxima and first-maximum ties (windows scanned in order)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and x.shape[1] > 1


#: a 2×2 / stride-2 pool on a map with at least this many positions takes :func:`max_pool_2x2`
MAX_POOL_2X2_MIN_POSITIONS = 256


def is_plain_2x2(x: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> bool:
    """A 2×2 window, stride 2, no padding or dilation, floor mode, on a large enough CPU map."""
    return (x.device.type == "cpu" and x.dim() == 4 and tuple(kernel) == (2, 2) and tuple(stride) == (2, 2)
            and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1) and not ceil_mode
            and x.shape[-2] * x.shape[-1] >= MAX_POOL_2X2_MIN_POSITIONS)


def max_pool_2x2(x: torch.Tensor, offsets: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2×2 / stride-2 max-pool of x ``(B, C, H, W)`` (floor mode) by elementwise maxima of its strided quarters:
    ``(B, C, H//2, W//2)`` maxima and (``offsets``) each window's argmax offset ``2·kh + kw`` (uint8).

    The offset is the first maximum in row-major window order, ATen's rule: the columns of each row pair
    first (the right one only if strictly greater), then the rows. Same values and offsets as
    ``max_pool2d_with_indices`` (a NaN gives NaN; which NaN's position gets the gradient may differ).
    On conv1's (64, 64, 29, 29): 5.8 ms with offsets (15.9 through a channels_last copy), 1.9 ms values only
    (12.0); at batch 256: 6.1 ms values only (37 through channels_last, 69 in NCHW).
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    cropped = x[..., :h, :w]
    left, right = cropped[..., 0::2], cropped[..., 1::2]
    row_max = torch.maximum(left, right)
    top, bottom = row_max[..., 0::2, :], row_max[..., 1::2, :]
    y = torch.maximum(top, bottom)
    if not offsets:
        return y, None
    kw = (right > left).view(torch.uint8)
    kh = (bottom > top).view(torch.uint8)
    kw_top, kw_bottom = kw[..., 0::2, :], kw[..., 1::2, :]
    # kh·2 + (kw of the chosen row), in uint8 arithmetic (wraps to the right value): 5× faster than a bool where
    return y, kh * 2 + kw_top + kh * (kw_bottom - kw_top)


class _PackedMaxPool2d(torch.autograd.Function):
    """max_pool2d keeping only each output's argmax offset within its window (no input, no int64)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        ctx.params = (kernel, stride, padding, dilation, ceil_mode)
        ctx.in_shape = x.shape
        ctx.in_dtype = x.dtype
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        if is_plain_2x2(x, kernel, stride, padding, dilation, ceil_mode):
            y, offsets = max_pool_2x2(x)
            ctx.save_for_backward(offsets)
            return y
        if _channels_last_wins(x):
            y, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), kernel,
                                                            stride, padding, dilation, ceil_mode)
            y, idx = y.contiguous(), idx.contiguous()
        else:
            y, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        width = x.shape[-1]
        if idx.numel() and x.shape[-2] * width < 2 ** 31:
            idx = idx.to(torch.int32)  # int32 arithmetic: half the bytes of int64, faster division
        row = torch.div(idx, width, rounding_mode="floor")
        oh = torch.arange(y.shape[-2], device=x.device, dtype=idx.dtype).view(-1, 1)
        ow = torch.arange(y.shape[-1], device=x.device, dtype=idx.dtype).view(1, -1)
        h0 = oh * stride[0] - padding[0]
        w0 = ow * stride[1] - padding[1]
        if dilation == (1, 1):  # kh·k1 + kw = (row − h0)·k1 + (idx − row·W − w0) = idx − row·(W − k1) − (h0·k1 + w0)
            offsets = idx - row * (width - kernel[1]) - (h0 * kernel[1] + w0)
        else:
            kh = torch.div(row - h0, dilation[0], rounding_mode="floor")
            kw = torch.div(idx - row * width - w0, dilation[1], rounding_mode="floor")
            offsets = kh * kernel[1] + kw
        offsets = offsets.to(offset_dtype(kernel[0] * kernel[1]))
        ctx.save_for_backward(offsets)
        return y

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return _unpool(grad, offsets, ctx.in_shape, ctx.in_dtype, ctx.params, ctx.channels_last), \
            None, None, None, None, None


#: (kernel, stride, padding, dilation, ceil_mode) of the pools :func:`max_pool_2x2` computes
_PLAIN_2X2 = ((2, 2), (2, 2), (0, 0), (1, 1), False)


def _unpool(grad: torch.Tensor, offsets: torch.Tensor, in_shape, in_dtype, params, channels_last: bool):
    """Max-pool's input gradient from the output gradient and each window's argmax offset: ``grad`` scattered to
    ``window origin + offset`` (ATen's ``max_pool2d_with_indices_backward``), zeros elsewhere."""
    kernel, stride, padding, dilation, ceil_mode = params
    width = in_shape[-1]
    # index = window origin (h0·W + w0, per output position) + the offset's displacement (a k0·k1 table)
    taps = torch.arange(kernel[0] * kernel[1], device=offsets.device)
    table = (torch.div(taps, kernel[1], rounding_mode="floor") * (dilation[0] * width)
             + (taps % kernel[1]) * dilation[1])
    oh = torch.arange(offsets.shape[-2], device=offsets.device).view(-1, 1)
    ow = torch.arange(offsets.shape[-1], device=offsets.device).view(1, -1)
    origin = (oh * stride[0] - padding[0]) * width + (ow * stride[1] - padding[1])
    idx = torch.take(table, offsets.long()) + origin  # take: 2× advanced indexing's speed (same values)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape_only = torch.empty(in_shape, dtype=in_dtype, device=grad.device, memory_format=fmt)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, shape_only, kernel, stride, padding, dilation,
                                                           ceil_mode, idx)


def _pool_params(pool: nn.MaxPool2d) -> tuple:
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    return kernel, stride, _pair(pool.padding), _pair(pool.dilation), bool(pool.ceil_mode)


#: :class:`_PackedReluDropoutPool` takes maps of at least this many positions: forward + backward at batch 64,
#: (64, 256, 6, 6) 4.2 → 3.6 ms, (64, 128, 12, 12) 8.0 → 6.6, (64, 64, 29, 29) 17.9 → 16.4; smaller maps are faster
#: as the pair then the pool ((64, 256, 5, 5) 3.3 against 3.6 ms; ``docs/bench/conv_stage_ops.json``)
RELU_DROPOUT_POOL_MIN_POSITIONS = 36


def _is_plain_2x2_pool(module: nn.Module, x: torch.Tensor) -> bool:
    """A packed max-pool with a 2×2 window, stride 2, no padding or dilation, floor mode, over a 4-D map of at
    least :data:`RELU_DROPOUT_POOL_MIN_POSITIONS` positions (the pool :class:`_PackedReluDropoutPool` computes)."""
    return (type(module) is PackedMaxPool2d and not module.return_indices and _pool_params(module) == _PLAIN_2X2
            and x.dim() == 4 and x.shape[-2] >= 2 and x.shape[-1] >= 2
            and x.shape[-2] * x.shape[-1] >= RELU_DROPOUT_POOL_MIN_POSITIONS)


class PackedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` keeping window offsets (uint8 for windows up to 16×16) instead of input + int64."""

    def forward(self, x):
        if self.return_indices or x.dim() not in (3, 4):
            return super().forward(x)
        params = _pool_params(self)
        if not _wants_grad(x):  # evaluation: the same maxima, faster
            if is_plain_2x2(x, *params):
                return max_pool_2x2(x, offsets=False)[0]
            if _channels_last_wins(x):
                return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
            return super().forward(x)
        return _PackedMaxPool2d.apply(x, *params)


# ---------------------------------------------------------------------------- average pools
class _ShapeOnlyPool(torch.autograd.Function):
    """An average pool whose backward needs only the input's shape (ATen saves the whole input for it)."""

    @staticmethod
    def forward(ctx, x, forward_fn, backward_fn):
        ctx.in_shape, ctx.in_dtype, ctx.backward_fn = x.shape, x.dtype, backward_fn
        ctx.channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous()
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad):
        fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
        shape_only = torch.empty(ctx.in_shape, dtype=ctx.in_dtype, device=grad.device, memory_format=fmt)
        return ctx.backward_fn(grad, shape_only), None, None


class PackedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` saving nothing (its backward needs the input's shape only)."""

    def forward(self, x):
        if not _wants_grad(x) or x.dim() not in (3, 4):
            return super().forward(x)
        return _ShapeOnlyPool.apply(x, super().forward, torch.ops.aten._adaptive_avg_pool2d_backward)


class PackedAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` saving nothing (its backward needs the input's shape only)."""

    def forward(self, x):
        if not _wants_grad(x) or x.dim() not in (3, 4):
            return super().forward(x)
        kernel = _pair(self.kernel_size)
        stride = _pair(self.stride if self.stride is not None else self.kernel_size)
        padding, ceil, include, divisor = _pair(self.padding), bool(self.ceil_mode), \
            bool(self.count_include_pad), self.divisor_override

        def backward(grad, shape_only):
            return torch.ops.aten.avg_pool2d_backward(grad, shape_only, kernel, stride, padding, ceil, include,
                                                      divisor)

        return _ShapeOnlyPool.apply(x, super().forward, backward)


# ---------------------------------------------------------------------------- switching
PACKED_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: PackedBatchNorm1d,
    nn.BatchNorm2d: PackedBatchNorm2d,
    nn.BatchNorm3d: PackedBatchNorm3d,
    FastBatchNorm2d: PackedFastBatchNorm2d,
    nn.ReLU: PackedReLU,
    nn.ReLU6: PackedReLU6,
    nn.Hardtanh: PackedHardtanh,
    nn.Hardsigmoid: PackedHardsigmoid,
    nn.LeakyReLU: PackedLeakyReLU,
    nn.Dropout: PackedDropout,
    FastDropout: PackedFastDropout,
    nn.MaxPool2d: PackedMaxPool2d,
    nn.AdaptiveAvgPool2d: PackedAdaptiveAvgPool2d,
    nn.AvgPool2d: PackedAvgPool2d,
}
_ORIGINAL = {packed: original for original, packed in PACKED_CLASSES.items()}


def pack_region(model: nn.Module, region: Iterable[str] | None = None) -> list[str]:
    """Switch packing on for the modules of ``model`` (all, or those named in ``region`` and below them).

    Modules whose class is exactly one of :data:`PACKED_CLASSES`' keys get the packed subclass (same
    parameters, buffers, state_dict). Returns the names of the modules switched. Modules that need no
    gradient (a frozen prefix) run their original forward anyway, so packing the whole model is safe.
    """
    prefixes = None if region is None else [r for r in region]
    switched = []
    for name, module in model.named_modules():
        if prefixes is not None and not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        packed = PACKED_CLASSES.get(type(module))
        if packed is not None:
            module.__class__ = packed
            switched.append(name)
    return switched


def unpack_region(model: nn.Module) -> list[str]:
    """Undo :func:`pack_region`: every packed module back to its original class. Returns their names."""
    switched = []
    for name, module in model.named_modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
            switched.append(name)
    return switched


def is_packed(model: nn.Module) -> bool:
    return any(type(m) in _ORIGINAL for m in model.modules())
