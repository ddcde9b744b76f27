"""Calibration and memory budgets: spectra, perplexity, budget parsing, exact rank selection (methods.md §4)."""
from engine.calibration.budget import BudgetError, format_bytes, parse_budget
from engine.calibration.knapsack import InfeasibleBudget, KnapsackSolution, solve_multiple_choice_knapsack

__all__ = [
    "BudgetError", "format_bytes", "parse_budget",
    "InfeasibleBudget", "KnapsackSolution", "solve_multiple_choice_knapsack",
]
