"""One trial, inside a Ray worker: a normal ``finetune`` or ``continual`` run in the run store.

``execute_trial`` is a plain function (Ray wraps it in ``runner.py``), so it also runs without Ray.
It sets the worker's threads (``torch.set_num_threads`` and ``OMP_NUM_THREADS``) and the environment the
driver passed (``LANCE_CACHE_DIR``, ``LANCE_DATA_ROOT``, ``LANCE_WEIGHTS_DIR``...), opens the store at
``store_root``, marks the trial running, trains, tags the run (``job_id = <sweep>:<key>``, config
``sweep_id``/``sweep_trial``) and records the trial's end. Every error becomes a ``failed`` trial with
the reason; nothing is raised except KeyboardInterrupt (a cancelled task), which marks it interrupted.
"""
from __future__ import annotations

import os
import traceback
from typing import Any

import torch

from engine.continual.session import run_method
from engine.store import RunStore
from engine.store.sweeps import SweepStore, trial_job_id
from engine.sweep.spec import SweepSpec, Trial
from engine.train.config import validate
from engine.train.session import run_finetune

PASSED_ENV = ("LANCE_CACHE_DIR", "LANCE_DATA_ROOT", "LANCE_WEIGHTS_DIR", "OMP_WAIT_POLICY")


def driver_env() -> dict[str, str]:
    """The environment variables a trial needs from the driver (those that are set)."""
    return {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}


def execute_trial(spec_dict: dict, trial_dict: dict, store_root: str, sweep_id: str,
                  env: dict[str, str] | None = None, threads: int = 1) -> dict[str, Any]:
    """Run one trial; returns ``{key, status, run_id, message}`` (status completed | failed | interrupted)."""
    os.environ.update(env or {})
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(int(threads))
    spec = SweepSpec.from_dict(spec_dict)
    trial = Trial(**trial_dict)
    store = RunStore(store_root)
    sweeps = SweepStore(store)
    sweeps.trial_started(sweep_id, trial.key)
    job_id = trial_job_id(sweep_id, trial.key)
    status, run_id, message = "failed", None, None
    try:
        if spec.kind == "finetune":
            status, run_id, message = _finetune(spec, trial, store, job_id)
        else:
            status, run_id, message = _continual(spec, trial, store, job_id)
    except KeyboardInterrupt:
        status, message = "interrupted", "cancelled (the sweep was stopped)"
        run_id = run_id or _run_of(store, job_id)
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the sweep goes on
        status, message = "failed", f"{type(exc).__name__}: {exc}"
        run_id = _run_of(store, job_id)
        if run_id is not None and store.get_run(run_id)["status"] == "running":
            store.set_status(run_id, "failed", message)
        if not isinstance(exc, ValueError):
            message += "\n" + traceback.format_exc(limit=8)
    if run_id is not None:
        store.update_config(run_id, {"sweep_id": sweep_id, "sweep_trial": trial.key})
    sweeps.trial_ended(sweep_id, trial.key, status, run_id=run_id, message=message)
    return {"key": trial.key, "status": status, "run_id": run_id, "message": message}


def _run_of(store: RunStore, job_id: str) -> str | None:
    runs = store.list_runs(job_id=job_id)
    return runs[-1]["id"] if runs else None


def _finetune(spec: SweepSpec, trial: Trial, store: RunStore, job_id: str):
    config = validate(spec.finetune_config(trial))
    results = run_finetune(config, store=store, job_id=job_id)
    result = results[0]
    return result.status, result.run_id, result.message


def _continual(spec: SweepSpec, trial: Trial, store: RunStore, job_id: str):
    seq = spec.sequence_spec(trial)
    seq.config_for(trial.method)  # validates the numbers before any run exists
    summary = run_method(store, seq, trial.method, job_id=job_id, stream=None)
    return "completed", summary["run_id"], None
