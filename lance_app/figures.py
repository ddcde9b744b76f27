"""Figure builders: plain functions that take data and return plotly figures (no Streamlit).

Inputs are plain Python / numpy / pandas objects, so every builder is testable without a browser:
tests check ``fig.data[i].x / .y / .z`` against values computed by hand.

Metric rows follow the run store's long format (docs/CONTRACTS.md):
``{step, epoch, split, task, key, value}`` plus a ``label`` column added by :func:`metrics_frame`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

METRIC_COLUMNS = ["label", "run_id", "id", "step", "epoch", "split", "task", "key", "value"]
_LAYOUT = dict(margin=dict(l=50, r=20, t=40, b=40), height=320, legend=dict(orientation="h", y=-0.25))


def _figure(title: str, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **_LAYOUT)
    return fig


# -- metrics ---------------------------------------------------------------------------------------
def metrics_frame(rows: Iterable[Mapping], label: str = "", run_id: str = "") -> pd.DataFrame:
    """Metric rows (long format) -> DataFrame with the columns of METRIC_COLUMNS."""
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df["label"] = label if label else df["label"]
    if run_id:
        df["run_id"] = run_id
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    return df[METRIC_COLUMNS + [c for c in df.columns if c not in METRIC_COLUMNS]]


def metric_figure(df: pd.DataFrame, key: str, split: str | None = None, x: str = "step",
                  title: str | None = None, y_title: str | None = None, log_y: bool = False) -> go.Figure:
    """One line per ``label`` of metric ``key`` (optionally one ``split``) against ``x``.

    df: long-format metrics (see :func:`metrics_frame`); rows without ``x`` are dropped.
    """
    fig = _figure(title or key, x, y_title or key)
    if log_y:
        fig.update_yaxes(type="log")
    if df is None or df.empty:
        return fig
    sel = df[df["key"] == key]
    if split is not None:
        sel = sel[sel["split"] == split]
    sel = sel.dropna(subset=[x, "value"])
    # An epoch's summary row repeats the last step's (step, split, key); keep the per-step row.
    sel = sel.drop_duplicates(subset=["label", "key", "split", x], keep="first")
    for label, part in sel.groupby("label", sort=False):
        part = part.sort_values(x)
        fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), mode="lines+markers"
                                 if len(part) < 30 else "lines", name=str(label)))
    return fig


MEMORY_KEYS = (("layer_activation_bytes", "layer", "solid"),
               ("region_activation_bytes", "region", "dash"),
               ("peak_memory_bytes", "step peak", "dot"))
CONTINUAL_MEMORY_KEYS = (("peak_layer_activation_bytes", "layer", "solid"),
                         ("peak_region_activation_bytes", "region", "dash"),
                         ("peak_memory_bytes", "step peak", "dot"))


def memory_figure(df: pd.DataFrame, split: str = "train", x: str = "step",
                  keys: Sequence[tuple[str, str, str]] = MEMORY_KEYS,
                  title: str = "measured memory: layer bytes, region bytes, step peak") -> go.Figure:
    """Measured memory per run on one log axis: one colour per ``label``, one dash per quantity.

    ``keys``: (metric key, legend word, dash) triples; the default is a fine-tune run's per-step rows
    (saved bytes of the compressed layers, of the whole trained region, and the step's allocator peak).
    Trace names are ``"<label> · <word>"``; rows without ``x`` or value are dropped.
    """
    fig = _figure(title, x, "bytes")
    fig.update_yaxes(type="log")
    if df is None or df.empty:
        return fig
    sel = df[df["split"] == split] if split is not None else df
    sel = sel.dropna(subset=[x, "value"])
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for i, label in enumerate(dict.fromkeys(sel["label"].tolist())):
        colour = palette[i % len(palette)]
        for key, word, dash in keys:
            part = sel[(sel["label"] == label) & (sel["key"] == key)]
            part = part.drop_duplicates(subset=[x], keep="first").sort_values(x)
            if part.empty:
                continue
            fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), name=f"{label} · {word}",
                                     mode="lines+markers" if len(part) < 30 else "lines",
                                     line=dict(color=colour, dash=dash)))
    return fig


def run_peaks(df: pd.DataFrame | None) -> dict[str, float | None]:
    """A continual run's peaks over its tasks so far: {"layer", "region", "step peak"} -> max bytes or None."""
    out: dict[str, float | None] = {}
    for key, word, _ in CONTINUAL_MEMORY_KEYS:
        values = [] if df is None or df.empty else df[(df["key"] == key) & (df["split"] == "task")]["value"].dropna()
        out[word] = float(max(values)) if len(values) else None
    return out


def prefixed_metric_figure(df: pd.DataFrame, prefix: str, split: str | None = None, x: str = "step",
                           title: str | None = None, y_title: str | None = None,
                           log_y: bool = False) -> go.Figure:
    """One line per (label, key) for every key starting with ``prefix`` (e.g. ``rank/``).

    The trace name is ``label: key-without-prefix`` (just the key when there is one label).
    """
    fig = _figure(title or prefix.rstrip("/"), x, y_title or prefix.rstrip("/"))
    if log_y:
        fig.update_yaxes(type="log")
    if df is None or df.empty:
        return fig
    sel = df[df["key"].astype(str).str.startswith(prefix)]
    if split is not None:
        sel = sel[sel["split"] == split]
    sel = sel.dropna(subset=[x, "value"]).drop_duplicates(subset=["label", "key", "split", x], keep="first")
    many = sel["label"].nunique() > 1
    for (label, key), part in sel.groupby(["label", "key"], sort=False):
        part = part.sort_values(x)
        short = str(key)[len(prefix):]
        fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), mode="lines",
                                 name=f"{label}: {short}" if many else short))
    if len(fig.data) > 4:  # room for a long legend under the plot
        fig.update_layout(height=320 + 22 * ((len(fig.data) + 1) // 2), legend=dict(orientation="h", y=-0.3))
    return fig


def latest_value(df: pd.DataFrame, key: str, split: str | None = None, label: str | None = None):
    """The value of the newest row of ``key`` (by row order), or None."""
    if df is None or df.empty:
        return None
    sel = df[df["key"] == key]
    if split is not None:
        sel = sel[sel["split"] == split]
    if label is not None:
        sel = sel[sel["label"] == label]
    sel = sel.dropna(subset=["value"])
    return None if sel.empty else float(sel["value"].iloc[-1])


# -- spectra ---------------------------------------------------------------------------------------
def normalised_energy(singular_values: Sequence[float]) -> np.ndarray:
    """σ_k² / Σσ² for singular values sorted descending. Shape (D,)."""
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    energy = s ** 2
    total = energy.sum()
    return energy / total if total > 0 else np.zeros_like(energy)


def energy_figure(energies: Mapping[str, Sequence[float]], cumulative: bool = False,
                  eps_marks: Sequence[float] = (), title: str = "") -> go.Figure:
    """Per mode, normalised (or cumulative) energy against the rank index 1..D.

    energies: mode name -> normalised energies σ_k²/Σσ² in descending order (sum 1), e.g.
    ``ModeSpectrum.energy``; :func:`normalised_energy` makes them from singular values.
    eps_marks: horizontal guide lines (cumulative view only).
    """
    kind = "cumulative energy" if cumulative else "normalised energy σ²/Σσ²"
    fig = _figure(title or kind, "rank index (1 = largest)", kind)
    for mode, e in energies.items():
        e = np.asarray(e, dtype=np.float64)
        y = np.minimum(np.cumsum(e), 1.0) if cumulative else e
        fig.add_trace(go.Scatter(x=list(range(1, len(y) + 1)), y=y.tolist(), mode="lines+markers"
                                 if len(y) <= 64 else "lines", name=str(mode)))
    if any(len(e) > 64 for e in energies.values()):
        fig.update_xaxes(type="log")
    if cumulative:
        for eps in eps_marks:
            fig.add_hline(y=float(eps), line_dash="dot", line_width=1, opacity=0.5)
    return fig


def eps_heatmap_figure(layers: Sequence[str], eps_grid: Sequence[float], values, title: str,
                       colorbar_title: str = "", text_format: str = "{:.0f}") -> go.Figure:
    """Heatmap with one row per layer and one column per ε. values: shape (len(layers), len(eps))."""
    z = np.asarray(values, dtype=np.float64)
    if z.shape != (len(layers), len(eps_grid)):
        raise ValueError(f"values has shape {z.shape}, expected ({len(layers)}, {len(eps_grid)})")
    text = [[text_format.format(v) if np.isfinite(v) else "" for v in row] for row in z]
    fig = _figure(title, "ε (energy kept)", "layer")
    fig.add_trace(go.Heatmap(z=z.tolist(), x=[f"{e:g}" for e in eps_grid], y=list(layers),
                             text=text, texttemplate="%{text}", colorscale="Viridis",
                             colorbar=dict(title=colorbar_title)))
    fig.update_layout(height=max(260, 28 * len(layers) + 120))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def perplexity_figure(layers: Sequence[str], eps_grid: Sequence[float], values,
                      relative: bool = True) -> go.Figure:
    """One line per layer: weight-gradient error ("perplexity") against ε, log y axis.

    values: shape (len(layers), len(eps_grid)); relative -> ‖dW−dŴ‖/‖dW‖, else ‖dW−dŴ‖.
    """
    z = np.asarray(values, dtype=np.float64)
    y_title = "relative error ‖dW−dŴ‖/‖dW‖" if relative else "‖dW−dŴ‖_F"
    fig = _figure("perplexity of the fine-tuned layers", "ε (energy kept)", y_title)
    fig.update_yaxes(type="log")
    for name, row in zip(layers, z):
        fig.add_trace(go.Scatter(x=list(map(float, eps_grid)), y=row.tolist(), mode="lines+markers",
                                 name=str(name)))
    return fig


# -- budget ----------------------------------------------------------------------------------------
def budget_bars_figure(layers: Sequence[str], chosen_bytes: Sequence[float],
                       vanilla_bytes: Sequence[float] | None = None,
                       budget_bytes: float | None = None) -> go.Figure:
    """Bytes stored per layer for the chosen ranks (and vanilla beside it when given)."""
    fig = _figure("activation bytes per fine-tuned layer", "layer", "bytes")
    fig.add_trace(go.Bar(x=list(layers), y=[float(b) for b in chosen_bytes], name="chosen ranks"))
    if vanilla_bytes is not None:
        fig.add_trace(go.Bar(x=list(layers), y=[float(b) for b in vanilla_bytes], name="vanilla"))
        fig.update_yaxes(type="log")
    fig.update_layout(barmode="group")
    if budget_bytes is not None:
        fig.add_annotation(text=f"budget {format_bytes(budget_bytes)} (all layers)", xref="paper",
                           yref="paper", x=1, y=1.08, showarrow=False)
    return fig


def format_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units); None -> '–'."""
    if n is None or not np.isfinite(n):
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- continual -------------------------------------------------------------------------------------
def accuracy_matrix(df: pd.DataFrame) -> np.ndarray:
    """R[i, j] = accuracy on task j after training task i, from ``acc/<j>`` rows (split='task').

    Returns shape (n_tasks_done, n_tasks_seen) with NaN where nothing was written.
    """
    if df is None or df.empty:
        return np.zeros((0, 0))
    sel = df[(df["split"] == "task") & df["key"].astype(str).str.match(r"^acc/\d+$")]
    sel = sel.dropna(subset=["task", "value"])
    if sel.empty:
        return np.zeros((0, 0))
    rows = sel["task"].astype(int)
    cols = sel["key"].str.slice(4).astype(int)
    n = int(max(rows.max(), cols.max())) + 1
    m = np.full((int(rows.max()) + 1, n), np.nan)
    for i, j, v in zip(rows, cols, sel["value"]):
        m[i, j] = float(v)
    return m


def accuracy_matrix_figure(matrix, title: str = "accuracy matrix R[i, j] (%)") -> go.Figure:
    """Heatmap: row i = after training task i, column j = evaluated on task j."""
    z = np.asarray(matrix, dtype=np.float64)
    fig = _figure(title, "evaluated on task j", "after training task i")
    if z.size == 0:
        return fig
    text = [[f"{v:.1f}" if np.isfinite(v) else "" for v in row] for row in z]
    fig.add_trace(go.Heatmap(z=[[None if not np.isfinite(v) else float(v) for v in row] for row in z],
                             x=[str(j) for j in range(z.shape[1])], y=[str(i) for i in range(z.shape[0])],
                             text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=100))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def usage_figure(df: pd.DataFrame) -> go.Figure:
    """Per-layer subspace usage rank(P)/dim after each task (keys ``usage/<layer>``, split='task')."""
    fig = prefixed_metric_figure(df, "usage/", split="task", x="task",
                                 title="subspace usage per layer", y_title="rank(P) / dim")
    fig.update_yaxes(range=[0, 1.05])
    return fig


def run_label(run: Mapping) -> str:
    """Short human label of a run: '<method> #<last 6 of id>' (ids end in random hex)."""
    return f"{run.get('method', '?')} #{str(run.get('id', ''))[-6:]}"
