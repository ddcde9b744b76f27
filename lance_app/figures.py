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
from plotly.subplots import make_subplots

from lance_app.axes import (
    DASHES,
    MODE_COLOURS,
    method_colour,
    method_of,
    mode_names,
    set_integer_axis,
    set_log_axis,
    short_layer_names,
)

METRIC_COLUMNS = ["label", "run_id", "id", "step", "epoch", "split", "task", "key", "value"]
_LAYOUT = dict(margin=dict(l=50, r=20, t=40, b=40), height=320, legend=dict(orientation="h", y=-0.25))
BASE_LAYOUT = _LAYOUT  # (for the other figure modules)


def _figure(title: str, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **_LAYOUT)
    return fig


def is_empty(fig: go.Figure) -> bool:
    """True when no trace has a point (the page shows a message instead of bare axes)."""
    for trace in fig.data:
        for attr in ("x", "y", "z"):
            values = getattr(trace, attr, None)
            if values is not None and len(values):
                return False
    return True


def unit_of(key: str) -> str:
    """The unit a metric key carries: 'B' for ``*_bytes``, 'ms' for ``*_ms``, else ''."""
    key = str(key)
    return "B" if key.endswith("bytes") else ("ms" if key.endswith("_ms") else "")


def _line_styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """label -> (colour of its method, dash): a second run of the same method gets the next dash."""
    seen: dict[str, int] = {}
    out = {}
    for label in labels:
        method = method_of(label)
        out[label] = (method_colour(label), DASHES[seen.get(method, 0) % len(DASHES)])
        seen[method] = seen.get(method, 0) + 1
    return out


def _finish_axes(fig: go.Figure, x: str, xs: Sequence, ys: Sequence, log_y: bool, unit: str = "") -> None:
    if log_y:
        set_log_axis(fig, "y", ys, unit)
    if x in ("task", "epoch"):
        set_integer_axis(fig, "x", xs)


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
    Colour = the run's method (:data:`lance_app.axes.METHOD_COLOURS`), a second run of a method dashed;
    ``log_y`` labels powers of ten only; ``x`` = task or epoch gets whole-number ticks.
    """
    unit = unit_of(key)
    fig = _figure(title or key, x, y_title or ("bytes" if unit == "B" else key))
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
    styles = _line_styles(list(dict.fromkeys(sel["label"].tolist())))
    for label, part in sel.groupby("label", sort=False):
        part = part.sort_values(x)
        colour, dash = styles[label]
        fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), mode="lines+markers"
                                 if len(part) < 30 else "lines", name=str(label), legendgroup=str(label),
                                 line=dict(color=colour, dash=dash), marker=dict(color=colour)))
    _finish_axes(fig, x, sel[x].tolist(), sel["value"].tolist(), log_y, unit)
    return fig


def add_val_markers(fig: go.Figure, df: pd.DataFrame, key: str = "acc") -> go.Figure:
    """Validation rows of ``key`` as diamonds in their run's method colour, grouped with its line.

    x is the row's step (the step the epoch ended at), or its epoch when a row has no step.
    """
    if df is None or df.empty:
        return fig
    val = df[(df["key"] == key) & (df["split"] == "val")].dropna(subset=["value"])
    styles = _line_styles(list(dict.fromkeys(df["label"].tolist())))
    for label, part in val.groupby("label", sort=False):
        x = part["step"] if part["step"].notna().all() else part["epoch"]
        colour = styles.get(label, (method_colour(label), "solid"))[0]
        fig.add_trace(go.Scatter(x=x.tolist(), y=part["value"].tolist(), mode="markers", name=f"{label} (val)",
                                 legendgroup=str(label),
                                 marker=dict(size=10, symbol="diamond", color=colour,
                                             line=dict(width=1, color="white"))))
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
    Trace names are ``"<label> · <word>"``; rows without ``x`` or value are dropped. The colour is the
    run's method (the scheme of :mod:`lance_app.axes`, shared with the Sweep page).
    """
    fig = _figure(title, x, "bytes")
    fig.update_yaxes(type="log")
    if df is None or df.empty:
        return fig
    sel = df[df["split"] == split] if split is not None else df
    sel = sel[sel["key"].isin([k for k, _, _ in keys])].dropna(subset=[x, "value"])
    for label in dict.fromkeys(sel["label"].tolist()):
        colour = method_colour(label)
        for key, word, dash in keys:
            part = sel[(sel["label"] == label) & (sel["key"] == key)]
            part = part.drop_duplicates(subset=[x], keep="first").sort_values(x)
            if part.empty:
                continue
            fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), name=f"{label} · {word}",
                                     mode="lines+markers" if len(part) < 30 else "lines",
                                     legendgroup=str(label), line=dict(color=colour, dash=dash),
                                     marker=dict(color=colour)))
    _finish_axes(fig, x, sel[x].tolist(), sel["value"].tolist(), True, "B")
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
    sel = _prefixed_rows(df, prefix, split, x)
    many = sel["label"].nunique() > 1
    keys = list(dict.fromkeys(sel["key"].astype(str).tolist()))
    short = short_layer_names([k[len(prefix):] for k in keys])
    for (label, key), part in sel.groupby(["label", "key"], sort=False):
        part = part.sort_values(x)
        name = short[str(key)[len(prefix):]]
        fig.add_trace(go.Scatter(x=part[x].tolist(), y=part["value"].tolist(), mode="lines",
                                 name=f"{method_of(label)}: {name}" if many else name, legendgroup=str(label),
                                 line=dict(dash=DASHES[keys.index(str(key)) % len(DASHES)],
                                           color=method_colour(label)) if many else None))
    if len(fig.data) > 4:  # room for a long legend under the plot
        fig.update_layout(height=320 + 22 * ((len(fig.data) + 1) // 2), legend=dict(orientation="h", y=-0.3))
    _finish_axes(fig, x, sel[x].tolist(), sel["value"].tolist(), log_y)
    return fig


def _prefixed_rows(df: pd.DataFrame, prefix: str, split: str | None, x: str) -> pd.DataFrame:
    """The rows whose key starts with ``prefix`` (of ``split`` when given) that have ``x`` and a value, the
    first of each (label, key, split, x): an epoch's summary row does not repeat its last step's point."""
    sel = df[df["key"].astype(str).str.startswith(prefix)]
    if split is not None:
        sel = sel[sel["split"] == split]
    return sel.dropna(subset=[x, "value"]).drop_duplicates(subset=["label", "key", "split", x], keep="first")


RANKS_TITLE = "ranks in use"


def ranks_figure(df: pd.DataFrame, split: str = "train", x: str = "step", title: str = RANKS_TITLE,
                 prefix: str = "rank/") -> go.Figure:
    """Ranks per mode (keys ``rank/<layer>/<mode>``): one small panel per layer (short name above it),
    one line per mode named B/C/H/W (as on the Spectra page) in the mode's colour, log y.

    The legend holds the modes once (B, C, H, W), not a layer × mode list (on mcunet: 4 entries, not
    12 long names), also when several runs share the frame: each run gets one dash, said in the legend's
    title ("mode (line: asi solid, lance dash)") and in the hover text ("<layer> · <method> · <mode>").
    """
    fig = _figure(title, x, "rank")
    if df is None or df.empty:
        return fig
    sel = _prefixed_rows(df, prefix, split, x)
    if sel.empty:
        return fig
    layer_mode = sel["key"].astype(str).str.slice(len(prefix)).str.rsplit("/", n=1)
    sel = sel.assign(layer=layer_mode.str[0], mode=layer_mode.str[-1])
    layers = list(dict.fromkeys(sel["layer"].tolist()))
    short = short_layer_names(layers)
    labels = list(dict.fromkeys(sel["label"].tolist()))
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    grid = make_subplots(rows=rows, cols=cols, shared_yaxes=True, subplot_titles=[short[n] for n in layers],
                         horizontal_spacing=0.04, vertical_spacing=0.18 if rows > 1 else 0.1)
    legend_title = "mode"
    if len(labels) > 1:  # which dash is which run (the legend keeps the modes only)
        legend_title += " (line: " + ", ".join(f"{method_of(label)} {DASHES[ri % len(DASHES)]}"
                                               for ri, label in enumerate(labels)) + ")"
    grid.update_layout(title=title, **{**_LAYOUT, "height": 260 + 190 * rows})
    grid.update_layout(legend_title_text=legend_title)
    shown: set[str] = set()
    for li, layer in enumerate(layers):
        part_layer = sel[sel["layer"] == layer]
        modes = list(dict.fromkeys(part_layer["mode"].tolist()))
        ordered = sorted(modes, key=lambda m: (len(m), m))  # '0' < '1' < … < '10'
        names = dict(zip(ordered, mode_names(ordered)))
        for ri, label in enumerate(labels):
            for mode in modes:
                part = part_layer[(part_layer["label"] == label) & (part_layer["mode"] == mode)].sort_values(x)
                if part.empty:
                    continue
                name = names[mode]
                who = name if len(labels) == 1 else f"{method_of(label)} · {name}"
                grid.add_trace(go.Scatter(
                    x=part[x].tolist(), y=part["value"].tolist(), mode="lines", name=name, legendgroup=name,
                    showlegend=name not in shown, hovertemplate=f"{short[layer]} · {who}: %{{y}}<extra></extra>",
                    line=dict(color=MODE_COLOURS.get(names[mode]), dash=DASHES[ri % len(DASHES)])),
                    row=li // cols + 1, col=li % cols + 1)
                shown.add(name)
    set_log_axis(grid, "y", sel["value"].tolist())
    if x in ("task", "epoch"):
        set_integer_axis(grid, "x", sel[x].tolist())
    grid.update_yaxes(title_text="rank", col=1)
    for a in grid.layout.annotations:  # subplot titles: small
        a.font = dict(size=11)
    return grid


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
                                 if len(y) <= 64 else "lines", name=str(mode),
                                 line=dict(color=MODE_COLOURS.get(str(mode)))))
    longest = max((len(e) for e in energies.values()), default=0)
    if longest > 64:
        set_log_axis(fig, "x", [1, longest])
    if cumulative:
        for i, eps in enumerate(eps_marks):
            # ε = the energy a rank must keep: the rank for ε is where a mode's curve crosses its line
            fig.add_hline(y=float(eps), line_dash="dash", line_width=1, line_color="#999999", opacity=0.7,
                          annotation_text=f"ε {float(eps):g}", annotation_font_size=9,
                          annotation_font_color="#666666",
                          annotation_position="right" if i % 2 == 0 else "left")
        if eps_marks:
            fig.update_layout(margin=dict(_LAYOUT["margin"], r=60))
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
    short = short_layer_names(list(map(str, layers)))
    for name, row in zip(layers, z):
        fig.add_trace(go.Scatter(x=list(map(float, eps_grid)), y=row.tolist(), mode="lines+markers",
                                 name=short[str(name)], hovertext=str(name)))
    set_log_axis(fig, "y", z.ravel().tolist() if z.size else [])
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
