"""Plans: the exact rank choice that a fine-tuning run trains, for a stated training batch size.

A calibration (``lance calibrate``) measures, per fine-tuned layer and per ε of its grid, the ranks and
the weight-gradient error ("perplexity") on calibration batches. A *plan* turns it into what trains:

- the ranks of every ε, clipped to the **training** input shape ``(batch_size, …)`` (a mode whose rank
  reaches its size is kept whole);
- the bytes each choice stores for backward **at that batch size** (:func:`stored_bytes`: Tucker core +
  factors, methods.md §1; the same figure the engine's ASI and LANCE layers save and the saved-bytes
  meter measures, factors included);
- the exact multiple-choice knapsack (:func:`engine.calibration.selection.select_ranks_from_arrays`)
  over those bytes and the calibration's perplexities, under the budget.

ASI and LANCE are both Tucker methods and store the same core + factors for the same ranks, so a plan
gives one rank tuple per layer to each of them (``ranks[method]``), and ``plan_total_bytes`` is the sum
of the chosen layers' bytes. The perplexities are those measured at the calibration batch size.

File format (JSON, ``format = "lance-plan"``, ``version = 1``)::

    {format, version, backbone, weights, dataset, resolution, layers: [names], batch_size,
     budget, budget_bytes, plan_total_bytes, vanilla_bytes, methods: ["asi", "lance"],
     per_layer: [{name, eps, input_shape, ranks: {method: [r...]}, bytes: {method: n}, full_bytes,
                  perplexity, relative_perplexity, stored: "compressed" | "raw"}],
     calibration: {path, cache_key, created_at, batch_size, batches, eps_grid, seed}, source, created_at}

:func:`solve_plan` builds one, :func:`check_plan` refuses one that does not match a run, ``Plan.save`` /
:func:`load_plan` write and read it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from engine.calibration.budget import parse_budget
from engine.calibration.selection import select_ranks_from_arrays
from engine.functional import tucker_bytes

PLAN_FORMAT = "lance-plan"
PLAN_VERSION = 1
PLAN_METHODS = ("asi", "lance")
ELEMENT_BYTES = 4  # float32 activations


class PlanError(ValueError):
    """A plan that cannot be read, or that does not match the run it is given to (the message says why)."""


def stored_bytes(shape: Sequence[int], ranks: Sequence[int], element_bytes: int = ELEMENT_BYTES) -> int:
    """Bytes ASI and LANCE save for backward for an input of ``shape`` at ``ranks`` (core + factors)."""
    return int(tucker_bytes(list(shape), list(ranks), element_bytes))


def clip_to_shape(ranks: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Ranks no larger than the mode sizes (a mode at full rank is kept whole)."""
    return [max(1, min(int(r), int(d))) for r, d in zip(ranks, shape)]


@dataclass
class PlanLayer:
    """One layer of a plan: ranks and stored bytes per method at the plan's batch size."""

    name: str
    eps: float | None                 # the calibration ε chosen (None: not from an ε, e.g. uncompressed)
    input_shape: list[int]            # (batch_size, …): the training input of this layer
    ranks: dict[str, list[int]]       # method -> ranks per mode (batch first)
    bytes: dict[str, int]             # method -> bytes stored for backward at these ranks
    full_bytes: int                   # the uncompressed input (what vanilla stores)
    perplexity: float | None = None
    relative_perplexity: float | None = None
    stored: str = "compressed"        # "raw": the "uncompressed" option (ranks = the input shape, exact)


@dataclass
class Plan:
    """A rank choice per layer for ASI and LANCE, for training batches of ``batch_size``."""

    backbone: str | None
    dataset: str | None
    layers: list[str]
    batch_size: int
    per_layer: list[PlanLayer]
    plan_total_bytes: int
    budget: str | None = None
    budget_bytes: int | None = None
    vanilla_bytes: int | None = None
    weights: str | None = None
    resolution: int | None = None
    methods: list[str] = field(default_factory=lambda: list(PLAN_METHODS))
    cost_unit_bytes: int = 1                          # 1: the knapsack is exact at byte granularity
    calibration: dict = field(default_factory=dict)   # where the plan came from
    source: str = ""
    created_at: str = ""
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    def ranks_for(self, method: str) -> dict[str, tuple[int, ...]]:
        """``{layer: ranks}`` for ``method``: the ``options["ranks"]`` of ``compress_model``."""
        self._check_method(method)
        return {layer.name: tuple(layer.ranks[method]) for layer in self.per_layer}

    def total_bytes_for(self, method: str) -> int:
        self._check_method(method)
        return int(sum(layer.bytes[method] for layer in self.per_layer))

    def _check_method(self, method: str) -> None:
        if method not in self.methods:
            raise PlanError(f"this plan has ranks for {', '.join(self.methods)}, not for {method!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError("not a plan: it has no \"format\": \"lance-plan\"; make one with "
                            "`lance ranks --calibration CALIB.json --budget X --batch-size B --json PLAN.json`")
        if int(data.get("version", 0)) != PLAN_VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (this engine reads "
                            f"version {PLAN_VERSION}); make it again with `lance ranks … --json PLAN.json`")
        try:
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            known["per_layer"] = [PlanLayer(**{k: v for k, v in layer.items()
                                               if k in PlanLayer.__dataclass_fields__})
                                  for layer in data["per_layer"]]
            plan = cls(**known)
        except (KeyError, TypeError) as exc:
            raise PlanError(f"plan is incomplete: {exc}") from None
        for layer in plan.per_layer:
            for method in plan.methods:
                ranks = layer.ranks.get(method) if isinstance(layer.ranks, dict) else None
                if not isinstance(ranks, list) or not ranks or \
                        not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
                    raise PlanError(f"plan layer {layer.name!r}: ranks for {method} are {ranks!r}, "
                                    "not a list of whole numbers >= 1")
        if [layer.name for layer in plan.per_layer] != list(plan.layers):
            raise PlanError("plan is inconsistent: its per-layer entries do not list its layers in order")
        return plan


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (raises :class:`PlanError` with what to do)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {p} does not exist; make one with "
                        "`lance ranks --calibration CALIB.json --budget X --json PLAN.json`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"plan file {p} is not readable JSON: {exc}") from None
    try:
        return Plan.from_dict(data)
    except PlanError as exc:
        raise PlanError(f"{p}: {exc}") from None


def is_plan_file(path: str | Path) -> bool:
    """True when ``path`` holds JSON with ``"format": "lance-plan"`` (False when unreadable or other JSON)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == PLAN_FORMAT


def calibration_source(data: Mapping, path: str | Path | None = None) -> dict[str, Any]:
    """What identifies the calibration a plan came from (stored in the plan and with the runs)."""
    config = data.get("config") or {}
    timing = data.get("timing") or {}
    return {"path": None if path is None else str(Path(path).expanduser().resolve()),
            "cache_key": data.get("cache_key"), "created_at": data.get("created_at"),
            "batch_size": data.get("batch_size"), "batches": timing.get("batches", config.get("batches")),
            "eps_grid": list(data.get("eps_grid") or []), "seed": config.get("seed"),
            "backbone": config.get("backbone"), "dataset": config.get("dataset")}


def solve_plan(calibration: Any, budget: str | int | float, batch_size: int, *, source: str = "",
               calibration_path: str | Path | None = None) -> Plan:
    """The exact plan for ``budget`` at training batches of ``batch_size``.

    ``calibration``: a :class:`~engine.calibration.pipeline.CalibrationResult` or its dict. Ranks per ε
    come from the calibration, clipped to ``(batch_size, …)``; bytes are recomputed at that batch size;
    the knapsack minimises Σ perplexity with Σ bytes ≤ budget. Raises
    :class:`~engine.calibration.knapsack.InfeasibleBudget` (it states the least total that fits),
    ``BudgetError`` for an unreadable budget, ``ValueError`` for a calibration without fine-tuned layers.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the training batch size must be a whole number >= 1, got {batch_size!r}")
    data: Mapping = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    tuned = [layer for layer in data["layers"] if layer.get("perplexity") is not None]
    if not tuned:
        raise ValueError("this calibration has no perplexity curves (no fine-tuned layers were measured): "
                         "run `lance calibrate … --layers K` with K >= 1")
    grid = [float(e) for e in data["eps_grid"]]
    shapes = [[batch_size, *[int(d) for d in layer["input_shape"][1:]]] for layer in tuned]
    ranks = [[clip_to_shape(r, shape) for r in layer["ranks"]] for layer, shape in zip(tuned, shapes)]
    costs = [[stored_bytes(shape, r) for r in rows] for rows, shape in zip(ranks, shapes)]
    full = [math.prod(shape) * ELEMENT_BYTES for shape in shapes]
    selection = select_ranks_from_arrays(
        names=[layer["name"] for layer in tuned], eps_grid=grid, ranks=ranks, bytes_=costs,
        perplexity=[layer["perplexity"] for layer in tuned], budget=budget,
        relative_perplexity=[layer["relative_perplexity"] for layer in tuned]
        if all(layer.get("relative_perplexity") for layer in tuned) else None,
        full_bytes=full, shapes=shapes)
    per_layer = []
    for choice, shape, full_bytes in zip(selection.layers, shapes, full):
        chosen = clip_to_shape(choice.ranks, shape)
        nbytes = stored_bytes(shape, chosen)
        per_layer.append(PlanLayer(
            name=choice.name, eps=choice.eps, input_shape=shape,
            ranks={m: list(chosen) for m in PLAN_METHODS}, bytes={m: nbytes for m in PLAN_METHODS},
            full_bytes=int(full_bytes), perplexity=choice.perplexity,
            relative_perplexity=choice.relative_perplexity, stored=getattr(choice, "stored", "compressed")))
    config = data.get("config") or {}
    total = int(sum(layer.bytes[PLAN_METHODS[0]] for layer in per_layer))
    assert total <= selection.budget_bytes
    return Plan(
        backbone=config.get("backbone"), dataset=config.get("dataset"),
        weights=None if config.get("weights") in (None, "None") else str(config.get("weights")),
        resolution=config.get("resolution"), layers=[layer.name for layer in per_layer], batch_size=batch_size,
        per_layer=per_layer, plan_total_bytes=total, budget=str(budget), budget_bytes=parse_budget(budget),
        vanilla_bytes=int(sum(full)), cost_unit_bytes=int(selection.cost_unit_bytes),
        calibration=calibration_source(data, calibration_path), source=source,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def check_plan(plan: Plan, *, backbone: str, layers: Sequence[str], batch_size: int,
               resolution: int | None = None, where: str = "the plan") -> None:
    """Refuse a plan made for another run: backbone, trained layers, batch size (and resolution when known).

    Raises :class:`PlanError` naming what differs and how to make a matching plan.
    """
    problems = []
    if plan.backbone is not None and plan.backbone != backbone:
        problems.append(f"it is for backbone {plan.backbone!r}, this run trains {backbone!r}")
    if list(plan.layers) != list(layers):
        problems.append(f"it plans layers {', '.join(plan.layers)}; this run trains {', '.join(layers)}")
    if int(plan.batch_size) != int(batch_size):
        problems.append(f"it is for training batches of {plan.batch_size}; this run uses --batch-size {batch_size}")
    if resolution is not None and plan.resolution is not None and int(plan.resolution) != int(resolution):
        problems.append(f"it is for {plan.resolution} px inputs; this run uses {resolution} px")
    if problems:
        raise PlanError(f"{where} does not match this run: " + "; ".join(problems) +
                        ". Make a matching plan with `lance ranks --calibration CALIB.json --budget X "
                        f"--batch-size {batch_size} --json PLAN.json` (calibrated with `lance calibrate "
                        f"--backbone {backbone} --layers {len(layers)}`)")


def check_calibration(calibration: Any, *, backbone: str, layers: Sequence[str], resolution: int | None = None,
                      where: str = "the calibration") -> None:
    """Refuse a calibration of another backbone, other fine-tuned layers or another resolution."""
    data: Mapping = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    config = data.get("config") or {}
    tuned = [layer["name"] for layer in data["layers"] if layer.get("perplexity") is not None]
    problems = []
    if config.get("backbone") not in (None, backbone):
        problems.append(f"it calibrated backbone {config.get('backbone')!r}, this run trains {backbone!r}")
    if tuned != list(layers):
        problems.append(f"it measured layers {', '.join(tuned) or '(none)'}; this run trains {', '.join(layers)}")
    res = config.get("resolution")
    if resolution is not None and res is not None and int(res) != int(resolution):
        problems.append(f"it ran at {res} px; this run uses {resolution} px")
    if problems:
        raise PlanError(f"{where} does not match this run: " + "; ".join(problems) +
                        f". Calibrate again with `lance calibrate --backbone {backbone} --layers {len(layers)} "
                        "--dataset D --out CALIB.json`")


__all__ = [
    "PLAN_FORMAT",
    "PLAN_METHODS",
    "PLAN_VERSION",
    "Plan",
    "PlanError",
    "PlanLayer",
    "calibration_source",
    "check_calibration",
    "check_plan",
    "clip_to_shape",
    "is_plan_file",
    "load_plan",
    "solve_plan",
    "stored_bytes",
]
