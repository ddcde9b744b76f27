"""alexnet-cl training steps (batch 64, 32 px, 1 thread) side by side: plain autograd and the continual methods.

    python3 docs/bench/alexnet_cl_step.py [--repeats 7] [--json docs/bench/alexnet_cl_step.json] [--profile METHOD]

``native``: the net with plain autograd (no CompressedLayer, no packing). ``finetune`` / ``lance`` / ``gpm``: the
learner's prepared model, packed as ``lance continual`` runs it; ``finetune-nopack``: without packing. A kind with
``-atenbn`` (``lance-atenbn``) runs ATen's BatchNorm kernel instead of :mod:`engine.batchnorm`'s batch-statistics
route; one with ``-pairs`` keeps the max-pools out of the fused ReLU → dropout op
(``engine.packing._PackedReluDropoutPool``). ``gpm`` and ``lance`` hold a protected basis of the sizes a full
split-CIFAR-10 run reaches by task 4 (random orthonormal), so the projections cost what they cost there. Steps are
interleaved method by method; medians.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from engine.batchnorm import FastBatchNorm2d
from engine.bench.output import bench_parser, emit_json
from engine.continual.learner import ContinualConfig, ContinualLearner
from engine.malloc import tune_malloc
from engine.methods.protected import ProtectedLANCE
from engine.models.cl_nets import build_multihead
from engine.packing import PackedBatchNorm2d, PackedFastBatchNorm2d, PackedMaxPool2d, pack_region

TASK4_USAGE = {"features.conv1": 0.19, "features.conv2": 0.23, "features.conv3": 0.57, "features.fc1": 0.32,
               "features.fc2": 0.23}  # rank(P)/D after task 4 of the full run (GPM, docs/speed.md)


class SeparatePool(PackedMaxPool2d):
    """A packed max-pool that ``PackedReLU.fuse_next`` does not take into its op (its type is not PackedMaxPool2d)."""


def aten_batchnorm(model: torch.nn.Module) -> None:
    for module in model.modules():
        if type(module) is PackedFastBatchNorm2d:
            module.__class__ = PackedBatchNorm2d
        elif type(module) is FastBatchNorm2d:
            module.__class__ = torch.nn.BatchNorm2d


def build(kind: str, x: torch.Tensor, y: torch.Tensor):
    net = build_multihead("alexnet-cl", [2] * 5, 32)
    if kind == "native":
        return net
    method = kind.split("-")[0]
    learner = ContinualLearner(net, ContinualConfig(method=method))
    if "nopack" not in kind:
        pack_region(learner.model)
    if "pairs" in kind:  # ReLU → dropout fused, the max-pool after it separate (before the three-op fusion)
        for module in learner.model.modules():
            if type(module) is PackedMaxPool2d:
                module.__class__ = SeparatePool
    if "atenbn" in kind:  # ATen's BatchNorm kernel instead of engine.batchnorm's batch-statistics route
        aten_batchnorm(learner.model)
    task = 0
    if method in ("gpm", "lance"):
        generator = torch.Generator().manual_seed(0)
        for name, layer in learner.layers.items():
            if layer.method.protected:
                d = layer.weight[0].numel()
                q, _ = torch.linalg.qr(torch.randn(d, int(TASK4_USAGE[name] * d), generator=generator))
                ProtectedLANCE.set_basis(layer, q)
        task = 1
    learner.configure_task(task)
    learner.train_mode(task)
    if method == "lance":
        learner.calibrate(task, [(x, y)] * 4)
    return learner.model, task


def main() -> None:
    parser = bench_parser(__doc__, 7)
    parser.add_argument("--kinds", default="native,finetune,finetune-nopack,lance,gpm")
    parser.add_argument("--profile", default=None, help="print a torch.profiler table for this kind")
    parser.add_argument("--channels-last", action="store_true", help="feed the batch channels_last")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tuned = tune_malloc()  # as `lance continual` runs (LANCE_MALLOC_TUNING=0: off)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 2, (64,))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    models = {}
    for kind in args.kinds.split(","):
        built = build(kind, x, y)
        models[kind] = (built, 0) if kind == "native" else built

    def step(kind: str) -> None:
        model, task = models[kind]
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, task), y).backward()

    for kind in models:
        step(kind)
        step(kind)
    times = {kind: [] for kind in models}
    for _ in range(args.repeats):
        for kind in models:
            start = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - start)
    step_ms = {kind: round(statistics.median(t) * 1e3, 1) for kind, t in times.items()}
    min_step_ms = {kind: round(min(t) * 1e3, 1) for kind, t in times.items()}
    result = {"batch": 64, "threads": 1, "repeats": args.repeats, "step_ms": step_ms, "min_step_ms": min_step_ms,
              "malloc_tuned": tuned, "channels_last": args.channels_last}
    emit_json(result, args.json)
    if args.profile:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                step(args.profile)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
