"""small-cnn, last 4 layers, batch 16, 1 thread: step time (ms) of vanilla, ASI and LANCE side by side.

    python3 docs/bench/small_cnn_step.py [asi|lance|vanilla]   # optional: a torch.profiler table for that method

Steps are interleaved method by method; medians of 5 after one warm-up step each.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from engine.models import build_backbone
from engine.surgery import compress_model


def main() -> None:
    torch.set_num_threads(1)
    batch = 16
    base = build_backbone("small-cnn", weights="none").model
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for method in ("vanilla", "asi", "lance"):
        model = copy.deepcopy(base).train()
        compress_model(model, method, last_k=4, calibration_loader=[x] if method == "lance" else None,
                       calibration_batches=1)
        models[method] = model

    def step(model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    for model in models.values():
        step(model)
    times = {m: [] for m in models}
    for _ in range(5):
        for method, model in models.items():
            t0 = time.perf_counter()
            step(model)
            times[method].append((time.perf_counter() - t0) * 1e3)
    print({m: round(statistics.median(v), 2) for m, v in times.items()})
    if len(sys.argv) > 1:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                step(models[sys.argv[1]])
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
