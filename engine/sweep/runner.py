"""Run a sweep's trials on Ray: one ``ray.remote`` task per trial, at most ``workers`` at once.

``start_ray`` starts a local Ray instance on this machine (no set-up: no dashboard, a small object store,
``workers × threads_per_worker`` CPUs) or joins a cluster (``address``). ``run_sweep`` records the sweep
and its trials in the run store, skips the trials that completed before (``resume``), submits the rest
as Ray tasks (each asking for ``threads_per_worker`` CPUs; Ray places them), and records every outcome:
a trial whose worker died or whose task raised is ``failed`` with the reason, and the sweep goes on.
Ctrl-C cancels the running tasks (their runs end ``interrupted``) and leaves the sweep resumable.
"""
from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from engine.store import RunStore, StoreError
from engine.store.sweeps import SweepStore
from engine.sweep.spec import SweepError, SweepSpec
from engine.sweep.trial import driver_env, execute_trial
from engine.train.config import ConfigError, validate

OBJECT_STORE_BYTES = 96 * 1024 * 1024   # trials return small dicts; the store holds nothing big
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


class RayMissing(SweepError):
    pass


def new_sweep_id() -> str:
    return "sw-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _ray():
    try:
        import ray
    except ImportError:
        raise RayMissing("lance sweep runs on Ray, which is not installed: pip install 'ray[default]' "
                         "(or pip install -e '.[sweep]')") from None
    return ray


def start_ray(address: str | None = None, workers: int = 1, threads_per_worker: int = 1) -> bool:
    """Start (or join) Ray unless it is running in this process already; True when this call started it.

    Local: ``num_cpus = workers × threads_per_worker``, no dashboard, a 96 MiB object store, and the
    workers import this checkout's ``engine`` (its folder goes first on their PYTHONPATH).
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    env = {"OMP_NUM_THREADS": str(threads_per_worker), "OMP_WAIT_POLICY": "PASSIVE"}
    if address is None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=workers * threads_per_worker, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, logging_level="warning",
                 runtime_env={"env_vars": env})
    else:
        ray.init(address=address, log_to_driver=False, logging_level="warning",
                 runtime_env={"env_vars": env})
    return True


def prepare_sweep(spec: SweepSpec | None, store: RunStore, resume: str | None = None,
                  job_id: str | None = None) -> tuple[str, SweepSpec, list]:
    """Create the sweep (or claim it to resume); returns ``(sweep_id, spec, trials still to run)``."""
    sweeps = SweepStore(store)
    if resume is not None:
        sweep = sweeps.get_sweep(resume)
        if sweep["status"] == "running":
            raise SweepError(f"sweep {sweep['id']} is still running (pid {sweep['pid']}); stop it first")
        spec = SweepSpec.from_dict(sweep["spec"]).validate()
        sweep_id = sweep["id"]
        trials = spec.trials()
        sweeps.add_trials(sweep_id, [t.to_dict() for t in trials])
        sweeps.claim_sweep(sweep_id, job_id=job_id)
        done = {t["key"] for t in sweeps.trials(sweep_id) if t["status"] == "completed"}
        return sweep_id, spec, [t for t in trials if t.key not in done]
    if spec is None:
        raise SweepError("give a sweep to run or --resume SWEEP_ID")
    spec.validate()
    _check_trial_configs(spec)
    sweep_id = new_sweep_id()
    trials = spec.trials()
    sweeps.create_sweep(sweep_id, spec.kind, spec.to_dict(), [t.to_dict() for t in trials], job_id=job_id)
    return sweep_id, spec, trials


def _check_trial_configs(spec: SweepSpec) -> None:
    """Every trial's settings are checked before any starts (the reason names the trial)."""
    for trial in spec.trials():
        try:
            if spec.kind == "finetune":
                validate(spec.finetune_config(trial))
            else:
                spec.sequence_spec(trial).config_for(trial.method)
        except (ConfigError, ValueError, TypeError) as exc:
            raise SweepError(f"trial {trial.label} seed {trial.seed}: {exc}") from None


def run_sweep(spec: SweepSpec | None = None, store: RunStore | None = None, *, resume: str | None = None,
              address: str | None = None, workers: int = 1, threads_per_worker: int = 1,
              job_id: str | None = None, on_trial: Callable[[dict], None] | None = None,
              on_start: Callable[[str, int], None] | None = None) -> str:
    """Run (or resume) a sweep to the end; returns its id. Results: ``engine.sweep.results.sweep_results``.

    ``on_start(sweep_id, trials_to_run)`` is called once the sweep is recorded; ``on_trial(outcome)``
    after every trial (``{key, status, run_id, message}``).
    """
    if workers < 1 or threads_per_worker < 1:
        raise SweepError("--workers and --threads-per-worker must be >= 1")
    store = store or RunStore()
    sweep_id, spec, todo = prepare_sweep(spec, store, resume=resume, job_id=job_id)
    sweeps = SweepStore(store)
    if on_start is not None:
        on_start(sweep_id, len(todo))
    started = False
    try:
        started = start_ray(address, workers, threads_per_worker)
        _drive(spec, todo, store, sweeps, sweep_id, workers, threads_per_worker, on_trial)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (Ray's driver handler exits)
        sweeps.set_sweep_status(sweep_id, "interrupted",
                                f"stopped; `lance sweep --resume {sweep_id}` runs the trials that did not finish")
        raise
    except BaseException as exc:
        sweeps.set_sweep_status(sweep_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if started:
            _ray().shutdown()
    failed = [t for t in sweeps.trials(sweep_id) if t["status"] != "completed"]
    sweeps.set_sweep_status(sweep_id, "completed",
                            f"{len(failed)} trial(s) did not complete" if failed else None)
    return sweep_id


def _drive(spec, todo, store, sweeps, sweep_id, workers, threads, on_trial) -> None:
    ray = _ray()
    task = ray.remote(execute_trial).options(num_cpus=threads, max_retries=0)
    env = driver_env()
    spec_dict = spec.to_dict()
    root = str(store.root)
    pending = list(todo)
    in_flight: dict = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                trial = pending.pop(0)
                ref = task.remote(spec_dict, trial.to_dict(), root, sweep_id, env, threads)
                in_flight[ref] = trial
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                trial = in_flight.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, or the task raised
                    message = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                    sweeps.trial_ended(sweep_id, trial.key, "failed", message=message)
                    outcome = {"key": trial.key, "status": "failed", "run_id": None, "message": message}
                if on_trial is not None:
                    on_trial({**outcome, "label": trial.label, "seed": trial.seed})
    except KeyboardInterrupt:
        for ref in in_flight:
            ray.cancel(ref)
        for ref, trial in in_flight.items():
            try:
                ray.get(ref, timeout=30)
            except Exception:  # noqa: BLE001 - cancelled or gone: mark it ourselves
                sweeps.trial_ended(sweep_id, trial.key, "interrupted", message="cancelled (the sweep was stopped)")
        raise


def log_trial(stream=sys.stderr) -> Callable[[dict], None]:
    """An ``on_trial`` that prints one line per finished trial."""
    count = {"n": 0}

    def show(outcome: dict) -> None:
        count["n"] += 1
        line = f"[{count['n']}] {outcome['label']} seed {outcome['seed']}: {outcome['status']}"
        if outcome.get("run_id"):
            line += f" (run {outcome['run_id']})"
        if outcome["status"] != "completed" and outcome.get("message"):
            line += " — " + outcome["message"].splitlines()[0]
        print(line, file=stream, flush=True)

    return show


__all__ = ["RayMissing", "StoreError", "log_trial", "new_sweep_id", "prepare_sweep", "run_sweep", "start_ray"]
