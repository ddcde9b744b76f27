"""What the CPU peak-memory measurement costs a training step: ASI on the last 4 layers, one thread,
with and without ``torch.profiler``'s memory events, interleaved in one process (medians of 14 steps).

    python3 docs/bench/peak_overhead.py [--json docs/bench/peak_overhead.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import engine
from engine.bench.output import emit_json
from engine.memory import StepMeter
from engine.models import build_backbone


def step_ms(name: str, batch_size: int, steps: int = 16) -> dict:
    torch.manual_seed(0)
    bb = build_backbone(name, weights="none", num_classes=10)
    model = bb.model
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(batch_size, first.in_channels, bb.resolution, bb.resolution)
    y = torch.randint(0, 10, (batch_size,))
    engine.compress_model(model, "asi", last_k=4).train_mode()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for peak in (True, False):
            start = time.perf_counter()
            with StepMeter(model, measure_peak=peak):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            times[peak].append((time.perf_counter() - start) * 1e3)
    on, off = statistics.median(times[True][2:]), statistics.median(times[False][2:])
    return {"backbone": name, "batch_size": batch_size, "step_ms_with_peak": round(on, 2),
            "step_ms_without_peak": round(off, 2), "ratio": round(on / off, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [step_ms("small-cnn-digits", 128), step_ms("mcunet-in3", 32)]
    emit_json({"rows": rows, "torch": torch.__version__}, args.json)


if __name__ == "__main__":
    main()
