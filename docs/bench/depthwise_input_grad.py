"""Depthwise conv input gradients on the CPU (1 thread): ATen's backward-data kernel against a forward conv of G.

    python3 docs/bench/depthwise_input_grad.py [--repeats 9] [--json docs/bench/depthwise_input_grad.json]

For a depthwise conv with stride 1 and one output channel per group, ``dX`` is the forward correlation of the
output gradient with the flipped kernel, zero-padded by ``(k−1)·d − p``. ATen's forward depthwise kernels are
faster than its backward-data ones on the CPU; :meth:`engine.geometry.ConvGeometry.input_grad` takes the forward
conv where :meth:`engine.geometry.ConvGeometry.flipped_input_grad` says so. Each row: ``aten_backward``
(``convolution_backward`` asked for dX only, as before) and ``flipped_forward`` (what the engine runs now) on random
``grad_output`` of the shape given, interleaved; medians in ms. The shapes: MCUNet-in3's trained 7×7 layer
(batches 1-128), MobileNetV2's 3×3 ones (7×7, 14×14, 28×28 maps), a 5×5 and a 7×7 on larger maps, and a
channel-multiplier-2 conv, which the engine leaves on ATen's kernel (``engine``: the route taken).
``max_rel_diff``: the largest difference of the two results over the largest entry (float rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.geometry import conv_geometry
from engine.malloc import tune_malloc

#: (batch, channels, map side, kernel, channel multiplier)
SHAPES = (
    (1, 480, 6, 7, 1), (8, 480, 6, 7, 1), (32, 480, 6, 7, 1), (64, 480, 6, 7, 1), (128, 480, 6, 7, 1),
    (8, 960, 7, 3, 1), (32, 960, 7, 3, 1), (128, 960, 7, 3, 1), (32, 576, 14, 3, 1), (32, 144, 28, 3, 1),
    (64, 240, 12, 5, 1), (64, 96, 22, 7, 1), (32, 240, 12, 5, 2),
)


def aten_backward(g: torch.Tensor, weight: torch.Tensor, input_shape, padding: int) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        g, g.new_empty(input_shape), weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0],
        input_shape[1], [True, False, False],
    )[0]


def flipped_forward(g: torch.Tensor, weight: torch.Tensor, input_shape, padding: int) -> torch.Tensor:
    kernel = weight.shape[-1]
    channels, multiplier = input_shape[1], weight.shape[0] // input_shape[1]
    flipped = weight.reshape(channels, multiplier, kernel, kernel).flip(2, 3)
    return F.conv2d(g, flipped, None, 1, kernel - 1 - padding, 1, channels)


def main() -> None:
    parser = bench_parser(__doc__, 9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_malloc()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, channels, side, kernel, multiplier in SHAPES:
        conv = nn.Conv2d(channels, channels * multiplier, kernel, padding=kernel // 2, groups=channels, bias=False)
        weight = conv.weight.detach()
        input_shape = (batch, channels, side, side)
        g = torch.randn(batch, channels * multiplier, side, side, generator=generator)
        calls = {"aten_backward": lambda g=g, w=weight, s=input_shape, p=kernel // 2: aten_backward(g, w, s, p),
                 "flipped_forward": lambda g=g, w=weight, s=input_shape, p=kernel // 2: flipped_forward(g, w, s, p)}
        ms = interleaved_ms(calls, args.repeats)
        a, b = (fn() for fn in calls.values())
        route = "flipped_forward" if conv_geometry(conv).flipped_input_grad(g, weight) else "aten_backward"
        rows.append({
            "shape": list(input_shape), "kernel": kernel, "multiplier": multiplier, "ms": ms, "engine": route,
            "speedup_vs_aten_backward": round(ms["aten_backward"] / ms[route], 2),
            "max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        })
    emit_json({"threads": 1, "repeats": args.repeats, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
