"""Sweep: start or attach to a grid of fine-tuning runs on Ray; trials live; the accuracy–memory front."""
from __future__ import annotations

import streamlit as st

from lance_app.live import readable_failure
from lance_app.paths import pages_dir
from lance_app.state import (
    METHODS,
    attach_job,
    attached_job,
    job_runner,
    open_store,
    setup_config,
    show_error,
)
from lance_app.sweep_view import (
    configurations_frame,
    front_figure,
    selected_config,
    trials_frame,
)
from lance_app.views import stop_button

KIND = "sweep"
POLL_S = 1.0

st.title("Sweep")
st.caption("A grid of fine-tuning runs — methods × budgets / ε × seeds — on Ray (a local instance, or "
           "`lance sweep --address` for a cluster). Each trial is a normal run in the run store; the figure "
           "shows each configuration's mean ± std over seeds against its measured layer bytes.")
cfg = setup_config()

with st.form("sweep_form"):
    methods = st.multiselect("Methods", METHODS, default=["asi", "lance"], key="sw_methods")
    c1, c2, c3 = st.columns(3)
    budgets = c1.text_input("Budgets (ASI, LANCE)", "12kB,40kB", key="sw_budgets",
                            help="comma-separated, e.g. 12kB,40kB,0.1MB; empty: default ranks")
    eps = c2.text_input("ε (HOSVD, LANCE without a budget)", "", key="sw_eps", help="comma-separated, e.g. 0.6,0.8")
    seeds = c3.text_input("Seeds", "0,1", key="sw_seeds")
    c4, c5, c6, c7 = st.columns(4)
    epochs = c4.number_input("Epochs", 1, 100, 1, key="sw_epochs")
    limit_train = c5.number_input("Training images (0 = all)", 0, 1_000_000, 192, step=64, key="sw_limit")
    workers = c6.number_input("Workers (trials at once)", 1, 64, 1, key="sw_workers")
    threads = c7.number_input("Threads per worker", 1, 64, 1, key="sw_threads")
    submitted = st.form_submit_button("Start sweep", type="primary")

if submitted:
    if not methods:
        st.error("Choose at least one method.")
    else:
        args = ["--kind", "finetune", "--backbone", cfg["backbone"], "--dataset", cfg["dataset"],
                "--layers", str(cfg["layers"]), "--method", ",".join(methods), "--seeds", seeds or "0",
                "--epochs", str(epochs), "--workers", str(workers), "--threads-per-worker", str(threads),
                "--set", "batch_size=32", "--set", "limit_val=256"]
        if cfg.get("weights"):
            args += ["--set", f"weights={cfg['weights']}"]
        if cfg.get("resolution"):
            args += ["--set", f"resolution={cfg['resolution']}"]
        if budgets.strip():
            args += ["--budget", budgets.strip()]
        if eps.strip():
            args += ["--eps", eps.strip()]
        if limit_train:
            args += ["--limit-train", str(limit_train)]
        try:
            job = job_runner().start(KIND, args, label=f"sweep {','.join(methods)}")
            attach_job(KIND, job.job_id)
            st.query_params.pop("sweep", None)
        except Exception as exc:  # noqa: BLE001 - shown on the page
            show_error(f"Could not start the sweep: {exc}", exc)

try:
    from engine.store.sweeps import SweepStore
    from engine.sweep.results import sweep_results

    sweeps = SweepStore(open_store())
    stored = sweeps.list_sweeps()
except Exception as exc:  # noqa: BLE001 - shown on the page
    show_error(f"Could not read the sweeps in the run store: {exc}", exc)
    st.stop()

job_id = attached_job(KIND)
sweep_id = st.query_params.get("sweep")
if job_id and not sweep_id:
    mine = [s for s in stored if s["job_id"] == job_id]
    sweep_id = mine[0]["id"] if mine else None
ids = [s["id"] for s in stored]
if ids:
    labels = {s["id"]: f"{s['id']} · {s['kind']} · {s['status']} · {', '.join(s['spec'].get('methods', []))}"
              for s in stored}
    index = ids.index(sweep_id) if sweep_id in ids else None
    picked = st.selectbox("Attach to a stored sweep", ids, index=index, format_func=labels.get,
                          placeholder="choose a sweep", key="sw_pick")
    if picked and picked != sweep_id:
        sweep_id = picked
        st.query_params["sweep"] = picked
if job_id and not sweep_id:
    runner = job_runner()
    if runner.is_alive(job_id):
        st.info(f"Job `{job_id}` is starting the sweep (Ray, data, model)…")
        st.button("Refresh", key="sw_refresh")
    else:
        st.error(f"Job `{job_id}` ended before recording a sweep: {readable_failure(runner.log_tail(job_id))}")
    st.stop()
if not sweep_id:
    st.info("No sweep attached. Start one above, attach to a stored one, or run `lance sweep …`.")
    st.stop()


@st.fragment(run_every=POLL_S)
def live_view() -> None:
    try:
        results = sweep_results(sweep_id, open_store())
    except Exception as exc:  # noqa: BLE001 - shown on the page
        show_error(f"Could not read sweep {sweep_id}: {exc}", exc)
        return
    s = results["sweep"]
    head, stop_col = st.columns([5, 1])
    head.markdown(f"**Sweep `{s['id']}`** · {s['status']} · {s['completed']}/{s['trials']} trials completed"
                  f" · {s['failed']} failed · {s['running']} running")
    sweep_job = s.get("job_id")
    if sweep_job:
        with stop_col:
            stop_button(KIND, sweep_job, job_runner().is_alive(sweep_job))
    st.progress(min(1.0, (s["completed"] + s["failed"]) / max(1, s["trials"])))
    if s["message"]:
        st.caption(s["message"])
    event = st.plotly_chart(front_figure(results), key="sweep_front", on_select="rerun", selection_mode="points")
    configs = {c["config_key"]: c for c in results["configurations"]}
    chosen = selected_config(event)
    options = [k for k, c in configs.items() if c["completed"]]
    if chosen not in options:
        chosen = st.selectbox("Configuration (or click a point)", options, format_func=lambda k: configs[k]["label"],
                              index=None, placeholder="choose a configuration", key="sw_config")
    if chosen:
        c = configs[chosen]
        st.markdown(f"**{c['label']}** · runs of seeds {', '.join(str(x) for x in sorted(c['seeds']))}")
        frame = trials_frame(results)
        st.dataframe(frame[frame["run"].isin(c["run_ids"])], hide_index=True, key="sw_chosen_runs")
        if st.button("Open these runs on the Runs page", key="sw_open_runs"):
            st.session_state["runs_selected"] = list(c["run_ids"])
            try:
                st.switch_page(pages_dir() / "runs.py")
            except Exception:  # noqa: BLE001 - the page runs on its own (tests): the selection waits in the session
                st.info("Selected on the Runs page: " + ", ".join(c["run_ids"]))
    st.subheader("Configurations")
    st.dataframe(configurations_frame(results), hide_index=True, key="sw_configs")
    st.subheader("Trials")
    st.dataframe(trials_frame(results), hide_index=True, key="sw_trials")


live_view()
