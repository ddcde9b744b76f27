"""Gradient filter's input-gradient routes and the CPU packing kernels, side by side (1 thread, medians).

    python3 docs/bench/gf_routes.py [--json docs/bench/gf_routes.json]

1. Dense 3×3 convs, R = 2: the exact transposed conv of the broadcast Ḡ ("broadcast") against the taps
   route (Wᵀ Ḡ on the h×w grid, then the fixed 0/1 scatter matmul), with what the FLOP rule picks.
2. Patch sums and the broadcast back: strided adds / 6-D expanded copy against the 0/1 pool-matrix matmul.
3. alexnet-cl's largest activation (64, 64, 29, 29): dropout masks (ATen bernoulli_ vs FastDropout's numpy
   draw), bit packing (shift-and-sum vs numpy), ReLU backward (masked_fill vs threshold_backward),
   max-pool with indices (NCHW vs channels_last incl. the layout copy).
Every pair is interleaved repeat by repeat; each first checks that both routes give the same numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import pair_ms
from engine.dropout import keep_mask
from engine.geometry import conv_geometry
from engine.methods import simple


def _input_grad_row(batch: int, c_in: int, c_out: int, size: int, stride: int, repeats: int) -> dict:
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    geometry = conv_geometry(conv)
    shape = torch.Size((batch, c_in, size, size))
    out_hw = geometry.output_hw(size, size)
    grid = (math.ceil(out_hw[0] / 2), math.ceil(out_hw[1] / 2))
    g_avg = torch.randn(batch, c_out, *grid)
    weight = conv.weight.detach()

    def broadcast():
        return geometry.input_grad(simple.broadcast_patches(g_avg, 2, out_hw), weight, shape)

    def taps():
        return simple.filtered_input_grad_taps(g_avg, weight, geometry, 2, out_hw, shape)

    assert torch.allclose(broadcast(), taps(), rtol=1e-4, atol=1e-4)
    t_b, t_t = pair_ms(broadcast, taps, repeats)
    return {"shape": list(shape), "stride": stride, "broadcast_ms": t_b, "taps_ms": t_t,
            "taps_over_broadcast": round(t_t / t_b, 3),
            "rule_picks_taps": simple.taps_route_cheaper(g_avg.shape, weight.shape, out_hw, shape)}


def input_grad_routes(repeats: int) -> list[dict]:
    return [_input_grad_row(*case, repeats) for case in
            [(32, 512, 512, 7, 1), (64, 512, 512, 7, 1), (128, 512, 512, 7, 1), (32, 512, 512, 8, 1),
             (64, 256, 256, 6, 1), (32, 256, 256, 14, 1), (32, 256, 512, 14, 2), (32, 128, 128, 28, 1),
             (32, 64, 64, 16, 1)]]


def _with_limit(limit: int, fn):
    """``fn`` run with ``simple.POOL_MATRIX_MAX_ENTRIES = limit`` (0: the strided / expanded-copy route)."""
    def run():
        saved = simple.POOL_MATRIX_MAX_ENTRIES
        simple.POOL_MATRIX_MAX_ENTRIES = limit
        try:
            return fn()
        finally:
            simple.POOL_MATRIX_MAX_ENTRIES = saved
    return run


def _pooling_row(shape: tuple[int, ...], repeats: int) -> dict:
    t = torch.randn(shape)
    grid = (math.ceil(shape[2] / 2), math.ceil(shape[3] / 2))
    pooled = torch.randn(shape[0], shape[1], *grid)
    limit = simple.POOL_MATRIX_MAX_ENTRIES

    def sums():
        return simple.patch_sums(t, (2, 2), grid)[0]

    def lift():
        return simple.broadcast_patches(pooled, 2, shape[2:])

    assert torch.allclose(_with_limit(0, sums)(), _with_limit(limit, sums)(), atol=1e-4)
    assert torch.equal(_with_limit(0, lift)(), _with_limit(limit, lift)())
    s = pair_ms(_with_limit(0, sums), _with_limit(limit, sums), repeats)
    b = pair_ms(_with_limit(0, lift), _with_limit(limit, lift), repeats)
    return {"shape": list(shape), "patch_sums_strided_ms": s[0], "patch_sums_matrix_ms": s[1],
            "broadcast_expand_ms": b[0], "broadcast_matrix_ms": b[1]}


def pooling_routes(repeats: int) -> list[dict]:
    return [_pooling_row(shape, repeats) for shape in [(128, 960, 7, 7), (64, 960, 7, 7), (64, 480, 6, 6),
                                                      (32, 256, 14, 14)]]


def packing_kernels(repeats: int) -> dict:
    x = torch.randn(64, 64, 29, 29)
    mask = x > 0
    grad = torch.randn_like(x)
    shifts = torch.arange(8, dtype=torch.uint8)

    def pack_torch():  # the former pack_bits (3,444,736 elements: a multiple of 8)
        return (mask.reshape(-1).to(torch.uint8).view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)

    def pack_numpy():
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))

    assert torch.equal(pack_torch(), pack_numpy())
    out = {"shape": list(x.shape)}
    out["dropout_bernoulli_ms"], out["dropout_numpy_mask_ms"] = pair_ms(
        lambda: torch.empty_like(x).bernoulli_(0.8), lambda: keep_mask(x.shape, 0.2), repeats)
    out["pack_shift_sum_ms"], out["pack_numpy_ms"] = pair_ms(pack_torch, pack_numpy, repeats)
    assert torch.equal(grad.masked_fill(~mask, 0), torch.ops.aten.threshold_backward(grad, mask.to(grad.dtype), 0.5))
    out["relu_bwd_masked_fill_ms"], out["relu_bwd_threshold_ms"] = pair_ms(
        lambda: grad.masked_fill(~mask, 0), lambda: torch.ops.aten.threshold_backward(grad, mask.to(grad.dtype), 0.5),
        repeats)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    y0, i0 = torch.ops.aten.max_pool2d_with_indices(x, *args)
    y1, i1 = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *args)
    assert torch.equal(y0, y1) and torch.equal(i0, i1)
    out["maxpool_nchw_ms"], out["maxpool_channels_last_with_copy_ms"] = pair_ms(
        lambda: torch.ops.aten.max_pool2d_with_indices(x, *args),
        lambda: torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *args),
        repeats)
    return out


def main() -> None:
    parser = bench_parser(__doc__, 9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"threads": 1, "repeats": args.repeats, "input_grad": input_grad_routes(args.repeats),
              "pooling": pooling_routes(args.repeats), "packing": packing_kernels(args.repeats)}
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
