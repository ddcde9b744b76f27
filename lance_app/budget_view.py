"""The Budget page's instrument: the exact Σ-perplexity-vs-budget front, the slider's budget grid, the
per-layer bars and the rank table. Plain functions (no Streamlit), tested on values.

Everything is at the **training** batch size ``batch_size`` (the plan's, engine.calibration.plan): per
fine-tuned layer the options are its calibration ε choices with ranks clipped to ``(batch_size, …)`` and
the bytes ASI and LANCE store for them, an ε option not smaller than the raw activation dropped (the
engine would store the activation), plus "uncompressed" (the raw activation, perplexity 0): the same
options :func:`engine.calibration.plan.solve_plan` hands to the exact knapsack.

The front: for every budget ``B`` the least Σ perplexity over choices with Σ bytes ≤ B is a staircase;
:func:`exact_front` returns its corners ``(bytes, Σ perplexity)`` (bytes rising, perplexity falling), by
merging the layers' options one layer at a time and keeping only the non-dominated sums (exact: a
dominated partial sum can never be part of a non-dominated total).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from engine.calibration.plan import ELEMENT_BYTES, Plan, clip_to_shape, stored_bytes
from engine.methods.base import stores_raw
from lance_app.figures import format_bytes

MODE_NAMES = {4: ["B", "C", "H", "W"], 3: ["B", "T", "C"], 2: ["B", "F"]}
_LAYOUT = dict(margin=dict(l=60, r=20, t=40, b=50), height=340, legend=dict(orientation="h", y=-0.28))


def mode_names(n_modes: int) -> list[str]:
    """Names of a layer input's modes: B/C/H/W for a conv input, B/F for a linear one (else m0, m1, …)."""
    return MODE_NAMES.get(n_modes, [f"m{i}" for i in range(n_modes)])


def layer_options(calibration: Mapping, batch_size: int) -> list[dict]:
    """Per fine-tuned layer ``{name, shape, full_bytes, options: [{eps, ranks, bytes, perplexity}]}`` at
    training batches of ``batch_size`` (the options solve_plan's knapsack chooses from)."""
    out = []
    grid = [float(e) for e in calibration["eps_grid"]]
    for layer in calibration["layers"]:
        if layer.get("perplexity") is None:
            continue
        shape = [int(batch_size), *[int(d) for d in layer["input_shape"][1:]]]
        full = math.prod(shape) * ELEMENT_BYTES
        options = []
        for eps, ranks, perp in zip(grid, layer["ranks"], layer["perplexity"]):
            r = clip_to_shape(ranks, shape)
            nbytes = stored_bytes(shape, r)
            if not stores_raw(nbytes, full):
                options.append({"eps": eps, "ranks": r, "bytes": nbytes, "perplexity": float(perp)})
        options.append({"eps": None, "ranks": list(shape), "bytes": full, "perplexity": 0.0})
        out.append({"name": layer["name"], "shape": shape, "full_bytes": full, "options": options})
    return out


def exact_front(layers: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Corners of the least-Σ-perplexity staircase: ``(bytes, perplexity)``, shapes ``(n,)`` each,
    bytes strictly rising, perplexity strictly falling. ``layers``: :func:`layer_options`' output."""
    cost = np.zeros(1, dtype=np.int64)
    value = np.zeros(1, dtype=np.float64)
    for layer in layers:
        c = np.array([o["bytes"] for o in layer["options"]], dtype=np.int64)
        v = np.array([o["perplexity"] for o in layer["options"]], dtype=np.float64)
        cost, value = _pareto((cost[:, None] + c[None, :]).ravel(), (value[:, None] + v[None, :]).ravel())
    return cost, value


def _pareto(cost: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((value, cost))  # by cost, then value
    cost, value = cost[order], value[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], value[:-1]]))
    keep = value < best_before
    return cost[keep], value[keep]


def front_value(front_bytes: np.ndarray, front_perplexity: np.ndarray, budget_bytes: int) -> float | None:
    """The least Σ perplexity within ``budget_bytes`` (None below the front's first corner)."""
    i = int(np.searchsorted(front_bytes, int(budget_bytes), side="right")) - 1
    return None if i < 0 else float(front_perplexity[i])


def budget_grid(least_bytes: int, most_bytes: int, n: int = 121) -> list[int]:
    """``n`` budgets spaced evenly in log from ``least_bytes`` to ``most_bytes`` (both included, whole
    bytes, strictly rising): the log-scaled slider's stops."""
    least, most = int(least_bytes), int(most_bytes)
    if most <= least:
        return [least]
    raw = np.geomspace(least, most, n)
    grid = sorted({least, most, *(int(round(x)) for x in raw)})
    return [g for g in grid if least <= g <= most]


def snap(grid: Sequence[int], budget_bytes: int) -> int:
    """The grid stop nearest to ``budget_bytes`` in log (clipped to the grid's range)."""
    arr = np.asarray(grid, dtype=float)
    b = min(max(float(budget_bytes), arr[0]), arr[-1])
    return int(grid[int(np.argmin(np.abs(np.log(arr) - math.log(max(b, 1.0)))))])


def front_figure(front_bytes: np.ndarray, front_perplexity: np.ndarray, *, chosen_bytes: int,
                 chosen_perplexity: float, budget_bytes: int, vanilla_bytes: int) -> go.Figure:
    """The exact front as a staircase (log x), the current choice marked, the budget as a dashed line.

    Traces: 0 = the front (x: corner bytes, y: Σ perplexity), 1 = the chosen plan (one point).
    """
    fig = go.Figure()
    x = [float(b) for b in front_bytes]
    y = [float(v) for v in front_perplexity]
    fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line_shape="hv", name="least Σ perplexity",
                             marker=dict(size=4), hovertemplate="%{x:,.0f} B → Σ perplexity %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[float(chosen_bytes)], y=[float(chosen_perplexity)], mode="markers",
                             name="this plan", marker=dict(size=14, symbol="star", color="crimson"),
                             hovertemplate="this plan: %{x:,.0f} B, Σ perplexity %{y:.4g}<extra></extra>"))
    fig.add_vline(x=float(budget_bytes), line_dash="dash", line_color="crimson",
                  annotation_text=f"budget {format_bytes(budget_bytes)}", annotation_position="top left")
    fig.add_vline(x=float(vanilla_bytes), line_dash="dot", line_color="grey",
                  annotation_text=f"vanilla {format_bytes(vanilla_bytes)}", annotation_position="top right")
    fig.update_layout(title="Σ perplexity against the budget (exact front)", **_LAYOUT)
    fig.update_xaxes(type="log", title="activation bytes stored by the fine-tuned layers (log)",
                     dtick=1, minor=dict(showgrid=False, ticks=""))
    fig.update_yaxes(title="Σ perplexity (weight-gradient error)", rangemode="tozero")
    return fig


def log_baseline(values: Sequence[float]) -> float:
    """The power of ten at or below the smallest positive value: where log-scaled bars start."""
    positive = [float(v) for v in values if v and v > 0]
    return 10.0 ** math.floor(math.log10(min(positive))) if positive else 1.0


def layer_bars_figure(layers: Sequence[str], chosen_bytes: Sequence[float],
                      vanilla_bytes: Sequence[float]) -> go.Figure:
    """Bytes per fine-tuned layer, this plan beside vanilla, on a log axis whose bars all start at one
    stated baseline (a power of ten below every value; said in the axis title).

    Traces: 0 = this plan, 1 = vanilla; each bar spans ``base`` → ``base + y`` = its bytes.
    """
    base = log_baseline([*chosen_bytes, *vanilla_bytes])
    fig = go.Figure()
    for name, values in (("this plan", chosen_bytes), ("vanilla", vanilla_bytes)):
        vals = [float(v) for v in values]
        fig.add_trace(go.Bar(x=list(layers), y=[v - base for v in vals], base=base, name=name,
                             customdata=vals, text=[format_bytes(v) for v in vals], textposition="outside",
                             hovertemplate="%{x}: %{customdata:,.0f} B<extra>" + name + "</extra>"))
    top = max([float(v) for v in (*chosen_bytes, *vanilla_bytes)] or [1.0])
    fig.update_layout(title="activation bytes per fine-tuned layer", barmode="group", **_LAYOUT)
    fig.update_yaxes(type="log", range=[math.log10(base), math.log10(top) + 0.35], dtick=1,
                     title=f"bytes (log; bars start at {format_bytes(base)})")
    fig.update_xaxes(title="layer")
    return fig


def rank_table(plan: Plan, method: str = "asi") -> pd.DataFrame:
    """One row per planned layer: ε, the rank of every mode (B/C/H/W…), bytes, vanilla bytes, ×, perplexity."""
    rows = []
    for layer in plan.per_layer:
        ranks = layer.ranks[method]
        row = {"layer": layer.name, "ε": "raw" if layer.eps is None else f"{layer.eps:g}"}
        row.update({m: int(r) for m, r in zip(mode_names(len(ranks)), ranks)})
        nbytes = int(layer.bytes[method])
        row.update({"bytes": nbytes, "vanilla bytes": int(layer.full_bytes),
                    "× smaller": round(layer.full_bytes / max(1, nbytes), 1),
                    "perplexity": layer.perplexity})
        rows.append(row)
    return pd.DataFrame(rows)
