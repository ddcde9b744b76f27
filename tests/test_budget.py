"""Budget parsing and the exact multiple-choice knapsack (ASI's rank selection, methods.md §4)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.calibration.budget import BudgetError, parse_budget
from engine.calibration.knapsack import (
    InfeasibleBudget,
    brute_force_multiple_choice_knapsack,
    solve_multiple_choice_knapsack,
)
from engine.units import format_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.5MB", 500_000),
        ("512KiB", 524_288),
        ("300000", 300_000),
        ("1MiB", 1_048_576),
        ("1 MB", 1_000_000),
        ("0.1MB", 100_000),
        ("2kB", 2_000),
        ("1.5GiB", 1_610_612_736),
        ("1e6", 1_000_000),
        ("12.7", 12),  # fractional bytes round down: a budget is a ceiling
        (250_000, 250_000),
        (0.25e6, 250_000),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "abc", "-5MB", "5 XB", "5 k", "nan", True])
def test_parse_budget_rejects_with_help(text):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    assert "budget" in str(err.value)


def test_format_bytes():
    assert format_bytes(524288) == "524.3 kB"
    assert format_bytes(999) == "999 B"
    assert format_bytes(2_500_000) == "2.5 MB"


def _random_instance(rng, n_groups, n_options, integer_costs):
    if integer_costs:
        costs = [rng.integers(0, 60, size=n_options).tolist() for _ in range(n_groups)]
    else:
        costs = [(rng.random(n_options) * 60).tolist() for _ in range(n_groups)]
    # few distinct values so that ties happen too
    values = [rng.random(n_options).round(int(rng.integers(1, 4))).tolist() for _ in range(n_groups)]
    return costs, values


def test_solver_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(1234)
    checked = infeasible = 0
    for trial in range(400):
        n_groups, n_options = int(rng.integers(1, 7)), int(rng.integers(1, 7))
        costs, values = _random_instance(rng, n_groups, n_options, integer_costs=bool(trial % 2))
        budget = float(rng.random() * 60 * n_groups)
        try:
            expected = brute_force_multiple_choice_knapsack(costs, values, budget)
        except InfeasibleBudget as err:
            with pytest.raises(InfeasibleBudget) as got:
                solve_multiple_choice_knapsack(costs, values, budget)
            assert got.value.min_total_cost == err.min_total_cost
            infeasible += 1
            continue
        got = solve_multiple_choice_knapsack(costs, values, budget)
        assert got.total_value == pytest.approx(expected.total_value, abs=1e-9), (trial, costs, values, budget)
        assert got.total_cost <= budget
        # the reported totals are those of the reported choices, with costs rounded up
        assert got.total_cost == sum(int(np.ceil(costs[i][j])) for i, j in enumerate(got.choices))
        assert got.total_value == pytest.approx(sum(values[i][j] for i, j in enumerate(got.choices)))
        checked += 1
    assert checked > 250 and infeasible > 10


def test_costs_round_up_never_overshoot():
    # the reference DP rounds 1.2 down to 1 and would take both options of 1.2 with a budget of 2
    solution = solve_multiple_choice_knapsack([[0.0, 1.2], [0.0, 1.2]], [[1.0, 0.0], [1.0, 0.0]], 2)
    assert solution.total_cost <= 2
    assert sorted(solution.choices) == [0, 1]
    assert solve_multiple_choice_knapsack([[0.0, 1.2], [0.0, 1.2]], [[1.0, 0.0], [1.0, 0.0]], 4).choices == [1, 1]


def test_infeasible_budget_states_the_least_total():
    with pytest.raises(InfeasibleBudget) as err:
        solve_multiple_choice_knapsack([[100, 300], [250.5, 40]], [[1, 0], [0, 1]], 139)
    assert err.value.min_total_cost == 140
    assert "140 bytes" in str(err.value) and "139 bytes" in str(err.value)
    # exactly the least total is feasible
    assert solve_multiple_choice_knapsack([[100, 300], [250.5, 40]], [[1, 0], [0, 1]], 140).choices == [0, 1]


def test_bad_instances_are_rejected():
    with pytest.raises(ValueError, match="no options"):
        solve_multiple_choice_knapsack([[]], [[]], 10)
    with pytest.raises(ValueError, match="negative"):
        solve_multiple_choice_knapsack([[-1, 2]], [[0, 1]], 10)
    with pytest.raises(ValueError, match="values"):
        solve_multiple_choice_knapsack([[1, 2]], [[0]], 10)


def _rank_selection_like(rng, n_layers, n_eps):
    """Costs grow and errors fall with ε, as in real calibrations (bytes: integers, multiples of 4)."""
    costs, values = [], []
    for _ in range(n_layers):
        full_bytes = int(rng.integers(10_000, 3_000_000))
        frac = np.sort(rng.random(n_eps))
        costs.append((4 * np.ceil(frac * full_bytes / 4)).astype(int).tolist())
        values.append((np.sort(rng.random(n_eps))[::-1] * rng.random() * 10).tolist())
    return costs, values


def test_solver_64_layers_12_eps_within_budget_and_locally_optimal():
    """Its speed (median 0.02 s) is measured by `lance bench-calibration solver`, not asserted here."""
    rng = np.random.default_rng(7)
    for fraction in (0.05, 0.3, 0.6, 0.9):
        costs, values = _rank_selection_like(rng, 64, 12)
        least = sum(min(c) for c in costs)
        most = sum(max(c) for c in costs)
        budget = least + fraction * (most - least)
        solution = solve_multiple_choice_knapsack(costs, values, budget)
        assert solution.total_cost <= budget
        # optimality spot check: no single-layer change that stays within budget improves the value
        for i in range(64):
            for j in range(12):
                cost = solution.total_cost - costs[i][solution.choices[i]] + costs[i][j]
                if cost <= budget:
                    swapped = solution.total_value - values[i][solution.choices[i]] + values[i][j]
                    assert swapped >= solution.total_value - 1e-9


def test_hard_instances_fall_back_to_an_exact_coarser_unit():
    from engine.calibration.knapsack import FrontTooLarge

    rng = np.random.default_rng(5)
    for _ in range(5):
        costs = [rng.integers(10**6, 5 * 10**7, size=6).tolist() for _ in range(6)]
        values = [(-np.array(c) / 1e6).tolist() for c in costs]  # value linear in cost: subset sum
        least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
        budget = (least + most) // 2
        with pytest.raises(FrontTooLarge):
            solve_multiple_choice_knapsack(costs, values, budget, max_front=5, coarsen=False)
        got = solve_multiple_choice_knapsack(costs, values, budget, max_front=5)
        assert got.cost_unit > 1 and got.total_cost <= budget
        unit = got.cost_unit
        # exact on costs rounded up to the unit: equals brute force on those costs
        coarse = [[-(-c // unit) for c in group] for group in costs]
        brute = brute_force_multiple_choice_knapsack(coarse, values, budget // unit)
        assert got.total_value == pytest.approx(brute.total_value, abs=1e-9)
        exact = solve_multiple_choice_knapsack(costs, values, budget)  # default front limit: byte-exact
        assert exact.cost_unit == 1
        brute = brute_force_multiple_choice_knapsack(costs, values, budget)
        assert exact.total_value == pytest.approx(brute.total_value)
