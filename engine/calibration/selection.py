"""Rank selection under a memory budget: one ε per fine-tuned layer, exact optimum (methods.md §4).

``select_ranks(calibration, budget)`` reads a calibration (a :class:`CalibrationResult` or its JSON dict)
and solves the multiple-choice knapsack over its fine-tuned layers; ``select_ranks_from_arrays`` is the
same on plain arrays, for users with their own measurements.

Never worse than raw: where the uncompressed activation's bytes are known (``full_bytes``), every layer
also has the option "uncompressed" (cost ``full_bytes``, perplexity 0: the exact gradient; ``eps`` None,
ranks = the full input shape, ``stored == "raw"``), and an ε option that is not smaller than the raw
activation is dropped — the engine would store the activation for it anyway
(:func:`engine.methods.base.stores_raw`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from engine.calibration.budget import parse_budget
from engine.calibration.knapsack import InfeasibleBudget, solve_multiple_choice_knapsack
from engine.methods.base import stores_raw


@dataclass
class LayerChoice:
    """The choice for one layer: ``bytes`` stored for backward at ``ranks`` (ε = ``eps``) and its gradient error."""

    name: str
    eps: float | None
    ranks: list[int]
    bytes: int
    perplexity: float
    relative_perplexity: float | None = None
    full_bytes: int | None = None  # the uncompressed activation (what vanilla stores)
    stored: str = "compressed"     # "raw": the "uncompressed" option (eps None, ranks = the input shape)


@dataclass
class Selection:
    """An exact rank choice. ``total_bytes <= budget_bytes`` always; ``batch_size``: the batch the bytes are for."""

    budget_bytes: int
    total_bytes: int
    total_perplexity: float
    layers: list[LayerChoice]
    batch_size: int | None = None
    vanilla_bytes: int | None = None
    cost_unit_bytes: int = 1  # 1: exact at byte granularity (see solve_multiple_choice_knapsack)
    extra: dict = field(default_factory=dict)

    def ranks_by_layer(self) -> dict[str, tuple[int, ...]]:
        """``{layer: ranks}``: the ``options["ranks"]`` of ``compress_model(model, "asi", …)``."""
        return {c.name: tuple(c.ranks) for c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


def select_ranks_from_arrays(
    names: Sequence[str],
    eps_grid: Sequence[float],
    ranks: Sequence[Sequence[Sequence[int]]],
    bytes_: Sequence[Sequence[float]],
    perplexity: Sequence[Sequence[float]],
    budget: str | int | float,
    relative_perplexity: Sequence[Sequence[float]] | None = None,
    full_bytes: Sequence[int] | None = None,
    shapes: Sequence[Sequence[int]] | None = None,
) -> Selection:
    """Exact choice of one ε per layer minimising Σ perplexity with Σ bytes <= budget.

    ``ranks[i][j]``, ``bytes_[i][j]``, ``perplexity[i][j]``: layer ``i`` at ``eps_grid[j]``. Bytes are
    rounded up. ``full_bytes[i]``: layer ``i``'s raw activation at the same batch size; with it, options
    not smaller than raw are dropped and, given ``shapes[i]`` (the input shape, batch first), the
    "uncompressed" option is added (see the module doc). Raises :class:`InfeasibleBudget` (with the
    least feasible total) below that total.
    """
    budget_bytes = parse_budget(budget)
    n = len(names)
    for label, arr in (("ranks", ranks), ("bytes", bytes_), ("perplexity", perplexity)):
        if len(arr) != n or any(len(row) != len(eps_grid) for row in arr):
            raise ValueError(f"{label} must have one row per layer ({n}) and one entry per ε ({len(eps_grid)})")
    if n == 0:
        raise ValueError("no fine-tuned layers to choose ranks for: the calibration measured no perplexity")
    if shapes is not None and (full_bytes is None or len(shapes) != n):
        raise ValueError("shapes needs full_bytes and one input shape per layer")
    options = [_layer_options(i, eps_grid, ranks, bytes_, perplexity, relative_perplexity, full_bytes, shapes)
               for i in range(n)]
    solution = solve_multiple_choice_knapsack([[o["bytes"] for o in opts] for opts in options],
                                              [[o["perplexity"] for o in opts] for opts in options],
                                              budget_bytes, unit="bytes")
    layers = []
    for i, j in enumerate(solution.choices):
        o = options[i][j]
        layers.append(LayerChoice(
            name=names[i], eps=o["eps"], ranks=[int(r) for r in o["ranks"]],
            bytes=math.ceil(o["bytes"]), perplexity=float(o["perplexity"]),
            relative_perplexity=o["relative_perplexity"],
            full_bytes=None if full_bytes is None else int(full_bytes[i]), stored=o["stored"],
        ))
    return Selection(budget_bytes=budget_bytes, total_bytes=solution.total_cost,
                     total_perplexity=solution.total_value, layers=layers, cost_unit_bytes=solution.cost_unit,
                     vanilla_bytes=None if full_bytes is None else int(sum(full_bytes)))


def _layer_options(i, eps_grid, ranks, bytes_, perplexity, relative_perplexity, full_bytes, shapes) -> list[dict]:
    """Layer ``i``'s options: its ε choices smaller than raw, plus "uncompressed" where the shape is known."""
    options = [{"eps": float(eps_grid[j]), "ranks": ranks[i][j], "bytes": bytes_[i][j],
                "perplexity": float(perplexity[i][j]), "stored": "compressed",
                "relative_perplexity": None if relative_perplexity is None else float(relative_perplexity[i][j])}
               for j in range(len(eps_grid))]
    if full_bytes is None:
        return options
    raw = int(full_bytes[i])
    smaller = [o for o in options if not stores_raw(math.ceil(o["bytes"]), raw)]
    if shapes is not None:
        return smaller + [{"eps": None, "ranks": [int(d) for d in shapes[i]], "bytes": raw, "perplexity": 0.0,
                           "relative_perplexity": 0.0, "stored": "raw"}]
    return smaller or [min(options, key=lambda o: o["bytes"])]


def select_ranks(calibration: Any, budget: str | int | float) -> Selection:
    """Exact rank choice for the fine-tuned layers of a calibration (``CalibrationResult`` or its dict)."""
    data: Mapping = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    layers = [layer for layer in data["layers"] if layer.get("perplexity") is not None]
    if not layers:
        raise ValueError(
            "this calibration has no perplexity curves (no fine-tuned layers were measured): "
            "run `lance calibrate … --layers K` with K >= 1"
        )
    selection = select_ranks_from_arrays(
        names=[layer["name"] for layer in layers],
        eps_grid=data["eps_grid"],
        ranks=[layer["ranks"] for layer in layers],
        bytes_=[layer["bytes"] for layer in layers],
        perplexity=[layer["perplexity"] for layer in layers],
        budget=budget,
        relative_perplexity=[layer["relative_perplexity"] for layer in layers],
        full_bytes=[layer["full_bytes"] for layer in layers],
        shapes=[[int(data["batch_size"])] + [int(d) for d in layer["input_shape"][1:]] for layer in layers],
    )
    selection.batch_size = data.get("batch_size")
    return selection


__all__ = ["InfeasibleBudget", "LayerChoice", "Selection", "select_ranks", "select_ranks_from_arrays"]
