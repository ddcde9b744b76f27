"""Calibration and memory budgets (methods.md §4): what a user looks at before fine-tuning.

- :func:`calibrate` — energy spectra of every compressible layer of a backbone on calibration
  batches of a dataset, perplexity curves (gradient error per ε) and bytes of the fine-tuned layers;
  cached as JSON under ``$LANCE_HOME/cache/calibration/``. :func:`calibrate_model` is the same on a
  model and batches you hold.
- :func:`select_ranks` — the exact rank choice under a memory budget (a multiple-choice knapsack);
  :func:`select_ranks_from_arrays` and :func:`solve_multiple_choice_knapsack` on plain arrays.
- :func:`parse_budget` — ``"0.5MB"`` (10^6), ``"512KiB"`` (2^10), ``"300000"`` → bytes.
"""
from engine.calibration.budget import BudgetError, parse_budget
from engine.calibration.knapsack import (
    InfeasibleBudget,
    KnapsackSolution,
    brute_force_multiple_choice_knapsack,
    solve_multiple_choice_knapsack,
)
from engine.calibration.pipeline import DEFAULT_EPS_GRID, CalibrationResult, calibrate, calibrate_model
from engine.calibration.selection import LayerChoice, Selection, select_ranks, select_ranks_from_arrays
from engine.calibration.spectra import collect_spectra

__all__ = [
    "BudgetError", "parse_budget",
    "InfeasibleBudget", "KnapsackSolution", "solve_multiple_choice_knapsack",
    "brute_force_multiple_choice_knapsack",
    "DEFAULT_EPS_GRID", "CalibrationResult", "calibrate", "calibrate_model",
    "LayerChoice", "Selection", "select_ranks", "select_ranks_from_arrays",
    "collect_spectra",
]
