"""Tables for the Runs page: runs as rows, configs side by side, export bytes. No Streamlit calls."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lance_app.axes import METHOD_COLOURS, method_colour, set_log_axis
from lance_app.figures import BASE_LAYOUT, run_label

# summary key -> column (a continual run's summary says "acc"/"bwt": the table says ACC / BWT)
SUMMARY_COLUMNS = {"val_acc": "val_acc", "best_val_acc": "best_val_acc", "acc": "ACC", "bwt": "BWT",
                   "tasks_done": "tasks_done", "layer_activation_bytes": "layer_activation_bytes",
                   "region_activation_bytes": "region_activation_bytes", "peak_memory_bytes": "peak_memory_bytes",
                   "plan_total_bytes": "plan_total_bytes", "peak_layer_activation_bytes": "peak_layer_activation_bytes",
                   "peak_region_activation_bytes": "peak_region_activation_bytes",
                   "analytic_activation_bytes": "analytic_activation_bytes", "step_ms": "step_ms", "flops": "flops"}
# the training options that change what a continual method does (the rest are shared by all methods)
CONTINUAL_OPTIONS = {"lance": ("eps", "eps_plain", "spatial_eps", "eps_cl", "eps_cl_step", "compress_first_task",
                               "recalibrate_every"),
                     "gpm": ("eps_cl", "eps_cl_step", "basis_samples"), "finetune": ()}
# what a fine-tune run's stored config may hold per method when it has no "method_options"
_FINETUNE_PER_METHOD = ("eps", "budget", "ranks")
# metric rows that stand in for a summary that is not written yet (a running or interrupted run)
FALLBACK_METRICS = {"finetune": {"val_acc": ("acc", "val")},
                    "continual": {"ACC": ("ACC", "task"), "BWT": ("BWT", "task")}}
SCATTER_TITLE = "accuracy against measured layer bytes (selected runs)"


def _when(value) -> str | None:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS' (local time; sorts like the time); strings pass through."""
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return value


def _compact(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def method_options(run: Mapping) -> str:
    """The options that apply to this run's method only, 'eps=0.8' style ('' for vanilla / finetune).

    Fine-tune: the stored ``method_options`` (less the method's name); continual: the training options of
    :data:`CONTINUAL_OPTIONS` for the method.
    """
    config = run.get("config") or {}
    method = run.get("method")
    if run.get("kind") == "continual":
        training = config.get("training") or {}
        items = {k: training[k] for k in CONTINUAL_OPTIONS.get(method, ()) if k in training}
    elif isinstance(config.get("method_options"), Mapping):
        items = {k: v for k, v in config["method_options"].items() if k != "method"}
    else:
        items = {k: config[k][method] for k in _FINETUNE_PER_METHOD
                 if isinstance(config.get(k), Mapping) and method in config[k]}
    return ", ".join(f"{k}={_compact(v)}" for k, v in items.items())


def fallback_values(store, runs: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """run id -> {column: newest metric row} for the headline columns a run's summary lacks
    (``val_acc`` of a fine-tune run still running or interrupted, ``ACC``/``BWT`` of a continual one)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        summary = run.get("summary") or {}
        for column, (key, split) in FALLBACK_METRICS.get(run.get("kind"), {}).items():
            summary_key = next(k for k, c in SUMMARY_COLUMNS.items() if c == column)
            if isinstance(summary.get(summary_key), (int, float)):
                continue
            rows = [r for r in store.metrics(run["id"], key=key, split=split) if r.get("value") is not None]
            if rows:
                out.setdefault(run["id"], {})[column] = float(rows[-1]["value"])
    return out


def runs_frame(runs: Sequence[Mapping], fallback: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """One row per run: id, label, kind, method, status, the method's own options, created_at, job_id,
    message, then the headline summary values (columns no run has are dropped).

    ``fallback``: run id -> {column: value} for runs whose summary lacks it (:func:`fallback_values`).
    ``layer bytes``: the measured layer activation bytes of either kind (fine-tune: the peak per step;
    continual: the peak over its tasks), the x of the accuracy–memory scatter.
    """
    rows = []
    for run in runs:
        summary = run.get("summary") or {}
        row = {"id": run.get("id"), "label": run_label(run), "kind": run.get("kind"),
               "method": run.get("method"), "status": run.get("status"), "options": method_options(run),
               "created_at": _when(run.get("created_at")), "job_id": run.get("job_id"),
               "message": run.get("message") or ""}
        for key, col in SUMMARY_COLUMNS.items():
            value = summary.get(key) if isinstance(summary, Mapping) else None
            row[col] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        for col, value in ((fallback or {}).get(run.get("id")) or {}).items():
            if row.get(col) is None:
                row[col] = value
        layer = row["peak_layer_activation_bytes"] if run.get("kind") == "continual" else row["layer_activation_bytes"]
        row["layer bytes"] = layer
        rows.append(row)
    columns = ["id", "label", "kind", "method", "status", "options", "created_at", "job_id", "message",
               *SUMMARY_COLUMNS.values(), "layer bytes"]
    df = pd.DataFrame(rows, columns=columns)
    empty = [c for c in [*SUMMARY_COLUMNS.values(), "layer bytes", "options"]
             if df[c].isna().all() or (c == "options" and not df[c].astype(bool).any())]
    return df.drop(columns=empty)


def accuracy(row: Mapping) -> float | None:
    """A run's headline accuracy (%): val_acc for a fine-tune run, ACC for a continual one."""
    value = row.get("ACC") if row.get("kind") == "continual" else row.get("val_acc")
    return None if value is None or not np.isfinite(value) else float(value)


def scatter_figure(table: pd.DataFrame) -> tuple[go.Figure, list[str]]:
    """Accuracy (val_acc / ACC) against measured layer bytes (log x) of the runs in ``table``, one trace
    and colour per method (the app's scheme), hover = run, kind, options. Returns (figure, labels of the
    runs that lack one of the two figures, so not drawn)."""
    fig = go.Figure()
    fig.update_layout(title=SCATTER_TITLE, xaxis_title="measured layer activation bytes (peak)",
                      yaxis_title="accuracy (%): val_acc (fine-tune), ACC (continual)", legend_title="method",
                      **{**BASE_LAYOUT, "height": 380})
    missing, xs = [], []
    records = table.to_dict("records")
    methods = list(dict.fromkeys(r["method"] for r in records))
    methods.sort(key=lambda m: list(METHOD_COLOURS).index(m) if m in METHOD_COLOURS else len(METHOD_COLOURS))
    for method in methods:
        pts = [(r, r.get("layer bytes"), accuracy(r)) for r in records if r["method"] == method]
        missing += [r["label"] for r, x, y in pts if x is None or not np.isfinite(x) or x <= 0 or y is None]
        pts = [(r, x, y) for r, x, y in pts if x is not None and np.isfinite(x) and x > 0 and y is not None]
        if not pts:
            continue
        xs += [x for _, x, _ in pts]
        fig.add_trace(go.Scatter(
            x=[float(x) for _, x, _ in pts], y=[y for _, _, y in pts], mode="markers", name=str(method),
            marker=dict(size=12, color=method_colour(method), line=dict(width=1, color="white")),
            customdata=[r["id"] for r, _, _ in pts],
            hovertext=[f"<b>{r['label']}</b> ({r['kind']})<br>{r.get('options') or 'no method options'}"
                       f"<br>{y:.2f} % at {x:,.0f} B" for r, x, y in pts], hoverinfo="text"))
    set_log_axis(fig, "x", xs, "B")
    return fig, missing


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def config_side_by_side(runs: Sequence[Mapping], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Rows = flattened config keys, columns = runs; keys whose values differ come first."""
    cols = {}
    for run in runs:
        name = (labels or {}).get(run["id"], run_label(run))
        cols[name] = _flatten(dict(run.get("config") or {}))
    df = pd.DataFrame(cols)
    if df.empty:
        return df
    df = df.astype(str)
    differs = df.nunique(axis=1) > 1
    return pd.concat([df[differs], df[~differs]])


def metrics_export(df: pd.DataFrame, runs: Sequence[Mapping]) -> tuple[bytes, bytes]:
    """(CSV of the metric rows, JSON of {runs: [run + metrics]}) for the download buttons."""
    csv_bytes = df.to_csv(index=False).encode()
    payload = {"runs": []}
    for run in runs:
        part = df[df["run_id"] == run["id"]] if not df.empty else df
        payload["runs"].append({**{k: v for k, v in run.items()},
                                "metrics": json.loads(part.drop(columns=["label"], errors="ignore")
                                                      .to_json(orient="records"))})
    return csv_bytes, json.dumps(payload, indent=1, default=str).encode()
