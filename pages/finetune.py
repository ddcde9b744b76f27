"""Fine-tune: choose methods, start a job, watch loss / accuracy / bytes / step time / ranks live."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from lance_app import figures
from lance_app.calib import budget_finetune_args
from lance_app.catalog import Unavailable, engine_attr
from lance_app.live import POLL_S, job_progress, steps_per_run
from lance_app.state import METHODS, attach_job, attached_job, job_runner, setup_config, show_error
from lance_app.views import job_state, poll_view, running_jobs_picker, status_banner, stop_button

KIND = "finetune"
st.title("Fine-tune")
cfg = setup_config()
st.caption(f"Setup: **{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}**, last "
           f"{cfg['layers']} layers, seed {cfg['seed']} — change it on the Setup page.")

with st.form("finetune_form"):
    methods = st.multiselect("Methods (run one after another, same data order and seed)", METHODS,
                             default=["vanilla", "asi"], key="ft_methods")
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, 100, 1, key="ft_epochs")
    batch_size = c2.number_input("Batch size", 1, 1024, 64, key="ft_batch")
    lr = c3.number_input("Learning rate", 0.0001, 1.0, 0.05, format="%.4f", key="ft_lr")
    limit_train = c4.number_input("Training images (0 = all)", 0, 1_000_000, 512, step=64, key="ft_limit")
    c5, c6, c7 = st.columns(3)
    eps_hosvd = c5.number_input("HOSVD ε", 0.05, 0.999, 0.8, key="ft_eps_hosvd")
    eps_lance = c6.number_input("LANCE ε", 0.05, 0.999, 0.95, key="ft_eps_lance")
    budget = c7.text_input("ASI budget (e.g. 64KiB, 0.5MB; empty = default ranks)",
                           st.session_state.get("asi_budget", ""), key="ft_budget")
    submitted = st.form_submit_button("Start fine-tuning", type="primary")

budget_error = None
planned = budget_finetune_args(budget, methods)  # a plain --budget: ASI and LANCE train the same plan
if submitted and planned:
    try:
        engine_attr("engine.calibration", "parse_budget")(budget.strip())
    except ValueError as exc:
        budget_error = f"ASI budget: {exc}"
    except Unavailable:
        pass  # the CLI checks it
if submitted:
    if not methods:
        st.error("Choose at least one method.")
    elif budget_error:
        st.error(budget_error)
    else:
        args = ["--backbone", cfg["backbone"], "--weights", cfg["weights"], "--dataset", cfg["dataset"],
                "--method", ",".join(methods), "--layers", str(cfg["layers"]), "--epochs", str(epochs),
                "--batch-size", str(batch_size), "--lr", str(lr), "--seed", str(cfg["seed"])]
        if limit_train:
            args += ["--limit-train", str(limit_train)]
        eps = [f"{m}={eps_hosvd if m == 'hosvd' else eps_lance:g}" for m in methods
               if m == "hosvd" or (m == "lance" and not planned)]
        if eps:
            args += ["--eps", ",".join(eps)]
        args += planned
        if cfg.get("resolution"):
            args += ["--resolution", str(cfg["resolution"])]
        try:
            job = job_runner().start(KIND, args, label=f"{','.join(methods)} on {cfg['dataset']}",
                                     extra={"methods": methods, "epochs": int(epochs),
                                            "steps_per_run": steps_per_run(int(limit_train), int(batch_size),
                                                                           int(epochs))})
            attach_job(KIND, job.job_id)
            st.session_state.pop(f"{KIND}_view", None)
        except Exception as exc:
            show_error(f"Could not start the job: {exc}", exc)

job_id = attached_job(KIND)
running_jobs_picker(KIND, job_id)
if not job_id:
    st.info("No job attached. Start one above, or attach to a running one.")
    st.stop()

known, alive = job_state(KIND, job_id)
if not known:
    st.warning(f"Job `{job_id}` is not known on this server (its record is not in the run store's "
               "app_jobs folder). Showing whatever runs the store has for it.")
job = job_runner().get(job_id)
extra = job.extra if job else {}


def build_figures(df) -> list[tuple[str, object]]:
    """The six live charts as (widget key, plotly figure)."""
    acc = figures.metric_figure(df, "acc", split="train", title="accuracy (train steps, val epochs)",
                                y_title="accuracy (%)")
    val = df[(df["key"] == "acc") & (df["split"] == "val")] if not df.empty else df
    for label, part in (val.groupby("label") if not val.empty else []):
        x = part["step"] if part["step"].notna().all() else part["epoch"]
        acc.add_trace(go.Scatter(x=x.tolist(), y=part["value"].tolist(), mode="markers",
                                 marker=dict(size=10, symbol="diamond"), name=f"{label} (val)"))
    return [
        ("ft_loss", figures.metric_figure(df, "loss", split="train", title="training loss")),
        ("ft_acc", acc),
        ("ft_bytes", figures.memory_figure(df)),
        ("ft_step", figures.metric_figure(df, "step_ms", split="train", title="step time", y_title="ms",
                                          log_y=True)),
        ("ft_ranks", figures.prefixed_metric_figure(df, "rank/", split="train", title="ranks in use",
                                                    y_title="rank", log_y=True)),
        ("ft_energy", figures.prefixed_metric_figure(df, "captured_energy/", split="train",
                                                     title="captured energy of the stored subspace",
                                                     y_title="fraction")),
    ]


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
    n_runs = len(extra.get("methods", [])) or max(1, len(view.runs))
    progress = job_progress(view, n_runs, extra.get("steps_per_run"), extra.get("epochs"))
    st.progress(progress, text=f"{progress:.0%} · {len(view.runs)}/{n_runs} run(s) started")
    status_banner(KIND, job_id, view, now_alive)
    df = view.frame
    signature = (job_id, len(df))
    cached = st.session_state.get("ft_figures")
    if cached is None or cached[0] != signature:  # rebuild only when rows arrived (cheap idle polls)
        cached = (signature, build_figures(df))
        st.session_state["ft_figures"] = cached
    figs = cached[1]
    for i in range(0, len(figs), 2):
        cols = st.columns(2)
        for col, (key, fig) in zip(cols, figs[i:i + 2]):
            col.plotly_chart(fig, key=key)
    st.caption(f"{len(df)} metric rows · polled every {POLL_S:g} s while running")
    if alive and not now_alive:
        st.rerun()  # the job just ended: redraw once without the timer


live_view()
