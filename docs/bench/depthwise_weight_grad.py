"""Depthwise conv weight gradients on the CPU (1 thread): ATen's NCHW path against channels_last.

    python3 docs/bench/depthwise_weight_grad.py [--repeats 7] [--json docs/bench/depthwise_weight_grad.json]

Each row is ``convolution_backward`` asked for the weight gradient only, on random ``x`` and ``grad_output`` of
the shape given, interleaved; medians. ``channels_last`` includes the two layout copies, as
``engine.geometry.ConvGeometry.weight_grad`` runs it where :func:`engine.geometry.depthwise_grad_in_channels_last`
says so (kernels of at least 10 taps, padded by the kernel). The shapes: MCUNet-in3's trained 7×7 depthwise
layer at batch 64 and at the batch rank 8 of a compressed weight gradient, other 5×5 / 7×7 maps, an input padded
beforehand, and 3×3 ones (MobileNetV2's).
``max_rel_diff``: the two results' largest difference over the largest entry (float rounding).
"""
from __future__ import annotations

import torch

from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.geometry import depthwise_grad_in_channels_last
from engine.malloc import tune_malloc

#: (batch, channels, map side, kernel, stride, padding); the last 7×7 row is an input padded beforehand (padding 0),
#: which the engine keeps in NCHW
SHAPES = (
    (64, 480, 6, 7, 1, 3), (8, 480, 6, 7, 1, 3), (64, 480, 6, 5, 1, 2), (64, 240, 12, 7, 1, 3),
    (64, 480, 12, 7, 2, 3), (64, 96, 22, 7, 1, 3), (8, 480, 12, 7, 1, 0), (64, 480, 6, 3, 1, 1),
    (32, 960, 7, 3, 1, 1), (8, 960, 9, 3, 1, 1),
)


def weight_grad(x: torch.Tensor, g: torch.Tensor, kernel: int, stride: int, padding: int, layout) -> torch.Tensor:
    channels = x.shape[1]
    dummy = x.new_empty(1).expand(channels, 1, kernel, kernel)
    if layout is not None:
        x, g = x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
    return torch.ops.aten.convolution_backward(
        g, x, dummy, None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], channels,
        [False, True, False],
    )[1].contiguous()


def main() -> None:
    parser = bench_parser(__doc__, 7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_malloc()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, channels, side, kernel, stride, padding in SHAPES:
        x = torch.randn(batch, channels, side, side, generator=generator)
        out_side = (side + 2 * padding - kernel) // stride + 1
        g = torch.randn(batch, channels, out_side, out_side, generator=generator)
        calls = {name: (lambda x=x, g=g, kernel=kernel, stride=stride, padding=padding, layout=layout:
                        weight_grad(x, g, kernel, stride, padding, layout))
                 for name, layout in (("nchw", None), ("channels_last", torch.channels_last))}
        ms = interleaved_ms(calls, args.repeats)
        a, b = calls["nchw"](), calls["channels_last"]()
        rows.append({
            "shape": [batch, channels, side, side], "kernel": kernel, "stride": stride, "padding": padding, "ms": ms,
            "speedup": round(ms["nchw"] / ms["channels_last"], 2),
            "engine_uses_channels_last": padding > 0 and depthwise_grad_in_channels_last(
                x, (channels, 1, kernel, kernel), channels),
            "max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        })
    emit_json({"threads": 1, "repeats": args.repeats, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
