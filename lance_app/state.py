"""UI state shared by the pages: the chosen setup, the run store, the job runner, startup work.

Everything here that is cached with ``st.cache_resource`` is per server process and keyed by
LANCE_HOME, so tests that switch LANCE_HOME get fresh objects.
"""
from __future__ import annotations

import os
import traceback

import streamlit as st

from engine.home import lance_home
from engine.store import RunStore
from lance_app.catalog import DEFAULT_BACKBONE, DEFAULT_DATASET, DEFAULT_WEIGHTS, Unavailable
from lance_app.jobs import JobRunner

DEFAULT_CONFIG = {
    "backbone": DEFAULT_BACKBONE,
    "weights": DEFAULT_WEIGHTS,
    "dataset": DEFAULT_DATASET,
    "resolution": 0,  # 0 = the backbone's native resolution
    "layers": 4,  # fine-tune the last k compressible layers (all four of small-cnn-digits)
    "seed": 0,
}
METHODS = ["vanilla", "gradient_filter", "hosvd", "asi", "lance"]
CONTINUAL_METHODS = ["lance", "gpm", "finetune"]


def setup_config() -> dict:
    """The configuration chosen on the Setup page (defaults: small-cnn-digits, bundled weights, on digits-5to9)."""
    if "lance_config" not in st.session_state:
        st.session_state["lance_config"] = dict(DEFAULT_CONFIG)
    return st.session_state["lance_config"]


def home_key() -> str:
    return str(lance_home())


@st.cache_resource(show_spinner=False)
def _job_runner(home: str) -> JobRunner:
    return JobRunner(home)


def job_runner() -> JobRunner:
    """The server's one JobRunner for the current LANCE_HOME."""
    return _job_runner(home_key())


@st.cache_resource(show_spinner=False)
def _store(home: str):
    return RunStore(home, mark_orphans=False)  # orphans: once per server, in startup()


def open_store():
    """The server's RunStore on $LANCE_HOME (thread-safe: one SQLite connection per thread), opened
    once, so a poll every 0.5 s does not re-run the schema set-up in a write transaction.

    Raises Unavailable when the run store is not installed.
    """
    return _store(home_key())


@st.cache_resource(show_spinner=False)
def _startup(home: str) -> dict:
    """Once per server process and LANCE_HOME: mark runs of dead processes interrupted."""
    try:
        marked = list(_store(home).mark_orphans_interrupted() or [])
        return {"marked": marked, "error": None}
    except Unavailable as exc:
        return {"marked": [], "error": str(exc)}
    except Exception as exc:  # a broken store must not take the app down
        return {"marked": [], "error": f"could not check the run store at {home}: {exc}"}


def startup() -> dict:
    return _startup(home_key())


def show_error(message: str, exc: BaseException | None = None) -> None:
    """A readable error on the page; the traceback only goes to the server log."""
    st.error(message)
    if exc is not None and os.environ.get("LANCE_APP_DEBUG"):
        st.code("".join(traceback.format_exception(exc)))
    elif exc is not None:
        traceback.print_exception(exc)


def attached_job(kind: str) -> str | None:
    """The job this page shows: ``?job=`` in the URL (survives a refresh), else this session's."""
    job = st.query_params.get("job")
    if job:
        st.session_state[f"{kind}_job"] = job
        return job
    return st.session_state.get(f"{kind}_job")


def attach_job(kind: str, job_id: str | None) -> None:
    """Remember ``job_id`` for this page in the session and in the URL."""
    if job_id:
        st.session_state[f"{kind}_job"] = job_id
        st.query_params["job"] = job_id
    else:
        st.session_state.pop(f"{kind}_job", None)
        if "job" in st.query_params:
            del st.query_params["job"]
