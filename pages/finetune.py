"""Fine-tune: choose methods (or a plan from the Budget page), start a job, watch it live, compare at the end."""
from __future__ import annotations

import streamlit as st

from engine.calibration.plan import PlanError
from lance_app import budget_view, finetune_form, glossary
from lance_app.calib import (
    budget_finetune_args,
    default_calibration,
    load_plan,
    plan_finetune_args,
    plan_path,
    solve_plan,
)
from lance_app.catalog import Unavailable
from lance_app.figures import format_bytes
from lance_app.finetune_view import build_figures
from lance_app.form_store import load_form, save_form, seed_session
from lance_app.live import POLL_S, job_progress, steps_per_run
from lance_app.state import METHODS, attached_job, job_runner, open_store, setup_config, show_error
from lance_app.steady import steady_layout
from lance_app.summary_table import summary_frame
from lance_app.views import (
    job_state,
    phase_progress,
    poll_view,
    running_jobs_picker,
    start_job,
    status_banner,
    stop_button,
)

KIND = "finetune"
FORM = "finetune"
st.title("Fine-tune")
steady_layout()
cfg = setup_config()
st.caption(f"Setup: **{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}**, last "
           f"{cfg['layers']} layers, seed {cfg['seed']} — change it on the Setup page.")

# -- the form: last values from the store (a reload is a new session), the plan from the URL ----------
stored = seed_session(st.session_state, FORM, finetune_form.DEFAULTS, {"ft_methods": METHODS}, flag="ft_seeded")
if "plan" in st.query_params:
    st.session_state["ft_plan"] = st.query_params["plan"] or None
elif "ft_plan" not in st.session_state:
    st.session_state["ft_plan"] = stored.get("plan")

plan = plan_file = None
if st.session_state["ft_plan"]:
    try:
        plan_file = plan_path(st.session_state["ft_plan"])
        plan = load_plan(plan_file)
    except PlanError as exc:
        st.error(f"Plan: {exc}")
if plan is not None:
    with st.container(border=True):
        c1, c2 = st.columns([5, 1])
        c1.markdown(f"**Training plan `{plan_file.stem}`** · {format_bytes(plan.plan_total_bytes)} "
                    f"stored by {len(plan.layers)} layers (budget {format_bytes(plan.budget_bytes)}, "
                    f"vanilla {format_bytes(plan.vanilla_bytes)}) at batch size {plan.batch_size} · "
                    "ASI and LANCE train exactly these ranks")
        if c2.button("Don't use it", key="ft_plan_clear"):
            st.session_state["ft_plan"] = None
            if "plan" in st.query_params:
                del st.query_params["plan"]
            save_form(FORM, {**load_form(FORM), "plan": None})
            st.rerun()
        with st.expander("ranks of the plan"):
            st.dataframe(budget_view.rank_table(plan), hide_index=True)
        if plan.backbone not in (None, cfg["backbone"]) or len(plan.layers) != int(cfg["layers"]):
            st.warning(f"This plan is for {plan.backbone}, {len(plan.layers)} layers; the Setup page says "
                       f"{cfg['backbone']}, last {cfg['layers']}: the run would refuse it. Make a plan for this "
                       "setup on the Budget page.")
    st.session_state["ft_batch"] = int(plan.batch_size)

methods = st.multiselect("Methods (run one after another, same data order and seed)", METHODS, key="ft_methods")
c1, c2, c3, c4, c5 = st.columns(5)
c1.number_input("Epochs", step=1, key="ft_epochs")
c2.number_input("Batch size", step=1, key="ft_batch", disabled=plan is not None,
                help="fixed by the plan" if plan is not None else None)
c3.number_input("Learning rate", step=0.01, format="%.4f", key="ft_lr")
c4.number_input("Training images (0 = all)", step=64, key="ft_limit")
c5.number_input("Validation images (0 = all)", step=100, key="ft_limit_val",
                help="a seeded subset: on a large validation split (cifar10-jpeg: 5,000) this keeps the first "
                     "evaluation (and the feature cache) short")
c6, c7, c8 = st.columns(3)
c6.number_input("HOSVD ε", step=0.05, format="%.3f", key="ft_eps_hosvd")
c7.number_input("LANCE ε", step=0.05, format="%.3f", key="ft_eps_lance", disabled=plan is not None,
                help="not used: LANCE trains the plan's ranks" if plan is not None else None)
c8.text_input("ASI + LANCE budget (e.g. 64KiB, 0.5MB; empty = default ranks / ε)", key="ft_budget",
              disabled=plan is not None, help="not used: the plan fixes the ranks" if plan is not None else None)
st.caption(f"{glossary.EPS} With a budget (or a plan), ASI and LANCE store the ranks the exact knapsack picks "
           "for it; LANCE ε is then not used.")

values = {key: st.session_state.get(key) for key in finetune_form.DEFAULTS}
save_form(FORM, {**values, "plan": st.session_state["ft_plan"] if plan is not None else None})
check = finetune_form.check_form(values)
for message in check.errors.values():
    if message != "Methods: choose at least one method.":
        st.error(message)
submitted = st.button("Start fine-tuning", type="primary", key="ft_start")


def budget_problem(budget: str, batch_size: int) -> str | None:
    """Refuse an unreadable or infeasible budget before a job starts (the calibration the run would make:
    `lance calibrate`'s defaults, cached)."""
    try:
        solve_plan(default_calibration(cfg), budget, batch_size)
    except Unavailable:
        return None  # the CLI checks it
    except ValueError as exc:  # unreadable (BudgetError) or infeasible (states the least that fits)
        return f"ASI + LANCE budget: {exc}"
    return None


if submitted:
    uses_plan = plan is not None and {"asi", "lance"} & set(methods)
    budget = "" if plan is not None else str(values["ft_budget"] or "").strip()
    planned = budget_finetune_args(budget, methods)
    problem = next(iter(check.errors.values()), None)
    if problem is None and planned:
        problem = budget_problem(budget, check.values["ft_batch"])
    if problem:
        st.error(f"Not started. {problem}")
    else:
        try:
            plan_args = plan_finetune_args(plan_file, plan) if uses_plan else None
            args = finetune_form.finetune_args(cfg, check.values, plan_args=plan_args, budget_args=planned)
        except Exception as exc:
            show_error(f"Could not start the job: {exc}", exc)
        else:
            batch = int(plan.batch_size) if uses_plan else int(check.values["ft_batch"])
            start_job(KIND, args, label=f"{','.join(methods)} on {cfg['dataset']}",
                      extra={"methods": methods, "epochs": int(check.values["ft_epochs"]),
                             "plan": plan_file.stem if uses_plan else None,
                             "steps_per_run": steps_per_run(int(check.values["ft_limit"]), batch,
                                                            int(check.values["ft_epochs"]))})

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


def resume_buttons(view, now_alive: bool) -> None:
    """A Resume button per interrupted run (`lance finetune --resume RUN` in a new job)."""
    if now_alive:
        return
    store = open_store()
    for run in view.runs:
        if run.get("status") != "interrupted":
            continue
        if not store.checkpoint_path(run["id"]).is_file():
            st.caption(f"Run `{run['id']}` ({run.get('method')}) stopped before its first epoch ended: nothing to "
                       "resume from; start a new job.")
            continue
        if st.button(f"Resume {run.get('method')} (run {run['id'][-6:]})", key=f"ft_resume_{run['id']}",
                     icon=":material/play_arrow:"):
            if start_job(KIND, ["--resume", run["id"]], label=f"resume {run.get('method')}",
                         extra={"methods": [run.get("method")], "resumed": run["id"],
                                "epochs": (run.get("config") or {}).get("epochs")}):
                st.rerun()


@st.fragment(run_every=POLL_S if alive else None)
def live_view() -> None:
    now_alive = job_runner().is_alive(job_id)
    view = poll_view(KIND, job_id)
    if view is None:
        return
    head, stop_col = st.columns([5, 1])
    head.markdown(f"**Job `{job_id}`** · {'running' if now_alive else 'finished'}"
                  + (f" · plan `{extra['plan']}`" if extra.get("plan") else ""))
    with stop_col:
        stop_button(KIND, job_id, now_alive)
    phase_progress(job_id, now_alive)  # decoding, caching, calibrating, training, …
    n_runs = len(extra.get("methods", [])) or max(1, len(view.runs))
    progress = job_progress(view, n_runs, extra.get("steps_per_run"), extra.get("epochs"))
    st.progress(progress, text=f"{progress:.0%} · {len(view.runs)}/{n_runs} run(s) started")
    status_banner(KIND, job_id, view, now_alive)
    resume_buttons(view, now_alive)
    df = view.frame
    signature = (job_id, len(df), now_alive)
    cached = st.session_state.get("ft_figures")
    if cached is None or cached[0] != signature:  # rebuild only when rows arrived (cheap idle polls)
        cached = (signature, build_figures(df, finished=not now_alive))
        st.session_state["ft_figures"] = cached
    figs = cached[1]
    for i in range(0, len(figs), 2):
        cols = st.columns(2)
        for col, (key, fig) in zip(cols, figs[i:i + 2]):
            col.plotly_chart(fig, key=key)
    st.caption(f"{len(df)} metric rows · polled every {POLL_S:g} s while running")
    summary_view(view, now_alive)
    if alive and not now_alive:
        st.rerun()  # the job just ended: redraw once without the timer


def summary_view(view, now_alive: bool) -> None:
    """The end-of-job table (each run's row once it has a summary)."""
    if not any(run.get("summary") for run in view.runs):
        return
    stored_runs = [] if any(r.get("method") == "vanilla" for r in view.runs) else open_store().list_runs(kind=KIND)
    table, reference = summary_frame(view.runs, stored_runs)
    st.subheader("Summary" if not now_alive else "Summary so far")
    st.dataframe(table, hide_index=True, key="ft_summary")
    if reference is None:
        st.caption("× vs vanilla: no vanilla run of this setup (backbone, weights, dataset, layers, batch size, "
                   "resolution) in the store yet; add vanilla to the methods to compare.")
    elif reference.get("job_id") != job_id:
        st.caption(f"× vs vanilla: against stored vanilla run `{reference['id']}` of the same setup.")
    st.caption("final / best acc: validation accuracy after the last / best epoch · layer bytes: peak activation "
               "bytes the fine-tuned layers stored for backward (measured) · region bytes: everything saved "
               "between the first and last fine-tuned layer · median step ms, MFLOP/step: medians over steps.")


live_view()
