"""Depthwise conv weight gradients on the CPU (1 thread): ATen's NCHW path, channels_last, the taps route.

    python3 docs/bench/depthwise_weight_grad.py [--repeats 7] [--json docs/bench/depthwise_weight_grad.json]

Each row is ``convolution_backward`` asked for the weight gradient only, on random ``x`` and ``grad_output`` of
the shape given, interleaved; medians. ``channels_last`` includes the two layout copies, as
``engine.geometry.ConvGeometry.weight_grad`` runs it where :func:`engine.geometry.depthwise_grad_in_channels_last`
says so (kernels of at least 10 taps, padded by the kernel). The shapes: MCUNet-in3's trained 7×7 depthwise
layer at batch 64 and at the batch rank 8 of a compressed weight gradient, other 5×5 / 7×7 maps, an input padded
beforehand, and 3×3 ones (MobileNetV2's).
``taps``: :func:`engine.depthwise.taps_weight_grad` on the raw activation (identity spatial factors), which the
engine takes first where :func:`engine.depthwise.exact_taps_route` says so (``H·W ≤ 3·kh·kw``, 10+ taps).
``engine``: the route :meth:`engine.geometry.ConvGeometry.weight_grad` takes.
``max_rel_diff``: the results' largest difference from NCHW's over its largest entry (float rounding).

``compressed`` rows: the weight gradient from a Tucker core at ASI's default ranks ``(8, ⌈C/8⌉, ⌈H/2⌉, ⌈W/2⌉)``
(``engine.functional.conv_weight_grad``), three routes on the same inputs: ``factor_space_padding`` (the earlier
route: lift to the padded map, ATen correlation on it in NCHW), ``kernel_pads`` (lift to the unpadded map, ATen
pads; channels_last from 10 taps) and ``taps`` (:func:`engine.depthwise.taps_weight_grad`, where
:func:`engine.depthwise.taps_route` takes it: ``r_H·r_W ≤ 2·kh·kw``, 10+ taps). ``engine`` names the route taken.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from engine import depthwise
from engine import functional as Fn
from engine import tensor_ops as T
from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.functional import conv_weight_grad
from engine.geometry import conv_geometry
from engine.malloc import tune_malloc

#: (batch, channels, map side, kernel, stride, padding); the last 7×7 row is an input padded beforehand (padding 0),
#: which the engine keeps in NCHW
SHAPES = (
    (64, 480, 6, 7, 1, 3), (8, 480, 6, 7, 1, 3), (64, 480, 6, 5, 1, 2), (64, 240, 12, 7, 1, 3),
    (64, 480, 12, 7, 2, 3), (64, 96, 22, 7, 1, 3), (8, 480, 12, 7, 1, 0), (64, 480, 6, 3, 1, 1),
    (32, 960, 7, 3, 1, 1), (8, 960, 9, 3, 1, 1), (1, 480, 6, 7, 1, 3), (128, 480, 6, 7, 1, 3),
)
#: (batch, channels, map side, kernel) of the compressed rows: MCUNet-in3's 7×7, a 5×5, MobileNetV2's 3×3
COMPRESSED = ((32, 480, 6, 7), (64, 480, 6, 7), (128, 480, 6, 7), (64, 480, 6, 5), (32, 960, 7, 3), (64, 960, 7, 3))


def factor_space_padding(core, factors, g, geometry, weight_shape):
    """The earlier route: channels lifted, spatial modes lifted with zero-padded factors, ATen NCHW on them."""
    u_b, u_c, u_h, u_w = factors
    top, bottom, left, right = geometry.padding
    z1 = T.mode_product(g, u_b, 0)
    x = T.pair_expand(T.mode_expand(core, u_c, 1), Fn._pad_rows(u_h, top, bottom), Fn._pad_rows(u_w, left, right))
    dummy = x.new_empty(1).expand(tuple(weight_shape))
    return torch.ops.aten.convolution_backward(
        z1, x, dummy, None, list(geometry.stride), [0, 0], list(geometry.dilation), False, [0, 0], geometry.groups,
        [False, True, False])[1]


def compressed_rows(repeats: int, generator: torch.Generator) -> list[dict]:
    rows = []
    for batch, channels, side, kernel in COMPRESSED:
        conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        geometry, shape = conv_geometry(conv), conv.weight.shape
        ranks = (8, math.ceil(channels / 8), math.ceil(side / 2), math.ceil(side / 2))
        full = (batch, channels, side, side)
        factors = [torch.linalg.qr(torch.randn(d, r, generator=generator)).Q for d, r in zip(full, ranks)]
        core = torch.randn(ranks, generator=generator)
        g = torch.randn(full, generator=generator)
        args = (core, factors, g, geometry, shape)
        calls = {"factor_space_padding": functools.partial(factor_space_padding, *args),
                 "kernel_pads": functools.partial(_kernel_pads, *args),
                 "taps": functools.partial(depthwise.taps_weight_grad, *args)}
        ms = interleaved_ms(calls, repeats)
        results = {k: fn() for k, fn in calls.items()}
        ref = results["factor_space_padding"]
        rows.append({
            "compressed": True, "shape": list(full), "kernel": kernel, "ranks": list(ranks), "ms": ms,
            "engine": "taps" if depthwise.taps_route(core.shape, factors, geometry, shape) else "kernel_pads",
            "max_rel_diff": max(float((r - ref).abs().max() / ref.abs().max()) for r in results.values()),
        })
    return rows


def _kernel_pads(core, factors, g, geometry, weight_shape):
    """``conv_weight_grad`` with the taps route switched off: the kernel pads (channels_last from 10 taps)."""
    saved = depthwise.LARGE_KERNEL_TAPS
    depthwise.LARGE_KERNEL_TAPS = 1 << 30  # the taps routes only; engine.geometry's channels_last rule stays
    try:
        return conv_weight_grad(core, factors, g, geometry, weight_shape)
    finally:
        depthwise.LARGE_KERNEL_TAPS = saved


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
        conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False)
        geometry, shape = conv_geometry(conv), conv.weight.shape
        calls["taps"] = functools.partial(depthwise.taps_weight_grad, x, (None,) * 4, g, geometry, shape)
        ms = interleaved_ms(calls, args.repeats)
        results = {k: fn() for k, fn in calls.items()}
        ref = results["nchw"]
        # the bench's padding-0 row stands for an input padded beforehand
        engine_route = geometry.weight_grad_route(x, shape, channels, padded=padding == 0)
        rows.append({
            "shape": [batch, channels, side, side], "kernel": kernel, "stride": stride, "padding": padding, "ms": ms,
            "engine": engine_route, "engine_ms": ms[engine_route],
            "speedup_vs_nchw": round(ms["nchw"] / ms[engine_route], 2),
            "max_rel_diff": max(float((r - ref).abs().max() / ref.abs().max()) for r in results.values()),
        })
    rows += compressed_rows(args.repeats, generator)
    emit_json({"threads": 1, "repeats": args.repeats, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
