"""Exact multiple-choice knapsack: pick one option per group, minimise the summed value, cost <= budget.

Pure numpy, no torch. Used for ASI's rank selection (methods.md §4): group = fine-tuned layer,
option = energy threshold ε, cost = bytes stored for backward, value = gradient error ("perplexity").

Algorithm: a Pareto-front merge. After processing groups ``0..i`` the front holds every reachable
(total cost, total value) pair that no other pair beats on both (cheaper-or-equal *and* better-or-equal);
merging the next group forms all sums, sorts them by cost and keeps the strict running minima of the
value. A pair that is dominated can never be part of an optimum that its dominator could not equally
reach, so the final front's best pair within budget is the exact optimum. Two exact prunings keep
the fronts small: (1) a partial cost that cannot be completed within budget even with the cheapest
option of every remaining group is dropped; (2) a partial value whose best possible completion — the
LP-relaxation lower bound of the remaining groups at the remaining budget — cannot beat a known
feasible solution (the incumbent: LP order, then greedy upgrades) is dropped; if nothing beats the
incumbent, it is the optimum. Costs are integers (rounded *up* from the inputs), so feasibility is
decided in exact integer arithmetic and the answer can never exceed the budget.

The problem contains subset sum, so no exact method is fast on every instance: when values are
almost linear in cost the fronts grow towards the number of distinct byte totals. Past
``max_front`` pairs the instance is re-solved exactly on costs rounded up to a coarser unit
(``KnapsackSolution.cost_unit``), which bounds the front by ``budget / cost_unit``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class InfeasibleBudget(ValueError):
    """The budget is below the least total cost that any choice reaches.

    Attributes: ``budget`` and ``min_total_cost`` in the caller's cost unit (bytes for rank selection).
    """

    def __init__(self, budget: int, min_total_cost: int, unit: str = "bytes"):
        self.budget = int(budget)
        self.min_total_cost = int(min_total_cost)
        self.unit = unit
        super().__init__(
            f"budget of {self.budget} {unit} is infeasible: the least total that fits is "
            f"{self.min_total_cost} {unit} (every layer at its cheapest choice); "
            f"raise the budget to at least {self.min_total_cost} {unit} or fine-tune fewer layers"
        )


@dataclass
class KnapsackSolution:
    """``choices[i]``: index of the option picked in group ``i``; totals over the picked options.

    ``cost_unit``: the granularity the optimum is exact at (1 = every whole byte; see
    :func:`solve_multiple_choice_knapsack` for when it is coarser). ``total_cost`` is always in
    whole input units (bytes), rounded up per option, and never exceeds the budget.
    """

    choices: list[int]
    total_cost: int
    total_value: float
    front_sizes: list[int] = field(default_factory=list)  # Pareto-front size after each group (diagnostics)
    cost_unit: int = 1


class FrontTooLarge(RuntimeError):
    """The Pareto front outgrew ``max_front`` (a subset-sum-like instance); retry with a coarser cost unit."""


DEFAULT_MAX_FRONT = 200_000
COARSE_FRONT = 100_000  # a coarse retry rounds costs up to budget / COARSE_FRONT units


def round_costs_up(costs: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Integer costs, rounded up (``ceil``) so that a solution within budget in integers is within it in reals."""
    out = []
    for i, group in enumerate(costs):
        arr = np.asarray(group, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"group {i} has no options: every group needs at least one")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"group {i} has a negative or non-finite cost: {arr.tolist()}")
        out.append(np.array([math.ceil(x) for x in arr.tolist()], dtype=np.int64))
    return out


def _check_values(values: Sequence[Sequence[float]], costs: list[np.ndarray]) -> list[np.ndarray]:
    if len(values) != len(costs):
        raise ValueError(f"costs has {len(costs)} groups but values has {len(values)}")
    out = []
    for i, (group, c) in enumerate(zip(values, costs)):
        arr = np.asarray(group, dtype=np.float64).reshape(-1)
        if arr.shape != c.shape:
            raise ValueError(f"group {i}: {c.size} costs but {arr.size} values")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"group {i} has a non-finite value: {arr.tolist()}")
        out.append(arr)
    return out


def _prune_group(cost: np.ndarray, value: np.ndarray, max_cost: int) -> np.ndarray:
    """Indices of the options worth keeping: affordable and not dominated within the group."""
    idx = np.nonzero(cost <= max_cost)[0]
    if idx.size == 0:
        return idx
    order = idx[np.lexsort((idx, value[idx], cost[idx]))]  # by cost, then value, then index
    v = value[order]
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = v[1:] < np.minimum.accumulate(v)[:-1]
    return order[keep]


def _lower_convex_hull(cost: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower convex hull of one group's (cost, value) points, sorted by cost (Pareto points as input)."""
    hull_c: list[float] = []
    hull_v: list[float] = []
    for c, v in zip(cost.tolist(), value.tolist()):
        while len(hull_c) >= 2:
            c1, v1, c2, v2 = hull_c[-2], hull_v[-2], hull_c[-1], hull_v[-1]
            # drop the middle point if it lies on or above the segment from point 1 to the new point
            if (v2 - v1) * (c - c1) >= (v - v1) * (c2 - c1):
                hull_c.pop()
                hull_v.pop()
            else:
                break
        hull_c.append(float(c))
        hull_v.append(float(v))
    return np.array(hull_c), np.array(hull_v)


class _LPBound:
    """LP-relaxation lower bounds of ``min Σ value`` over the suffixes ``groups[i:]``, as functions of budget.

    The relaxation of a multiple-choice knapsack is solved by taking every group's cheapest hull point
    and then buying hull segments in order of steepest value decrease per unit cost. The result is a
    convex, piecewise-linear, non-increasing function of the budget, evaluated with ``np.interp``;
    a budget below the cheapest total is infeasible (+inf). All segments are sorted by slope once;
    each suffix keeps those of its groups.
    """

    def __init__(self, hulls: list[tuple[np.ndarray, np.ndarray]]):
        n = len(hulls)
        base_cost = np.array([float(c[0]) for c, _ in hulls])
        base_value = np.array([float(v[0]) for _, v in hulls])
        self.suffix_cost = np.concatenate([np.cumsum(base_cost[::-1])[::-1], [0.0]])
        self.suffix_value = np.concatenate([np.cumsum(base_value[::-1])[::-1], [0.0]])
        dc = [np.diff(c) for c, _ in hulls]
        dv = [np.diff(v) for _, v in hulls]
        self.seg_group = np.concatenate([np.full(d.size, i) for i, d in enumerate(dc)]) if n else np.zeros(0, int)
        self.seg_dc = np.concatenate(dc) if n else np.zeros(0)
        self.seg_dv = np.concatenate(dv) if n else np.zeros(0)
        order = np.argsort(self.seg_dv / np.where(self.seg_dc > 0, self.seg_dc, 1.0), kind="stable")
        self.seg_group, self.seg_dc, self.seg_dv = self.seg_group[order], self.seg_dc[order], self.seg_dv[order]
        self._knots: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def knots(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        if start not in self._knots:
            keep = self.seg_group >= start
            cost = np.concatenate([[self.suffix_cost[start]], self.suffix_cost[start] + np.cumsum(self.seg_dc[keep])])
            value = np.concatenate([[self.suffix_value[start]],
                                    self.suffix_value[start] + np.cumsum(self.seg_dv[keep])])
            self._knots[start] = (cost, value)
        return self._knots[start]

    def __call__(self, start: int, budget: np.ndarray) -> np.ndarray:
        """Lower bound on the least ``Σ value`` of groups ``start..`` within ``budget`` (array)."""
        cost, value = self.knots(start)
        out = np.interp(budget, cost, value)
        return np.where(budget < cost[0], np.inf, out)

    def lp_order_choice(self, hulls, budget: int) -> list[int]:
        """The LP's greedy order, taking a hull segment only while it fits (a group whose next segment
        does not fit stops there). Returns the index of the chosen hull point per group."""
        pos = [0] * len(hulls)
        spent = float(self.suffix_cost[0])
        blocked = np.zeros(len(hulls), dtype=bool)
        for g, dc in zip(self.seg_group.tolist(), self.seg_dc.tolist()):
            if blocked[g]:
                continue
            if spent + dc <= budget:
                spent += dc
                pos[g] += 1
            else:
                blocked[g] = True
        return pos


def _incumbent(costs: list[np.ndarray], values: list[np.ndarray], hulls, bound: _LPBound,
               budget: int) -> tuple[float, list[int]]:
    """A feasible solution ``(value, choice per group)``, an upper bound on the optimum (the tighter the
    better for pruning): the LP-order choice, then repeated best value-per-byte upgrades that still fit."""
    n = len(costs)
    m = max(c.size for c in costs)
    cost = np.full((n, m), np.iinfo(np.int64).max // 4, dtype=np.int64)
    value = np.full((n, m), np.inf)
    for i, (c, v) in enumerate(zip(costs, values)):
        cost[i, : c.size], value[i, : v.size] = c, v
    pos = bound.lp_order_choice(hulls, budget)
    choice = np.array([int(np.flatnonzero((c == hc[p]) & (v == hv[p]))[0])
                       for c, v, (hc, hv), p in zip(costs, values, hulls, pos)])
    rows = np.arange(n)
    spent = int(cost[rows, choice].sum())
    for _ in range(n * m):
        dc = cost - cost[rows, choice][:, None]
        dv = value - value[rows, choice][:, None]
        ok = (dv < 0) & (dc <= budget - spent)
        if not ok.any():
            break
        ratio = np.where(ok, dv / np.maximum(dc, 1), np.inf)
        i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
        spent += int(dc[i, j])
        choice[i] = j
    return float(value[rows, choice].sum()), [int(j) for j in choice]


def solve_multiple_choice_knapsack(
    costs: Sequence[Sequence[float]],
    values: Sequence[Sequence[float]],
    budget: float,
    unit: str = "bytes",
    cost_unit: int = 1,
    max_front: int | None = DEFAULT_MAX_FRONT,
    coarsen: bool = True,
) -> KnapsackSolution:
    """Exact ``argmin Σ_i values[i][j_i]`` subject to ``Σ_i ceil(costs[i][j_i]) <= floor(budget)``.

    ``costs``/``values``: one sequence per group (ragged allowed), non-negative costs, finite values.
    Raises :class:`InfeasibleBudget` (with the least feasible total) when even the cheapest choice
    of every group exceeds the budget. Ties in value go to the cheaper, then lower-index, option.

    The problem is NP-hard in general (it contains subset sum); measured rank-selection instances
    keep fronts of a few hundred pairs. Should a front exceed ``max_front`` pairs (values almost
    linear in cost), the instance is solved again exactly on costs rounded *up* to
    ``cost_unit = ceil(budget / 100000)`` units (``coarsen=True``; the answer still never exceeds
    the budget and says its ``cost_unit``), or :class:`FrontTooLarge` is raised (``coarsen=False``).
    """
    int_costs = round_costs_up(costs)
    float_values = _check_values(values, int_costs)
    budget_int = int(math.floor(budget))
    n = len(int_costs)
    if n == 0:
        return KnapsackSolution([], 0, 0.0, [])
    min_total = int(sum(int(c.min()) for c in int_costs))
    if min_total > budget_int:
        raise InfeasibleBudget(budget_int, min_total, unit)
    try:
        return _solve(int_costs, float_values, budget_int, int(cost_unit), max_front)
    except FrontTooLarge:
        if not coarsen:
            raise
        coarse = max(int(cost_unit), math.ceil(budget_int / COARSE_FRONT))
        if sum(-(-int(c.min()) // coarse) for c in int_costs) > budget_int // coarse:
            raise FrontTooLarge(
                f"this instance is too hard to solve exactly at {cost_unit}-{unit} granularity and the budget "
                f"is too close to the least total ({min_total} {unit}) to coarsen it to {coarse} {unit}"
            ) from None
        return _solve(int_costs, float_values, budget_int, coarse, None)


def _solve(int_costs: list[np.ndarray], float_values: list[np.ndarray], budget_bytes: int, cost_unit: int,
           max_front: int | None) -> KnapsackSolution:
    """The Pareto-front merge on costs ``ceil(int_costs / cost_unit)`` and budget ``floor(budget / cost_unit)``."""
    n = len(int_costs)
    byte_costs = int_costs
    if cost_unit > 1:
        int_costs = [-(-c // cost_unit) for c in int_costs]
    budget_int = budget_bytes // cost_unit
    min_costs = np.array([int(c.min()) for c in int_costs], dtype=np.int64)
    min_total = int(min_costs.sum())
    if min_total > budget_int:  # only reachable through a coarse cost unit
        raise FrontTooLarge(f"infeasible at a cost unit of {cost_unit}")

    # Per-group pruning: unaffordable and dominated options go.
    kept_idx, kept_cost, kept_value = [], [], []
    for i in range(n):
        slack = budget_int - (min_total - int(min_costs[i]))
        idx = _prune_group(int_costs[i], float_values[i], slack)
        kept_idx.append(idx)
        kept_cost.append(int_costs[i][idx])
        kept_value.append(float_values[i][idx])

    # suffix_min_cost[i]: least cost of groups i..n-1; bound(i, b): LP lower bound for groups i..n-1.
    suffix_min_cost = np.zeros(n + 1, dtype=np.int64)
    suffix_min_cost[:n] = np.cumsum(min_costs[::-1])[::-1]
    hulls = [_lower_convex_hull(c, v) for c, v in zip(kept_cost, kept_value)]
    bound = _LPBound(hulls)
    incumbent, incumbent_choice = _incumbent(kept_cost, kept_value, hulls, bound, budget_int)
    # Branch and bound: a partial choice survives only if its best completion can match or beat the
    # incumbent (to within round-off), so a cheaper choice of equal value is never cut away.
    tolerance = 1e-9 * max(1.0, abs(incumbent))

    front_cost = np.zeros(1, dtype=np.int64)
    front_value = np.zeros(1, dtype=np.float64)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    front_sizes: list[int] = []
    for i in range(n):
        c, v = kept_cost[i], kept_value[i]
        m = c.size
        cand_cost = (front_cost[:, None] + c[None, :]).reshape(-1)
        cand_value = (front_value[:, None] + v[None, :]).reshape(-1)
        ok = cand_cost + suffix_min_cost[i + 1] <= budget_int
        if i + 1 < n:
            remaining = (budget_int - cand_cost).astype(np.float64)
            ok &= cand_value + bound(i + 1, remaining) <= incumbent + tolerance
        else:
            ok &= cand_value <= incumbent + tolerance  # ties with the incumbent stay: the cheapest of them wins
        flat = np.flatnonzero(ok)
        cand_cost, cand_value = cand_cost[flat], cand_value[flat]
        order = np.lexsort((flat, cand_value, cand_cost))
        cand_cost, cand_value, flat = cand_cost[order], cand_value[order], flat[order]
        keep = np.ones(flat.size, dtype=bool)
        if flat.size > 1:
            keep[1:] = cand_value[1:] < np.minimum.accumulate(cand_value)[:-1]
        flat = flat[keep]
        front_cost, front_value = cand_cost[keep], cand_value[keep]
        parents.append(flat // m)
        picks.append(flat % m)
        front_sizes.append(int(front_cost.size))
        if front_cost.size == 0:  # nothing beats the incumbent: it is optimal
            break
        if max_front is not None and front_cost.size > max_front:
            raise FrontTooLarge(f"Pareto front of {front_cost.size} pairs after group {i}")

    if front_cost.size == 0:
        choices = [int(kept_idx[i][j]) for i, j in enumerate(incumbent_choice)]
    else:
        best = int(np.argmin(front_value))  # fronts are sorted by cost: argmin takes the cheapest among ties
        choices = [0] * n
        k = best
        for i in range(n - 1, -1, -1):
            choices[i] = int(kept_idx[i][picks[i][k]])
            k = int(parents[i][k])
    total_cost = int(sum(int(byte_costs[i][j]) for i, j in enumerate(choices)))
    total_value = float(sum(float(float_values[i][j]) for i, j in enumerate(choices)))
    assert total_cost <= budget_bytes
    return KnapsackSolution(choices, total_cost, total_value, front_sizes, cost_unit)


def brute_force_multiple_choice_knapsack(costs, values, budget) -> KnapsackSolution:
    """Every combination, for tests and tiny instances only (``Π |group|`` evaluations)."""
    int_costs = round_costs_up(costs)
    float_values = _check_values(values, int_costs)
    budget_int = int(math.floor(budget))
    best = None
    for combo in itertools.product(*[range(c.size) for c in int_costs]):
        cost = sum(int(int_costs[i][j]) for i, j in enumerate(combo))
        if cost > budget_int:
            continue
        value = sum(float(float_values[i][j]) for i, j in enumerate(combo))
        if best is None or value < best.total_value or (value == best.total_value and cost < best.total_cost):
            best = KnapsackSolution(list(combo), cost, value)
    if best is None:
        raise InfeasibleBudget(budget_int, int(sum(int(c.min()) for c in int_costs)))
    return best
