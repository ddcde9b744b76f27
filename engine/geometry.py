"""Layer geometry: what a Conv2d / Linear does to shapes, normalised once.

A :class:`ConvGeometry` holds explicit four-sided padding ``(top, bottom, left, right)`` so that
``'same'`` with even kernels (asymmetric padding) and per-axis padding are handled in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.depthwise import exact_taps_route, taps_weight_grad


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, bottom, left, right
    groups: int

    @property
    def symmetric(self) -> bool:
        top, bottom, left, right = self.padding
        return top == bottom and left == right

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        kh, kw = self.kernel
        out_h = (height + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return out_h, out_w

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The exact convolution: x ``(B, C, H, W)`` → ``(B, C', H', W')``."""
        top, bottom, left, right = self.padding
        if self.symmetric:
            return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, self.stride, 0, self.dilation, self.groups)

    def input_grad(self, grad_output: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """Exact dL/dx from ``grad_output (B, C', H', W')`` and the weight only.

        The input argument of ``convolution_backward`` only supplies a shape; it is an uninitialised
        tensor, not an expanded scalar (mkldnn makes an expanded one contiguous: a full copy per call).
        """
        top, bottom, left, right = self.padding
        batch, channels, height, width = input_shape
        if self.flipped_input_grad(grad_output, weight):
            # a stride-1 depthwise conv's dX is the forward correlation of G with the flipped kernel, padded by
            # (k−1)·d − p: ATen's forward depthwise kernel is 15-30 % faster than its backward-data one
            (kh, kw), (dh, dw) = self.kernel, self.dilation
            return F.conv2d(grad_output, weight.flip(2, 3), None, 1, ((kh - 1) * dh - top, (kw - 1) * dw - left),
                            self.dilation, self.groups)
        if self.symmetric:
            dummy = grad_output.new_empty(tuple(input_shape))
            return torch.ops.aten.convolution_backward(
                grad_output, dummy, weight, None, list(self.stride), [top, left], list(self.dilation),
                False, [0, 0], self.groups, [True, False, False],
            )[0]
        padded_shape = (batch, channels, height + top + bottom, width + left + right)
        dummy = grad_output.new_empty(padded_shape)
        grad = torch.ops.aten.convolution_backward(
            grad_output, dummy, weight, None, list(self.stride), [0, 0], list(self.dilation),
            False, [0, 0], self.groups, [True, False, False],
        )[0]
        return grad[:, :, top : top + height, left : left + width]

    def flipped_input_grad(self, grad_output: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether :meth:`input_grad` runs as a forward conv with the flipped kernel: a depthwise conv with one
        output channel per group (multiplier 1; at 2, ATen's generic grouped forward is slower), stride 1, symmetric
        padding of at most ``(k−1)·d`` per axis, on the CPU (where it was measured:
        ``python3 docs/bench/depthwise_input_grad.py``)."""
        kh, kw = self.kernel
        top, _, left, _ = self.padding
        return (grad_output.device.type == "cpu" and self.stride == (1, 1) and self.symmetric
                and self.groups > 1 and self.groups == self.in_channels == self.out_channels
                and int(weight.shape[1]) == 1
                and top <= (kh - 1) * self.dilation[0] and left <= (kw - 1) * self.dilation[1])

    def weight_grad(
        self, inputs: torch.Tensor, grad_output: torch.Tensor, weight_shape, groups: int, padded: bool
    ) -> torch.Tensor:
        """dL/dW from ``inputs (N, C_in, H, W)`` (or already padded ``(N, C_in, Hp, Wp)`` when ``padded``)
        and ``grad_output (N, C', H', W')``.

        ``weight_shape[1] · groups`` must equal ``C_in``; ``N`` may be a compressed batch (the rows of a
        batch factor) and ``C_in`` a compressed channel mode (then ``groups`` is 1).
        """
        route = self.weight_grad_route(inputs, weight_shape, groups, padded)
        if route == "taps":  # engine.depthwise: as dense products
            return taps_weight_grad(inputs, (None, None, None, None), grad_output, self, weight_shape,
                                    padding=(0, 0, 0, 0) if padded else None)
        top, bottom, left, right = self.padding
        if not padded and not self.symmetric:
            inputs, padded = F.pad(inputs, (left, right, top, bottom)), True
        padding = [0, 0] if padded else [top, left]
        dummy = inputs.new_empty(1).expand(tuple(weight_shape))
        if route == "channels_last":
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        # (C', 1, kh, kw) with one input channel: channels_last strides are the contiguous ones
        return torch.ops.aten.convolution_backward(
            grad_output, inputs, dummy, None, list(self.stride), padding, list(self.dilation),
            False, [0, 0], groups, [False, True, False],
        )[1]

    def weight_grad_route(self, inputs: torch.Tensor, weight_shape, groups: int, padded: bool) -> str:
        """How :meth:`weight_grad` computes dW: ``"taps"`` (:func:`engine.depthwise.exact_taps_route`),
        ``"channels_last"`` (:func:`depthwise_grad_in_channels_last`, where the kernel pads: not on an input padded
        beforehand, nor with asymmetric padding, which pads beforehand) or ``"nchw"`` (ATen as it comes)."""
        if exact_taps_route(inputs.shape, self, weight_shape):
            return "taps"
        if not padded and self.symmetric and depthwise_grad_in_channels_last(inputs, weight_shape, groups):
            return "channels_last"
        return "nchw"

    def macs(self, batch: int, out_h: int, out_w: int) -> int:
        """Multiply-adds of one forward pass."""
        per_output = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        return batch * self.out_channels * out_h * out_w * per_output


#: depthwise kernels of at least this many taps take their weight gradient in channels_last on the CPU, with the
#: zero padding left to the kernel, where engine.depthwise's taps route (small maps, first) does not apply: ATen's
#: NCHW path for them runs at 2-3 GFLOP/s. Measured on one thread
#: (``python3 docs/bench/depthwise_weight_grad.py``), copies included: MCUNet's 7×7 on (64, 480, 6, 6)
#: 48.4 → 24.9 ms, 5×5 28.2 → 15.8 ms, (64, 96, 22, 22) 7×7 216 → 40 ms; 3×3 kernels keep NCHW, where ATen has a
#: fast kernel (1.17 against 1.68 ms with the copies). An input padded beforehand (asymmetric padding) stays
#: NCHW: channels_last loses there ((8, 480, 12, 12) 7×7 unpadded: 5.9 against 7.1 ms).
DEPTHWISE_CHANNELS_LAST_MIN_TAPS = 10
#: … and at least this many batch × map positions: below, the two layout copies cost more than they save
#: ((1, 480, 6, 6) 7×7: NCHW 0.92, channels_last 2.61 ms; (4, 480, 6, 6) 3.33 / 3.50; (1, 96, 22, 22) 3.66 / 1.33)
CHANNELS_LAST_MIN_POSITIONS = 144


def depthwise_grad_in_channels_last(inputs: torch.Tensor, weight_shape, groups: int) -> bool:
    """Whether a depthwise weight gradient on ``inputs`` qualifies for channels_last: CPU float32, one input
    channel per group (``weight_shape[1] == 1``, ``groups > 1``), at least :data:`DEPTHWISE_CHANNELS_LAST_MIN_TAPS`
    kernel taps. :meth:`ConvGeometry.weight_grad` takes it where the kernel pads (not on pre-padded inputs). The
    numbers equal NCHW's to float rounding."""
    return (groups > 1 and int(weight_shape[1]) == 1 and inputs.device.type == "cpu"
            and inputs.dtype == torch.float32
            and int(weight_shape[2]) * int(weight_shape[3]) >= DEPTHWISE_CHANNELS_LAST_MIN_TAPS
            and inputs.shape[0] * inputs.shape[2] * inputs.shape[3] >= CHANNELS_LAST_MIN_POSITIONS)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_geometry(conv: nn.Conv2d) -> ConvGeometry:
    """Normalise an ``nn.Conv2d`` (int, per-axis or ``'same'``/``'valid'`` padding) into explicit geometry."""
    if conv.padding_mode != "zeros":
        raise NotImplementedError(
            f"padding_mode={conv.padding_mode!r} is not supported by the compressed layers "
            "(only zero padding is); leave this layer uncompressed or use method 'vanilla'."
        )
    kh, kw = _pair(conv.kernel_size)
    dilation = _pair(conv.dilation)
    stride = _pair(conv.stride)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # 'same' (stride 1): total d·(k-1), the extra pixel goes bottom/right as in PyTorch
            total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
    else:
        ph, pw = _pair(conv.padding)
        pads = (ph, ph, pw, pw)
    return ConvGeometry(conv.in_channels, conv.out_channels, (kh, kw), stride, dilation, pads, conv.groups)
