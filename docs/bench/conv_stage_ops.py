"""alexnet-cl's conv-stage ops in isolation (batch 64, 1 thread): each new route against the one it replaced.

    python3 docs/bench/conv_stage_ops.py [--repeats 15] [--json docs/bench/conv_stage_ops.json]

- ``batchnorm``: ``nn.BatchNorm2d`` (ATen's kernel) against :class:`engine.batchnorm.FastBatchNorm2d`, batch
  statistics, forward and forward + backward, with the largest output / input-gradient difference.
- ``relu_dropout_pool``: the packed ReLU → dropout op then the packed max-pool against the one
  ReLU → dropout → pool op (``engine.packing._PackedReluDropoutPool``), forward + backward, and the bytes each
  saves for backward.
- ``keep_mask``: the keep mask from 32 random bits per element (the rule before, re-implemented here) against
  :func:`engine.dropout.keep_mask` (16 bits, ties settled by further draws).

Medians of interleaved repeats, ms. In a whole training step these memory-bound ops cost 2-3× their isolated
times (``docs/bench/alexnet_cl_step.py`` measures the steps).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.batchnorm import FastBatchNorm2d
from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.dropout import _SEED_HIGH, keep_mask
from engine.malloc import tune_malloc
from engine.memory import SavedBytesMeter
from engine.packing import PackedFastDropout, PackedMaxPool2d, PackedReLU, _PackedReluDropoutPool

SHAPES = [(64, 64, 29, 29), (64, 128, 12, 12), (64, 256, 6, 6), (64, 256, 5, 5)]  # alexnet-cl's conv1-3 (+ 6×6)


def batchnorm_rows(repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        aten, fast = nn.BatchNorm2d(shape[1], track_running_stats=False), FastBatchNorm2d(shape[1],
                                                                                       track_running_stats=False)
        x = torch.randn(shape) * 2 + 0.5
        grad = torch.randn(shape)

        def fwd(m, x=x):
            return lambda: m(x)

        def fwd_bwd(m, x=x, grad=grad):
            def run():
                inp = x.detach().requires_grad_()
                m(inp).backward(grad)
                return inp.grad
            return run

        out = interleaved_ms({"aten_fwd": fwd(aten), "fast_fwd": fwd(fast), "aten_fwd_bwd": fwd_bwd(aten),
                              "fast_fwd_bwd": fwd_bwd(fast)}, repeats, warmup=2)
        out.update(shape=list(shape), max_output_diff=float((aten(x) - fast(x)).detach().abs().max()),
                   max_input_grad_diff=float((fwd_bwd(aten)() - fwd_bwd(fast)()).abs().max()))
        rows.append(out)
    return rows


def relu_dropout_pool_rows(repeats: int) -> list[dict]:
    rows = []
    relu, drop, pool = PackedReLU(), PackedFastDropout(0.2), PackedMaxPool2d(2)  # p: alexnet-cl's conv dropout
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape)

        def separate(x=x):
            inp = x.detach().requires_grad_()
            with SavedBytesMeter() as meter:
                y, _ = relu.fuse_next([drop], inp)
                out = pool(y)
            out.sum().backward()
            return meter.region_activation_bytes

        def fused(x=x):
            inp = x.detach().requires_grad_()
            with SavedBytesMeter() as meter:  # the op itself, whatever the map size (fuse_next picks by size)
                out = _PackedReluDropoutPool.apply(inp, float(drop.p))
            out.sum().backward()
            return meter.region_activation_bytes

        out = interleaved_ms({"pair_then_pool_fwd_bwd": separate, "one_op_fwd_bwd": fused}, repeats, warmup=2)
        out.update(shape=list(shape), pair_then_pool_saved_bytes=int(separate()), one_op_saved_bytes=int(fused()))
        rows.append(out)
    return rows


def keep_mask_32bit(shape, p: float) -> torch.Tensor:
    """The rule before: u < round((1 − p)·2³²), u the stream's uint32s (one per element)."""
    seed = int(torch.randint(0, _SEED_HIGH, (1,)).item())
    n = int(np.prod(shape))
    threshold = min(int(round((1.0 - p) * 2 ** 32)), 2 ** 32 - 1)
    draws = np.random.PCG64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(draws < threshold).view(tuple(shape))


def keep_mask_rows(repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES[:2]:
        out = interleaved_ms({"uint32_draws": lambda shape=shape: keep_mask_32bit(shape, 0.2),
                              "uint16_draws": lambda shape=shape: keep_mask(shape, 0.2)}, repeats, warmup=2)
        torch.manual_seed(0)
        out.update(shape=list(shape), kept_share_p0_2=round(float(keep_mask((4_000_000,), 0.2).float().mean()), 5))
        rows.append(out)
    return rows


def main() -> None:
    parser = bench_parser(__doc__, 15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_malloc()
    emit_json({"threads": 1, "repeats": args.repeats, "batchnorm": batchnorm_rows(args.repeats),
               "relu_dropout_pool": relu_dropout_pool_rows(args.repeats),
               "keep_mask": keep_mask_rows(args.repeats)}, args.json)


if __name__ == "__main__":
    main()
