"""Bytes for people: ``format_bytes(524288) == "524.3 kB"``; ``format_bytes(1536, binary=True) == "1.5 KiB"``.

Decimal units (kB = 10^3, MB = 10^6, GB = 10^9) match what ``--budget 0.5MB`` means
(engine.calibration.budget.parse_budget); ``binary=True`` gives KiB / MiB / GiB (2^10 …).
"""
from __future__ import annotations

import math

DECIMAL = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
BINARY = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n_bytes: float | None, binary: bool = False, missing: str = "-") -> str:
    """``n_bytes`` with one decimal in the largest unit it reaches (whole bytes below 1 kB / 1 KiB);
    ``missing`` for None, NaN or infinity."""
    if n_bytes is None or not math.isfinite(float(n_bytes)):
        return missing
    n = float(n_bytes)
    for unit, factor in BINARY if binary else DECIMAL:
        if abs(n) >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"
