"""Continual: a task sequence per method; live accuracy matrix, ACC/BWT/forgetting, subspace usage."""
from __future__ import annotations

import streamlit as st

from lance_app import catalog, continual_view, figures
from lance_app.catalog import Unavailable
from lance_app.form_store import save_form, seed_session
from lance_app.live import POLL_S, job_progress
from lance_app.state import CONTINUAL_METHODS, attached_job, job_runner, setup_config
from lance_app.views import (
    cached_figures,
    chart,
    job_state,
    phase_progress,
    poll_view,
    running_jobs_picker,
    start_job,
    status_banner,
    stop_button,
)

KIND = "continual"
FORM = "continual"
TASKS = {"split-digits": 5, "split-cifar10": 5, "split-cifar100": 10, "5-datasets": 5}
st.title("Continual learning")
st.caption("Task-incremental: one head per task, the whole backbone trained. LANCE keeps each new "
           "task's updates orthogonal to the old tasks' inputs; GPM does so with full activations; "
           "finetune does not protect anything.")
cfg = setup_config()
benchmarks = [o for o in catalog.continual_benchmarks() if o.available]
try:
    backbones = catalog.backbone_names()
except Unavailable as exc:
    backbones = [catalog.DEFAULT_BACKBONE]
    st.info(f"Backbone list unavailable: {exc}")

labels = {o.value: o.label for o in benchmarks}
cl_backbones = [b for b in backbones if b.endswith("-cl") or b.endswith("-reduced")] or backbones
DEFAULTS = {"cl_benchmark": next(iter(labels), ""), "cl_backbone": cl_backbones[0], "cl_methods": ["lance", "finetune"],
            "cl_epochs": 1, "cl_limit": 200, "cl_eps": 0.97, "cl_eps_step": 0.003, "cl_batch": 64, "cl_lr": 0.01,
            "cl_momentum": 0.0, "cl_compress_first": True}
seed_session(st.session_state, FORM, DEFAULTS,  # the last values started here: a reload keeps them
             {"cl_benchmark": list(labels), "cl_backbone": cl_backbones, "cl_methods": CONTINUAL_METHODS})

with st.form("continual_form"):
    c1, c2 = st.columns(2)
    bench = c1.selectbox("Benchmark", list(labels), format_func=labels.get, key="cl_benchmark")
    backbone = c2.selectbox("Backbone", cl_backbones, key="cl_backbone")
    methods = st.multiselect("Methods", CONTINUAL_METHODS, key="cl_methods")
    c3, c4, c5, c6 = st.columns(4)
    epochs = c3.number_input("Epochs per task", 1, 100, key="cl_epochs")
    limit_train = c4.number_input("Training images per task (0 = all)", 0, 100_000, step=50, key="cl_limit")
    eps_cl = c5.number_input("ε_cl start", 0.5, 0.9999, format="%.4f", key="cl_eps")
    eps_step = c6.number_input("ε_cl step per task", 0.0, 0.05, format="%.4f", key="cl_eps_step")
    c7, c8, c9, c10 = st.columns(4)
    batch_size = c7.number_input("Batch size", 1, 4096, key="cl_batch")
    lr = c8.number_input("SGD learning rate", 1e-5, 1.0, format="%.4f", key="cl_lr")
    momentum = c9.number_input("SGD momentum", 0.0, 0.99, step=0.1, format="%.2f", key="cl_momentum",
                               help="No weight decay and no Adam: they would move weights out of the allowed subspace")
    compress_first = c10.checkbox("LANCE: compress task 0 too", key="cl_compress_first",
                                  help="Off: task 0 trains with full activations (GPM's memory for that task)")
    submitted = st.form_submit_button("Start task sequence", type="primary")

if submitted:
    save_form(FORM, {key: st.session_state.get(key) for key in DEFAULTS})
    if not methods:
        st.error("Choose at least one method.")
    elif not bench:
        st.error("No continual benchmark is available: the Setup page lists the datasets and where to put them.")
    else:
        benchmark, _, dataset = bench.partition("|")
        args = ["--benchmark", benchmark, "--backbone", backbone, "--method", ",".join(methods),
                "--epochs", str(epochs), "--eps-cl", str(eps_cl), "--eps-cl-step", str(eps_step),
                "--batch-size", str(batch_size), "--lr", str(lr), "--momentum", str(momentum),
                "--seed", str(cfg["seed"])]
        if not compress_first:
            args.append("--no-compress-first-task")
        if dataset:
            args += ["--dataset", dataset]
        if limit_train:
            args += ["--limit-train", str(limit_train)]
        start_job(KIND, args, label=f"{','.join(methods)} on {benchmark}",
                  extra={"methods": methods, "n_tasks": int(TASKS.get(benchmark, 0))})

job_id = attached_job(KIND)
running_jobs_picker(KIND, job_id)
if not job_id:
    st.info("No task sequence attached. Start one above, or attach to a running one.")
    st.stop()

known, alive = job_state(KIND, job_id)
job = job_runner().get(job_id)
extra = job.extra if job else {}


def build_figures(runs: list[dict], frames: dict, frame) -> dict:
    """The side-by-side table and figures of every method of the job, plus each run's detail figures."""
    out = {"summary": continual_view.summary_frame(runs, frames, int(extra.get("n_tasks") or 0) or None),
           "matrices": continual_view.matrices_figure(runs, frames),
           "tasks": continual_view.tasks_figure(runs, frames),
           "memory": figures.memory_figure(frame, split="task", x="task", keys=figures.CONTINUAL_MEMORY_KEYS,
                                           title="measured memory per task: layer, region, step peak")}
    for run in runs:
        out[f"usage_{run['id']}"] = figures.usage_figure(frames.get(run["id"]))
    return out


BYTES = {c: st.column_config.NumberColumn(c, format="%d") for c in
         ("peak layer bytes", "peak region bytes", "step peak bytes")}
DECIMALS = {c: st.column_config.NumberColumn(c, format="%.2f") for c in ("ACC %", "BWT", "forgetting")}


@st.fragment(run_every=POLL_S if alive else None)
def live_view() -> None:
    now_alive = job_runner().is_alive(job_id)
    view = poll_view(KIND, job_id)
    if view is None:
        return
    head, stop_col = st.columns([5, 1])
    head.markdown(f"**Job `{job_id}`** · {'running' if now_alive else 'finished'}")
    with stop_col:
        stop_button(KIND, job_id, now_alive)
    phase_progress(job_id, now_alive)  # calibrating, training, evaluating, …
    n_runs = len(extra.get("methods", [])) or max(1, len(view.runs))
    n_tasks = int(extra.get("n_tasks") or 0)
    done = 0.0
    for run in view.runs:
        if run.get("status") == "completed":
            done += 1
        elif n_tasks:
            m = figures.accuracy_matrix(view.frames.get(run["id"]))
            done += min(1.0, m.shape[0] / n_tasks)
    progress = done / n_runs if n_runs else job_progress(view, 1, None, None)
    st.progress(min(1.0, progress), text=f"{progress:.0%} · {len(view.runs)}/{n_runs} method(s) started")
    status_banner(KIND, job_id, view, now_alive)
    if not view.runs:
        return
    frame = view.frame
    signature = (job_id, len(frame), tuple((r["id"], r.get("status")) for r in view.runs))
    figs = cached_figures("cl_figures", signature, lambda: build_figures(view.runs, view.frames, frame))
    st.subheader("All methods side by side")
    if figures.accuracy_matrix(frame).size == 0:
        st.info("No task finished yet: the table and charts appear when the first method has trained and "
                "evaluated its first task.")
    else:
        st.dataframe(figs["summary"], hide_index=True, key="cl_summary", column_config={**BYTES, **DECIMALS})
        st.caption("ACC: mean accuracy over the tasks seen after the last task · BWT: mean change of the old "
                   "tasks' accuracy since each was learned (0 = nothing forgotten) · peaks: the maximum over "
                   "the tasks so far of the bytes saved for backward (layer: the protected layers' inputs; "
                   "region: everything the trained region saves; step peak: the allocator's peak)")
        chart(figs["matrices"], "cl_matrices", "No accuracy row yet.")
        chart(figs["tasks"], "cl_tasks", "No accuracy row yet.")
        chart(figs["memory"], "cl_memory", "No memory row yet.")
    st.subheader("Per method")
    tabs = st.tabs([figures.run_label(r) for r in view.runs])
    for tab, run in zip(tabs, view.runs):
        with tab:
            df = view.frames.get(run["id"])
            m1, m2, m3 = st.columns(3)
            for col, key, name in ((m1, "ACC", "ACC (%)"), (m2, "BWT", "BWT (points)"),
                                   (m3, "forgetting", "forgetting (points)")):
                value = figures.latest_value(df, key, split="task")
                col.metric(name, "–" if value is None else f"{value:.2f}")
            # the run's peaks: the maximum over every task so far (not the last task's own peak)
            st.caption("measured peaks, maximum over the tasks so far: " + " · ".join(
                f"{word} {figures.format_bytes(peak) if peak is not None else '–'}"
                for word, peak in figures.run_peaks(df).items()))
            chart(figs.get(f"usage_{run['id']}", figures.usage_figure(df)), f"cl_usage_{run['id']}",
                  "No subspace usage yet (finetune keeps no subspace; the others log it after each task).")
    if alive and not now_alive:
        st.rerun()


live_view()
