"""What ASI and LANCE train with in one ``lance finetune`` command: a plan (engine.calibration.plan).

Resolved once per command, before any run is created, so a mismatched plan or an infeasible budget
creates no run:

- ``--ranks PLAN.json``: the plan file, checked against the run (backbone, trained layers, batch size,
  resolution). A plain ``{layer: [ranks]}`` mapping is still accepted (your own ranks: only the layer
  names can be checked, and it has no ``plan_total_bytes``).
- ``--budget X --calibration CALIB.json``: the calibration file (checked: backbone, fine-tuned layers,
  resolution), solved for ``X`` at the run's ``--batch-size``.
- ``--budget X`` alone: one calibration with exactly ``lance calibrate``'s defaults (its ε grid, 2
  batches of 64 from the training split, the run's backbone, weights, seed, resolution and data root;
  the same cache), solved at the run's batch size. Nothing else re-calibrates.

The same budget gives the same plan to ASI and to LANCE. LANCE still fits its factors to the data
(``--calibration-batches`` training batches) *at the plan's ranks*; the ranks are never re-chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from engine.calibration import DEFAULT_EPS_GRID, BudgetError, CalibrationResult, InfeasibleBudget, calibrate
from engine.calibration.plan import (
    Plan,
    PlanError,
    check_calibration,
    check_plan,
    is_plan_file,
    load_plan,
    solve_plan,
)
from engine.data.errors import DatasetMissing
from engine.models.weights import WeightsMissing
from engine.train.config import ConfigError, FinetuneConfig, load_ranks_file

# ``lance calibrate``'s defaults (engine/cli/calibrate.py): the calibration a plain --budget runs.
DEFAULT_CALIBRATION_BATCHES = 2
DEFAULT_CALIBRATION_BATCH_SIZE = 64


@dataclass
class MethodPlan:
    """Fixed ranks for one method (names of the full model) and what to record about where they came from."""

    ranks: dict[str, tuple[int, ...]]
    plan: Plan | None = None
    info: dict[str, Any] = field(default_factory=dict)


def plan_info(plan: Plan, method: str, source: str) -> dict[str, Any]:
    """The plan as recorded with a run (config.json ``method_info`` and the summary)."""
    return {"plan_source": source, "plan_total_bytes": plan.total_bytes_for(method),
            "plan_batch_size": plan.batch_size, "budget": plan.budget, "budget_bytes": plan.budget_bytes,
            "plan_ranks": {layer.name: list(layer.ranks[method]) for layer in plan.per_layer},
            "plan_layer_bytes": {layer.name: int(layer.bytes[method]) for layer in plan.per_layer},
            "plan_eps": {layer.name: layer.eps for layer in plan.per_layer},
            "plan_calibration": dict(plan.calibration)}


def default_calibration(config: FinetuneConfig, log: Callable[[str], None] = lambda s: None):
    """``lance calibrate``'s default calibration of the run's backbone and last ``config.layers`` layers."""
    log(f"--budget without --calibration: calibrating {config.backbone} on {config.dataset} once with "
        f"`lance calibrate`'s defaults ({DEFAULT_CALIBRATION_BATCHES} batches of {DEFAULT_CALIBRATION_BATCH_SIZE}, "
        f"{len(DEFAULT_EPS_GRID)} ε), or reading its cache")
    try:
        return calibrate(config.backbone, weights=config.weights, dataset=config.dataset, layers_k=config.layers,
                         eps_grid=DEFAULT_EPS_GRID, batches=DEFAULT_CALIBRATION_BATCHES,
                         batch_size=DEFAULT_CALIBRATION_BATCH_SIZE, resolution=config.resolution, seed=config.seed,
                         data_root=config.data_root, device=None if config.device == "cpu" else config.device)
    except (DatasetMissing, WeightsMissing, ValueError, KeyError) as exc:
        raise ConfigError(f"--budget: the calibration failed: {str(exc).strip(chr(39))}") from None


def resolve_plans(config: FinetuneConfig, layer_names: Sequence[str], resolution: int | None,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, MethodPlan]:
    """``{method: MethodPlan}`` for every method with ``--ranks`` or ``--budget``; raises ConfigError."""
    layers = list(layer_names)
    out: dict[str, MethodPlan] = {}
    files: dict[str, Plan] = {}
    for method, path in config.ranks.items():
        if is_plan_file(path):
            try:
                plan = files.get(path) or load_plan(path)
                check_plan(plan, backbone=config.backbone, layers=layers, batch_size=config.batch_size,
                           resolution=resolution, where=f"--ranks {path}")
                plan.ranks_for(method)
            except PlanError as exc:
                raise ConfigError(str(exc)) from None
            files[path] = plan
            out[method] = MethodPlan(plan.ranks_for(method), plan, plan_info(plan, method, f"ranks file {path}"))
            continue
        table = load_ranks_file(path)
        missing = [n for n in layers if n not in table]
        if missing:
            raise ConfigError(f"--ranks file {path} has no ranks for {', '.join(missing)}; "
                              f"it must list every trained layer: {', '.join(layers)}")
        out[method] = MethodPlan({n: tuple(table[n]) for n in layers}, None,
                                 {"ranks_file": path, "plan_source": f"ranks mapping {path}"})
    if not config.budget:
        return out
    if config.calibration:
        try:
            calibration = CalibrationResult.load(config.calibration)
            check_calibration(calibration, backbone=config.backbone, layers=layers, resolution=resolution,
                              where=f"--calibration {config.calibration}")
        except (FileNotFoundError, ValueError) as exc:  # PlanError is a ValueError
            raise ConfigError(str(exc)) from None
        source = f"budget with calibration file {config.calibration}"
    else:
        calibration = default_calibration(config, log)
        try:
            check_calibration(calibration, backbone=config.backbone, layers=layers, resolution=resolution)
        except PlanError as exc:
            raise ConfigError(str(exc)) from None
        source = "budget with `lance calibrate`'s default calibration"
    solved: dict[str, Plan] = {}
    for method, budget in config.budget.items():
        if budget not in solved:
            try:
                solved[budget] = solve_plan(calibration, budget, config.batch_size, source=source,
                                            calibration_path=config.calibration)
            except InfeasibleBudget as exc:
                raise ConfigError(f"--budget {budget}: {exc} (for training batches of {config.batch_size})") from None
            except BudgetError as exc:
                raise ConfigError(f"--budget {budget}: {exc}") from None
        plan = solved[budget]
        out[method] = MethodPlan(plan.ranks_for(method), plan, plan_info(plan, method, source))
    return out
