"""The Fine-tune page's six live charts, assembled from the figure builders (no Streamlit here).

- one colour per run (method), the same in every chart, validation markers included;
- rank traces named by mode letter (``block1.conv · C``, see :func:`lance_app.budget_view.mode_names`),
  not ``/0…/3``;
- before a chart has rows it is a titled placeholder of the same height ("waiting for the first rows"),
  so the layout does not jump when the first rows land, and no meaningless axes are drawn.
"""
from __future__ import annotations

import re

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from lance_app import figures
from lance_app.budget_view import mode_names

PALETTE = px.colors.qualitative.Plotly
WAITING = "waiting for the first rows…"


def placeholder(fig: go.Figure, text: str = WAITING) -> go.Figure:
    """``fig`` emptied to its title and height, axes hidden, ``text`` in the middle."""
    out = go.Figure()
    out.update_layout(title=fig.layout.title, height=fig.layout.height, margin=fig.layout.margin,
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    out.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font=dict(size=14, color="grey"))
    return out


def colour_of(labels: list[str]) -> dict[str, str]:
    """One palette colour per run label, in run order."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _recolour(fig: go.Figure, colours: dict[str, str]) -> None:
    for trace in fig.data:
        name = str(trace.name or "")
        label = next((lb for lb in colours if name == lb or name.startswith(lb + ":") or name.startswith(lb + " ·")
                      or name.startswith(lb + " (")), None)
        if label is None and len(colours) == 1:
            label = next(iter(colours))
        if label is None:
            continue
        if trace.mode and "lines" in trace.mode:
            trace.line.color = colours[label]
        if trace.mode and "markers" in trace.mode:
            trace.marker.color = colours[label]


def name_rank_modes(fig: go.Figure) -> None:
    """``…layer/2`` → ``…layer · H``: mode letters from the number of modes each layer logs."""
    pattern = re.compile(r"^(.*)/(\d+)$")
    counts: dict[str, int] = {}
    for trace in fig.data:
        m = pattern.match(str(trace.name or ""))
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    for trace in fig.data:
        m = pattern.match(str(trace.name or ""))
        if m:
            letters = mode_names(counts[m.group(1)])
            trace.name = f"{m.group(1)} · {letters[int(m.group(2))]}"
            trace.legendgroup = m.group(1)


def build_figures(df: pd.DataFrame, labels: list[str] | None = None,
                  finished: bool = False) -> list[tuple[str, go.Figure]]:
    """The six live charts as (widget key, plotly figure). ``labels``: the runs' labels in run order;
    ``finished``: the job has ended (an empty chart then says nothing was logged, not "waiting")."""
    labels = labels if labels is not None else ([] if df.empty else list(dict.fromkeys(df["label"])))
    colours = colour_of(labels)
    acc = figures.metric_figure(df, "acc", split="train", title="accuracy (train steps, val epochs)",
                                y_title="accuracy (%)")
    val = df[(df["key"] == "acc") & (df["split"] == "val")] if not df.empty else df
    for label, part in (val.groupby("label", sort=False) if not val.empty else []):
        x = part["step"] if part["step"].notna().all() else part["epoch"]
        acc.add_trace(go.Scatter(x=x.tolist(), y=part["value"].tolist(), mode="markers",
                                 marker=dict(size=10, symbol="diamond", line=dict(width=1, color="white")),
                                 name=f"{label} (val)"))
    ranks = figures.prefixed_metric_figure(df, "rank/", split="train", title="ranks in use", y_title="rank",
                                           log_y=True)
    name_rank_modes(ranks)
    out = [
        ("ft_loss", figures.metric_figure(df, "loss", split="train", title="training loss")),
        ("ft_acc", acc),
        ("ft_bytes", figures.memory_figure(df)),
        ("ft_step", figures.metric_figure(df, "step_ms", split="train", title="step time", y_title="ms",
                                          log_y=True)),
        ("ft_ranks", ranks),
        ("ft_energy", figures.prefixed_metric_figure(df, "captured_energy/", split="train",
                                                     title="captured energy of the stored subspace",
                                                     y_title="fraction")),
    ]
    for _, fig in out:
        _recolour(fig, colours)
        fig.update_yaxes(minor=dict(ticks="", showgrid=False))
        if fig.layout.yaxis.type == "log":
            fig.update_yaxes(dtick="D2")  # 1, 2, 5 per decade: no "8 9 1 2 3" clutter
    empty = "nothing logged for this chart" if finished else WAITING
    return [(key, fig if len(fig.data) else placeholder(fig, empty)) for key, fig in out]
