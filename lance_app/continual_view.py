"""All methods of a continual job side by side: a summary table, the accuracy matrices in one row,
accuracy on every task as tasks are learned. No Streamlit calls.

Inputs: the job's runs (store dicts, run order) and their metric frames (``figures.metrics_frame``,
split='task' rows ``acc/<j>``, ``ACC``, ``BWT``, ``forgetting``, ``peak_*_bytes``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lance_app.axes import method_colour, set_integer_axis
from lance_app.figures import BASE_LAYOUT, accuracy_matrix, latest_value, run_label, run_peaks

MATRICES_TITLE = "accuracy matrices R[i, j] (%), all methods"
TASKS_TITLE = "accuracy on each task as tasks are learned (%)"
SUMMARY_COLUMNS = ["method", "run", "status", "tasks done", "ACC %", "BWT", "forgetting",
                   "peak layer bytes", "peak region bytes", "step peak bytes", "layer bytes vs largest"]


def summary_frame(runs: Sequence[Mapping], frames: Mapping[str, pd.DataFrame],
                  n_tasks: int | None = None) -> pd.DataFrame:
    """One row per run: ACC / BWT / forgetting after its last task, its peaks over the tasks so far (bytes),
    and its layer peak as a fraction of the job's largest ("1/12×" = twelve times fewer bytes)."""
    rows = []
    for run in runs:
        df = frames.get(run["id"])
        m = accuracy_matrix(df)
        peaks = run_peaks(df)
        done = int(m.shape[0])
        rows.append({"method": run.get("method"), "run": run_label(run), "status": run.get("status"),
                     "tasks done": f"{done}/{n_tasks}" if n_tasks else str(done),
                     "ACC %": latest_value(df, "ACC", split="task"), "BWT": latest_value(df, "BWT", split="task"),
                     "forgetting": latest_value(df, "forgetting", split="task"),
                     "peak layer bytes": peaks["layer"], "peak region bytes": peaks["region"],
                     "step peak bytes": peaks["step peak"]})
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:-1])
    layer = pd.to_numeric(table["peak layer bytes"], errors="coerce")
    largest = layer.max() if layer.notna().any() else None
    table["layer bytes vs largest"] = [
        None if largest is None or not np.isfinite(v) or v <= 0 else
        ("1×" if v == largest else f"1/{largest / v:.1f}×") for v in layer.fillna(np.nan)]
    return table


def matrices_figure(runs: Sequence[Mapping], frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    """The runs' accuracy matrices as heatmaps in one row, one colour scale (0–100 %), one panel per run.

    Panel k: z[i][j] = accuracy on task j after training task i (None where not yet known); every panel
    spans the same task grid (the largest seen), so they line up.
    """
    mats = [accuracy_matrix(frames.get(r["id"])) for r in runs]
    n = max([max(m.shape) for m in mats if m.size] or [0])
    cols = max(1, len(runs))
    fig = make_subplots(rows=1, cols=cols, subplot_titles=[run_label(r) for r in runs] or [""],
                        horizontal_spacing=0.03, shared_yaxes=True)
    fig.update_layout(title=MATRICES_TITLE, **{**BASE_LAYOUT, "height": 340})
    for k, (run, m) in enumerate(zip(runs, mats)):
        full = np.full((n, n), np.nan)
        if m.size:
            full[: m.shape[0], : m.shape[1]] = m
        z = [[None if not np.isfinite(v) else float(v) for v in row] for row in full]
        text = [[f"{v:.0f}" if v is not None else "" for v in row] for row in z]
        fig.add_trace(go.Heatmap(z=z, x=[str(j) for j in range(n)], y=[str(i) for i in range(n)], text=text,
                                 texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=100,
                                 showscale=k == len(runs) - 1, name=run_label(run),
                                 colorbar=dict(title="%", len=0.9),
                                 hovertemplate="after task %{y}, on task %{x}: %{z:.1f} %<extra>" + run_label(run)
                                 + "</extra>"), row=1, col=k + 1)
        fig.update_xaxes(type="category", title_text="on task j", row=1, col=k + 1)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text="after task i", row=1, col=1)
    for a in fig.layout.annotations:
        a.font = dict(size=12)
    return fig


def tasks_figure(runs: Sequence[Mapping], frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    """One row of small panels: "ACC" (mean over tasks seen) then one panel per task j with R[i, j]
    against i ≥ j; one line per run in its method's colour (legend once)."""
    mats = [accuracy_matrix(frames.get(r["id"])) for r in runs]
    n = max([max(m.shape) for m in mats if m.size] or [0])
    titles = ["ACC (mean)"] + [f"task {j}" for j in range(n)]
    fig = make_subplots(rows=1, cols=n + 1, subplot_titles=titles, shared_yaxes=True, horizontal_spacing=0.02)
    fig.update_layout(title=TASKS_TITLE, **{**BASE_LAYOUT, "height": 300})
    for run, m in zip(runs, mats):
        if not m.size:
            continue
        label, colour = run_label(run), method_colour(run_label(run))
        acc = [float(np.nanmean(m[i, : i + 1])) for i in range(m.shape[0])]
        fig.add_trace(go.Scatter(x=list(range(m.shape[0])), y=acc, mode="lines+markers", name=label,
                                 legendgroup=label, line=dict(color=colour)), row=1, col=1)
        for j in range(m.shape[1]):
            xs = [i for i in range(j, m.shape[0]) if np.isfinite(m[i, j])]
            fig.add_trace(go.Scatter(x=xs, y=[float(m[i, j]) for i in xs], mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=False, line=dict(color=colour)),
                          row=1, col=j + 2)
    fig.update_yaxes(range=[0, 102])
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=1)
    set_integer_axis(fig, "x", list(range(max(1, n))), range=[-0.3, max(1, n) - 0.7])
    fig.update_xaxes(title_text="after task", row=1, col=1)
    for a in fig.layout.annotations:
        a.font = dict(size=11)
    return fig
