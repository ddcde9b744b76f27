"""Runs: the stored runs (filter, sort), accuracy against memory, overlay curves, configs side by side,
export, delete."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lance_app import figures
from lance_app.catalog import Unavailable
from lance_app.runs_table import (
    config_side_by_side,
    fallback_values,
    metrics_export,
    runs_frame,
    scatter_figure,
)
from lance_app.state import open_store, show_error
from lance_app.views import chart

st.title("Runs")
if st.session_state.get("runs_deleted"):
    st.success(f"Deleted {st.session_state.pop('runs_deleted')} run(s).")
try:
    store = open_store()
    runs = store.list_runs()
except Unavailable as exc:
    st.error(f"Run store unavailable: {exc}")
    st.stop()
except Exception as exc:
    show_error(f"Could not read the run store: {exc}", exc)
    st.stop()

if not runs:
    st.info("No runs stored yet. Start one on the Fine-tune or Continual page "
            "(or with `lance finetune …`).")
    st.stop()

try:
    fallback = fallback_values(store, runs)  # val_acc / ACC of runs whose summary is not written yet
except Exception as exc:
    fallback = {}
    show_error(f"Could not read the newest accuracies: {exc}", exc)
table = runs_frame(runs, fallback)
c1, c2, c3, c4 = st.columns(4)
kinds = c1.multiselect("Kind", sorted(table["kind"].dropna().unique()), key="runs_kind")
statuses = c2.multiselect("Status", sorted(table["status"].dropna().unique()), key="runs_status")
methods = c3.multiselect("Method", sorted(table["method"].dropna().unique()), key="runs_method")
sort_by = c4.selectbox("Sort by", [c for c in ("created_at", "method", "status", "val_acc", "ACC", "BWT", "layer bytes",
                                               "step_ms") if c in table.columns], key="runs_sort")
shown = table
if kinds:
    shown = shown[shown["kind"].isin(kinds)]
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if methods:
    shown = shown[shown["method"].isin(methods)]
if sort_by in shown.columns:
    shown = shown.sort_values(sort_by, ascending=(sort_by not in ("created_at", "val_acc", "ACC", "BWT")),
                              na_position="last")
st.dataframe(shown, hide_index=True, key="runs_table",
             column_config={"options": st.column_config.TextColumn("options", help="the options of this run's "
                                                                   "method only (vanilla and finetune have none)"),
                            "layer bytes": st.column_config.NumberColumn("layer bytes", format="%d",
                                                                         help="measured layer activation bytes: "
                                                                         "peak per step (fine-tune), peak over "
                                                                         "tasks (continual)")})
counts = shown["status"].value_counts()
st.caption(f"{len(shown)} of {len(table)} run(s): " + " · ".join(f"{n} {status}" for status, n in counts.items()))

ids = shown["id"].tolist()
labels = dict(zip(table["id"], table["label"]))
selected = st.multiselect("Select runs to compare", ids, default=ids[:2], format_func=lambda i: labels[i],
                          key="runs_selected")
if not selected:
    st.stop()

scatter, not_drawn = scatter_figure(table[table["id"].isin(selected)])
chart(scatter, "runs_scatter", "None of the selected runs has both an accuracy and measured layer bytes yet.")
if not_drawn:
    st.caption(f"Not in the scatter (no accuracy or layer bytes yet): {', '.join(not_drawn)}.")

frames = []
for rid in selected:
    try:
        frames.append(figures.metrics_frame(store.metrics(rid), label=labels[rid], run_id=rid))
    except Exception as exc:
        show_error(f"Could not read the metrics of run {rid}: {exc}", exc)
df = pd.concat(frames, ignore_index=True) if frames else figures.metrics_frame([])
keys = sorted(k for k in df["key"].dropna().unique() if "/" not in k) if not df.empty else []
if keys:
    c1, c2 = st.columns([2, 1])
    key = c1.selectbox("Metric", keys, index=keys.index("loss") if "loss" in keys else 0, key="runs_key")
    splits = sorted(df.loc[df["key"] == key, "split"].dropna().unique())
    split = c2.selectbox("Split", splits, key="runs_split") if splits else None
    kinds_of = dict(zip(table["id"], table["kind"]))
    rows = df[(df["key"] == key) & ((df["split"] == split) if split else True)]
    continual_only = rows["run_id"].map(kinds_of).eq("continual").all()
    # continual rows are per task (their "step" is the task index): tasks on x, whole numbers
    x = "task" if split == "task" or (continual_only and rows["task"].notna().all()) else (
        "step" if rows["step"].notna().any() else "epoch")
    st.plotly_chart(figures.metric_figure(df, key, split=split, x=x, title=f"{key} ({split})",
                                          log_y=figures.unit_of(key) in ("B", "ms")),
                    key="runs_overlay")
else:
    st.info("The selected runs have no metric rows yet.")

if not df.empty:  # measured memory of the selected runs: per step (fine-tune) and per task (continual)
    m1, m2 = st.columns(2)
    if ((df["split"] == "train") & df["key"].isin([k for k, _, _ in figures.MEMORY_KEYS])).any():
        m1.plotly_chart(figures.memory_figure(df), key="runs_memory_steps")
    if ((df["split"] == "task") & df["key"].isin([k for k, _, _ in figures.CONTINUAL_MEMORY_KEYS])).any():
        m2.plotly_chart(figures.memory_figure(df, split="task", x="task", keys=figures.CONTINUAL_MEMORY_KEYS,
                                              title="measured memory per task: layer, region, step peak"),
                        key="runs_memory_tasks")

st.subheader("Configuration side by side")
st.dataframe(config_side_by_side([r for r in runs if r["id"] in selected], labels), key="runs_config")

st.subheader("Export")
e1, e2 = st.columns(2)
csv_bytes, json_bytes = metrics_export(df, [r for r in runs if r["id"] in selected])
e1.download_button("Download metrics (CSV)", csv_bytes, file_name="lance_runs.csv", mime="text/csv",
                   key="runs_csv")
e2.download_button("Download runs + metrics (JSON)", json_bytes, file_name="lance_runs.json",
                   mime="application/json", key="runs_json")

st.subheader("Delete")
running = [rid for rid in selected if table.set_index("id").loc[rid, "status"] == "running"]


def _delete(run_ids: list[str]) -> None:
    for rid in run_ids:
        store.delete_run(rid)
    st.session_state["runs_selected"] = []
    st.session_state["runs_confirm"] = False
    st.session_state["runs_deleted"] = len(run_ids)


confirm = st.checkbox(f"Yes, delete the {len(selected)} selected run(s) and their files", key="runs_confirm")
if running:
    st.caption(f"Running runs cannot be deleted; stop them first: {', '.join(running)}.")
st.button("Delete selected runs", disabled=not confirm or bool(running), key="runs_delete", type="primary",
          on_click=_delete, args=(list(selected),))
