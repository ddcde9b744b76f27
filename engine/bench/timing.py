"""Side-by-side timing for the benchmark scripts: warm each callable once, then run them interleaved."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall ms of each callable over ``repeats`` interleaved rounds (one call of each, in order, per
    round) after ``warmup`` untimed rounds, rounded to 1 µs; keys as in ``fns``."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def pair_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall ms of ``a`` and ``b`` over ``repeats`` interleaved runs (a, b, a, b, …), rounded to 1 µs."""
    ms = interleaved_ms({"a": a, "b": b}, repeats)
    return ms["a"], ms["b"]
