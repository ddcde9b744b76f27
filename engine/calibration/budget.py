"""Memory budgets: parse ``"0.5MB"``, ``"512KiB"``, ``"300000"`` into bytes (``engine.units.format_bytes``: back).

Decimal units are powers of ten (``kB``/``KB`` = 10^3, ``MB`` = 10^6, ``GB`` = 10^9 bytes), binary
units powers of two (``KiB`` = 2^10, ``MiB`` = 2^20, ``GiB`` = 2^30 bytes). A bare number is bytes.
A fractional number of bytes is rounded down: the budget is a ceiling, so rounding must never raise it.
"""
from __future__ import annotations

import math
import re

UNIT_BYTES: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}

MAX_BUDGET_BYTES = 10**18  # 1 EB: anything larger is a typo (1e300GB), not a device

_BUDGET_RE = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")


class BudgetError(ValueError):
    """A budget string that cannot be read."""


def parse_budget(budget: str | int | float) -> int:
    """Return the budget in whole bytes (rounded down).

    ``parse_budget("0.5MB") == 500000``, ``parse_budget("512KiB") == 524288``,
    ``parse_budget("300000") == 300000``, ``parse_budget(1.5e6) == 1500000``.
    """
    if isinstance(budget, bool):
        raise BudgetError(f"budget must be a number of bytes or a string like '0.5MB', got {budget!r}")
    if isinstance(budget, (int, float)):
        number, unit = float(budget), ""
        if isinstance(budget, int):
            if budget < 0:
                raise BudgetError(f"budget must not be negative, got {budget}")
            if budget > MAX_BUDGET_BYTES:
                raise BudgetError(f"budget {budget} is more than {MAX_BUDGET_BYTES:.0e} bytes (1 EB)")
            return int(budget)
    else:
        match = _BUDGET_RE.match(str(budget))
        if not match:
            raise BudgetError(
                f"cannot read the budget {budget!r}: write a number of bytes with an optional unit, "
                "e.g. 300000, 0.5MB (10^6 bytes) or 512KiB (2^10 bytes)"
            )
        number, unit = float(match["number"]), match["unit"]
    factor = UNIT_BYTES.get(unit.lower())
    if factor is None:
        raise BudgetError(
            f"unknown budget unit {unit!r} in {budget!r}: use one of B, kB, MB, GB (powers of 10) "
            "or KiB, MiB, GiB (powers of 2)"
        )
    if not math.isfinite(number) or number < 0:
        raise BudgetError(f"budget must be a finite, non-negative amount, got {budget!r}")
    n_bytes = number * factor
    if not math.isfinite(n_bytes) or n_bytes > MAX_BUDGET_BYTES:
        raise BudgetError(f"budget {budget!r} is more than {MAX_BUDGET_BYTES:.0e} bytes (1 EB); give a size a "
                          "device has, e.g. 0.5MB or 2GB")
    # round(…, 6) first so that 0.1MB does not become 99999 bytes through binary floating point.
    return int(math.floor(round(n_bytes, 6)))

