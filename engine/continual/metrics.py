"""Continual-learning metrics from an accuracy matrix.

``R[i, j]`` is the accuracy (in points, 0..100) on task ``j`` measured right after training task ``i``.
Only the lower triangle (``j <= i``) is ever filled: task-incremental runs evaluate the tasks seen so far.
Unfilled entries are ``NaN``.

Definitions (methods.md §5, the names Avalanche/Mammoth users know):

* ``ACC_t = mean_{j<=t} R[t, j]``                           average accuracy after task ``t``
* ``BWT_t = mean_{j<t} (R[t, j] - R[j, j])``                backward transfer (negative = forgetting)
* ``forgetting_t = mean_{j<t} (max_{l<t} R[l, j] - R[t, j])`` (Chaudhry et al. 2018)

After the first task BWT and forgetting are 0 by convention (no earlier task to forget).
"""
from __future__ import annotations

import math
from typing import Sequence

Matrix = Sequence[Sequence[float]]


def _check_row(acc_matrix: Matrix, t: int) -> None:
    if t < 0 or t >= len(acc_matrix):
        raise ValueError(f"task index {t} outside the accuracy matrix with {len(acc_matrix)} rows")
    row = acc_matrix[t]
    if len(row) <= t:
        raise ValueError(f"row {t} of the accuracy matrix has {len(row)} entries; it needs at least {t + 1}")
    for j in range(t + 1):
        value = row[j]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"accuracy on task {j} after task {t} is missing (R[{t}][{j}])")


def average_accuracy(acc_matrix: Matrix, t: int | None = None) -> float:
    """``ACC_t``: mean accuracy over tasks ``0..t`` after training task ``t`` (default: the last row)."""
    t = len(acc_matrix) - 1 if t is None else t
    _check_row(acc_matrix, t)
    return sum(float(acc_matrix[t][j]) for j in range(t + 1)) / (t + 1)


def backward_transfer(acc_matrix: Matrix, t: int | None = None) -> float:
    """``BWT_t``: mean over earlier tasks of (accuracy now - accuracy right after learning it)."""
    t = len(acc_matrix) - 1 if t is None else t
    _check_row(acc_matrix, t)
    if t == 0:
        return 0.0
    for j in range(t):
        _check_row(acc_matrix, j)
    return sum(float(acc_matrix[t][j]) - float(acc_matrix[j][j]) for j in range(t)) / t


def forgetting(acc_matrix: Matrix, t: int | None = None) -> float:
    """Average forgetting after task ``t``: mean over ``j < t`` of the best earlier accuracy minus now."""
    t = len(acc_matrix) - 1 if t is None else t
    _check_row(acc_matrix, t)
    if t == 0:
        return 0.0
    total = 0.0
    for j in range(t):
        best = max(float(acc_matrix[l][j]) for l in range(j, t))
        total += best - float(acc_matrix[t][j])
    return total / t


def summarize(acc_matrix: Matrix, t: int | None = None) -> dict[str, float]:
    """``{"ACC", "BWT", "forgetting"}`` after task ``t`` (points)."""
    return {
        "ACC": average_accuracy(acc_matrix, t),
        "BWT": backward_transfer(acc_matrix, t),
        "forgetting": forgetting(acc_matrix, t),
    }
