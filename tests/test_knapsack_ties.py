"""The knapsack's tie rule, brute-forced: the optimal value, and among optimal choices the cheapest."""
from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.calibration.knapsack import InfeasibleBudget, solve_multiple_choice_knapsack

# small integer values and costs: many exact ties, sums exact in floating point
GROUP = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), min_size=1, max_size=4)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.lists(GROUP, min_size=1, max_size=4), st.integers(0, 20))
def test_optimal_value_and_cheapest_among_ties(groups, budget):
    costs = [[c for c, _ in g] for g in groups]
    values = [[float(v) for _, v in g] for g in groups]
    feasible = [(sum(values[i][j] for i, j in enumerate(combo)), sum(costs[i][j] for i, j in enumerate(combo)))
                for combo in itertools.product(*[range(len(g)) for g in groups])]
    feasible = [(v, c) for v, c in feasible if c <= budget]
    try:
        got = solve_multiple_choice_knapsack(costs, values, budget)
    except InfeasibleBudget:
        assert not feasible
        return
    best_value = min(v for v, _ in feasible)
    cheapest = min(c for v, c in feasible if v == best_value)
    assert got.total_value == best_value
    assert got.total_cost == cheapest, (groups, budget, got)


def brute_force_best(costs, values, budget):
    """(optimal value, cheapest cost among the optimal choices) or None when nothing fits."""
    feasible = [(sum(values[i][j] for i, j in enumerate(combo)), sum(costs[i][j] for i, j in enumerate(combo)))
                for combo in itertools.product(*[range(len(g)) for g in costs])]
    feasible = [(v, c) for v, c in feasible if c <= budget]
    if not feasible:
        return None
    best_value = min(v for v, _ in feasible)
    return best_value, min(c for v, c in feasible if v == best_value)


def test_seeded_tied_instances_where_the_cut_once_kept_a_costlier_optimum():
    """3,000 seeded instances with few distinct values (many ties); before ties survived the
    branch-and-bound cut, 2 of them came back with an equal-value, costlier choice."""
    rng = random.Random(0)
    for _ in range(3000):
        costs = [[rng.randint(0, 30) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 5))]
        values = [[float(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])) for _ in g] for g in costs]
        budget = rng.randint(0, 80)
        expected = brute_force_best(costs, values, budget)
        if expected is None:
            continue
        got = solve_multiple_choice_knapsack(costs, values, budget)
        assert (got.total_value, got.total_cost) == expected, (costs, values, budget, got)
