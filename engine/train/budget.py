"""``--budget`` for ASI (and LANCE): calibrate the trained layers on training batches, then pick the
exact rank choice under the budget (engine.calibration: spectra, perplexity, multiple-choice knapsack).

Runs on the same inputs the training sees (the cached prefix features when the cache is on), at the
training batch size, so the bytes the choice promises are those of a training step.
"""
from __future__ import annotations

import itertools
from typing import Any

from engine.train.config import ConfigError

BUDGET_CALIBRATION_BATCHES = 4


def ranks_for_budget(bench, wrapper, budget: str) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """({wrapped layer name: ranks}, info to store) for ``budget`` (e.g. ``"0.2MB"``)."""
    from engine.calibration.budget import parse_budget
    from engine.calibration.knapsack import InfeasibleBudget
    from engine.calibration.pipeline import calibrate_model
    from engine.calibration.selection import select_ranks
    from engine.train.data import CALIBRATION_EPOCH
    from engine.train.session import WRAP

    config = bench.config
    n = min(BUDGET_CALIBRATION_BATCHES, bench.steps_per_epoch)
    batches = [(x.to(config.device), y.to(config.device))
               for x, y in itertools.islice(bench.train(CALIBRATION_EPOCH), n)]
    names = [WRAP + name for name in bench.layer_names]
    result = calibrate_model(wrapper, batches, names, spectra_layers=names, device=config.device)
    try:
        selection = select_ranks(result, budget)
    except InfeasibleBudget as exc:
        raise ConfigError(f"--budget {budget}: {exc}") from None
    ranks = selection.ranks_by_layer()
    info = {
        "budget": budget, "budget_bytes": parse_budget(budget), "budget_total_bytes": selection.total_bytes,
        "budget_batch_size": selection.batch_size,
        "budget_choice": [{"layer": c.name[len(WRAP):], "eps": c.eps, "ranks": c.ranks, "bytes": c.bytes,
                           "relative_perplexity": c.relative_perplexity} for c in selection.layers],
    }
    return ranks, info
