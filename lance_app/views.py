"""Streamlit pieces shared by the Fine-tune and Continual pages: attach to a job, its live status."""
from __future__ import annotations

import time

import streamlit as st

from lance_app import figures
from lance_app.catalog import Unavailable
from lance_app.live import JobView, phase_line, readable_failure
from lance_app.state import attach_job, job_runner, open_store, show_error


def job_view(kind: str, job_id: str) -> JobView:
    """This session's JobView for ``job_id`` (kept across fragment reruns)."""
    key = f"{kind}_view"
    view = st.session_state.get(key)
    if view is None or view.job_id != job_id:
        view = JobView(job_id)
        st.session_state[key] = view
    return view


def running_jobs_picker(kind: str, current: str | None) -> None:
    """Jobs of this kind still running (this tab's, another tab's or another session's): attach."""
    runner = job_runner()
    jobs = [j for j in runner.list(kind=kind, active_only=True) if j.job_id != current]
    if not jobs:
        return
    with st.container(border=True):
        st.markdown(f"**{len(jobs)} {kind} job(s) running** (started in another tab or session)")
        for job in jobs[:5]:
            c1, c2 = st.columns([4, 1])
            started = time.strftime("%H:%M:%S", time.localtime(job.started_at))
            c1.write(f"`{job.job_id}` · {job.label} · started {started}")
            if c2.button("Attach", key=f"attach_{kind}_{job.job_id}"):
                attach_job(kind, job.job_id)
                st.rerun()


def job_state(kind: str, job_id: str) -> tuple[bool, bool]:
    """(known, alive) for a job: known = the runner or the store has heard of it."""
    runner = job_runner()
    alive = runner.is_alive(job_id)
    known = runner.get(job_id) is not None
    return known, alive


def poll_view(kind: str, job_id: str) -> JobView | None:
    """Poll the store for the job's runs and rows; None (with a message) when the store is missing."""
    view = job_view(kind, job_id)
    try:
        view.poll(open_store())
    except Unavailable as exc:
        st.error(f"Run store unavailable: {exc}")
        return None
    except Exception as exc:  # e.g. store busy: show, retry on the next poll
        st.warning(f"Could not read the run store just now ({exc}); retrying.")
    return view


def status_banner(kind: str, job_id: str, view: JobView, alive: bool) -> None:
    """One line per run: status and message; a readable error when the job died without a run."""
    runner = job_runner()
    if not view.runs:
        if alive:
            st.info(f"Job `{job_id}` is starting (loading data and model)…")
        else:
            rc = runner.returncode(job_id)
            msg = readable_failure(runner.log_tail(job_id))
            st.error(f"Job `{job_id}` ended{f' with exit status {rc}' if rc not in (None, 0) else ''} "
                     f"without starting a run: {msg}")
        return
    for run in view.runs:
        status = run.get("status", "?")
        text = f"**{run.get('method', '?')}** · run `{run['id']}` · {status}"
        if run.get("message"):
            text += f" · {run['message']}"
        if status == "failed":
            st.error(text)
        elif status == "interrupted":
            st.warning(text)
        elif status == "completed":
            st.success(text)
        else:
            st.info(text)
    if not alive and view.active:
        st.warning("The job's process is gone but a run still says running; the next server start "
                   "marks it interrupted.")
    rc = runner.returncode(job_id)
    if not alive and rc not in (None, 0) and all(r.get("status") == "completed" for r in view.runs):
        st.warning(f"The job exited with status {rc}: {readable_failure(runner.log_tail(job_id))}")


def stop_button(kind: str, job_id: str, alive: bool) -> None:
    if alive and st.button("Stop", key=f"stop_{kind}", type="secondary", icon=":material/stop:"):
        if job_runner().stop(job_id):
            st.toast("Stop sent (SIGINT to the job's process group).")
        time.sleep(0.3)


def start_job(kind: str, args: list[str], label: str, extra: dict):
    """Start ``lance <kind> *args`` as a background job, attach this session to it and drop the old view;
    the job, or None after showing why it could not start."""
    try:
        job = job_runner().start(kind, args, label=label, extra=extra)
    except Exception as exc:
        show_error(f"Could not start the job: {exc}", exc)
        return None
    attach_job(kind, job.job_id)
    st.session_state.pop(f"{kind}_view", None)
    return job


def phase_progress(job_id: str, alive: bool) -> None:
    """While the job runs, one progress slot with its phase (decoding, caching, calibrating, training, …):
    the same slot before the first phase arrives, so the layout does not jump."""
    if not alive:
        return
    phase = phase_line(open_store().phase(job_id), time.time())
    st.progress((phase[1] or 0.0) if phase else 0.0,
                text=f"Phase: {phase[0]}" if phase else "Phase: starting (no phase reported yet)")


def chart(fig, key: str, empty_message: str, container=None) -> None:
    """``st.plotly_chart(fig, key=key)``, or ``empty_message`` (st.info) while the figure has no point:
    no bare axes before the first rows. The key stays the same across polls, so a chart that has data
    is updated in place."""
    target = container if container is not None else st
    if figures.is_empty(fig):
        target.info(empty_message)
    else:
        target.plotly_chart(fig, key=key)


def cached_figures(state_key: str, signature, build):
    """``build()`` once per ``signature`` (e.g. (job id, row count, statuses)) per session: idle polls
    resend the very same figures, so the browser has nothing to redraw."""
    cached = st.session_state.get(state_key)
    if cached is None or cached[0] != signature:
        cached = (signature, build())
        st.session_state[state_key] = cached
    return cached[1]
