"""The Sweep page's figure and tables, from ``engine.sweep.sweep_results`` (no Streamlit calls here).

``front_figure``: one trace per method, each configuration a point at (mean measured bytes, mean
accuracy) with ± std error bars on both axes, log x; the method's Pareto front joined by a line.
Every point carries its configuration key in ``customdata`` (the page maps a clicked point back to its
runs) and the configuration, seeds and run ids in its hover text.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from lance_app.axes import METHOD_COLOURS, method_colour, set_log_axis

FRONT_TITLE = "accuracy against measured layer bytes (mean ± std over seeds)"
COLOURS = METHOD_COLOURS  # the app's one scheme (lance_app.axes), shared with the fine-tune and runs charts
X_TITLES = {"peak_layer_activation_bytes": "measured layer activation bytes (peak per step)",
            "peak_region_activation_bytes": "measured region activation bytes (peak per step)",
            "peak_memory_bytes": "measured peak memory bytes", "plan_total_bytes": "plan bytes (analytic)"}


def _std(stat: dict) -> float:
    return float(stat["std"]) if stat.get("std") is not None else 0.0


def front_figure(results: dict[str, Any]) -> go.Figure:
    """The accuracy–memory plane of a sweep (see the module docstring)."""
    x_metric = results["sweep"]["x_metric"]
    fig = go.Figure()
    fig.update_layout(title=FRONT_TITLE, xaxis_title=X_TITLES.get(x_metric, x_metric), xaxis_type="log",
                      yaxis_title="accuracy (%)", legend_title="method", clickmode="event+select",
                      margin={"l": 60, "r": 20, "t": 60, "b": 50}, height=460)
    for method, keys in results["front"].items():
        configs = [c for c in results["configurations"] if c["method"] == method
                   and c["metrics"][x_metric]["mean"] is not None and c["metrics"]["accuracy"]["mean"] is not None]
        if not configs:
            continue
        colour = method_colour(method)
        xs = [c["metrics"][x_metric]["mean"] for c in configs]
        ys = [c["metrics"]["accuracy"]["mean"] for c in configs]
        hover = [f"<b>{c['label']}</b><br>accuracy {c['metrics']['accuracy']['mean']:.2f}"
                 f" ± {_std(c['metrics']['accuracy']):.2f} %<br>{x_metric}: {c['metrics'][x_metric]['mean']:,.0f}"
                 f"<br>seeds {', '.join(str(s) for s in sorted(c['seeds']))}"
                 f"{'<br>on the front' if c['on_front'] else ''}" for c in configs]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=method, customdata=[c["config_key"] for c in configs],
            hovertext=hover, hoverinfo="text", marker={"size": 11, "color": colour},
            error_y={"type": "data", "array": [_std(c["metrics"]["accuracy"]) for c in configs], "visible": True},
            error_x={"type": "data", "array": [_std(c["metrics"][x_metric]) for c in configs], "visible": True}))
        by_key = {c["config_key"]: c for c in configs}
        line = [by_key[k] for k in keys if k in by_key]
        if len(line) > 1:
            fig.add_trace(go.Scatter(x=[c["metrics"][x_metric]["mean"] for c in line],
                                     y=[c["metrics"]["accuracy"]["mean"] for c in line], mode="lines",
                                     line={"color": colour, "dash": "dot"}, name=f"{method} front",
                                     hoverinfo="skip", showlegend=False))
    set_log_axis(fig, "x", [x for t in fig.data for x in (t.x or ())], "B" if "bytes" in x_metric else "")
    return fig


def trials_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: configuration, seed, status, run, accuracy, measured bytes, message."""
    x_metric = results["sweep"]["x_metric"]
    rows = [{"configuration": t["label"], "seed": t["seed"], "status": t["status"], "run": t["run_id"],
             "accuracy %": t.get("accuracy"), x_metric: t.get(x_metric),
             "message": (t["message"] or "").splitlines()[0] if t["message"] else ""}
            for t in results["trials"]]
    return pd.DataFrame(rows, columns=["configuration", "seed", "status", "run", "accuracy %", x_metric, "message"])


def configurations_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per configuration: mean and std of accuracy, bytes and time, front membership."""
    x_metric = results["sweep"]["x_metric"]
    rows = []
    for c in results["configurations"]:
        m = c["metrics"]
        t = m.get("step_ms") or m.get("task_ms")
        rows.append({"configuration": c["label"], "completed": c["completed"], "failed": c["failed"],
                     "accuracy mean": m["accuracy"]["mean"], "accuracy std": m["accuracy"]["std"],
                     f"{x_metric} mean": m[x_metric]["mean"], "time ms mean": t["mean"] if t else None,
                     "on front": c["on_front"]})
    return pd.DataFrame(rows)


def selected_config(event: Any) -> str | None:
    """The configuration key of the first point selected in a ``st.plotly_chart(on_select=...)`` event."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        points = getattr(getattr(event, "selection", None), "points", None) or []
    for point in points or []:
        key = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(key, list):
            key = key[0] if key else None
        if key:
            return str(key)
    return None
