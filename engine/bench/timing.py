"""Side-by-side timing for the benchmark scripts: warm each callable once, then run them interleaved."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def pair_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall ms of ``a`` and ``b`` over ``repeats`` interleaved runs (a, b, a, b, …), rounded to 1 µs."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return round(statistics.median(ta) * 1e3, 3), round(statistics.median(tb) * 1e3, 3)
