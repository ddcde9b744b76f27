"""The Fine-tune page's six live charts, assembled from the shared figure builders (no Streamlit here).

- one colour per method (:data:`lance_app.axes.METHOD_COLOURS`, as on the Continual, Runs and Sweep pages),
  validation markers in their run's colour (:func:`lance_app.figures.add_val_markers`);
- ranks from :func:`lance_app.figures.ranks_figure`: one panel per layer (short names), one line per mode
  named B/C/H/W as on the Spectra page, the modes once in the legend (not a layer × mode list);
- before a chart has rows it is a titled placeholder of the same height ("waiting for the first rows"),
  so the layout does not jump when the first rows land, and no meaningless axes are drawn.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lance_app import figures

WAITING = "waiting for the first rows…"


def placeholder(fig: go.Figure, text: str = WAITING) -> go.Figure:
    """``fig`` emptied to its title and height, axes hidden, ``text`` in the middle."""
    out = go.Figure()
    out.update_layout(title=fig.layout.title, height=fig.layout.height, margin=fig.layout.margin,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    out.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font=dict(size=14, color="grey"))
    return out


def build_figures(df: pd.DataFrame, finished: bool = False) -> list[tuple[str, go.Figure]]:
    """The six live charts as (widget key, plotly figure). ``df``: the job's metric rows
    (:func:`lance_app.figures.metrics_frame`, ``label`` = run label, e.g. ``asi #a1b2c3``); ``finished``:
    the job has ended (an empty chart then says nothing was logged, not "waiting")."""
    acc = figures.metric_figure(df, "acc", split="train", title="accuracy (train steps, val epochs)",
                                y_title="accuracy (%)")
    figures.add_val_markers(acc, df, "acc")
    out = [
        ("ft_loss", figures.metric_figure(df, "loss", split="train", title="training loss")),
        ("ft_acc", acc),
        ("ft_bytes", figures.memory_figure(df)),
        ("ft_step", figures.metric_figure(df, "step_ms", split="train", title="step time", y_title="ms",
                                          log_y=True)),
        ("ft_ranks", figures.ranks_figure(df, split="train")),
        ("ft_energy", figures.prefixed_metric_figure(df, "captured_energy/", split="train",
                                                     title="captured energy of the stored subspace",
                                                     y_title="fraction")),
    ]
    empty = "nothing logged for this chart" if finished else WAITING
    return [(key, fig if len(fig.data) else placeholder(fig, empty)) for key, fig in out]
