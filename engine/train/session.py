"""Fine-tuning runs end to end: ``run_finetune(config)`` trains every method of ``config.methods``.

One command: check the arguments, prepare once (backbone, data, feature cache: engine.train.prepare),
then for each method: open a run in the store, build the compressed model (engine.train.trainable),
restore its checkpoint when resuming (engine.train.resume), fit (engine.train.loop, measured by
engine.train.probe), summarize (engine.train.summary) and close the run. Every method sees the same data in
the same order from the same initial weights (seeded), each as its own run.
"""
from __future__ import annotations

import os
import traceback
from functools import partial
from typing import Callable

from engine.malloc import tune_malloc
from engine.store import RunStore
from engine.train.budget import resolve_plans
from engine.train.config import ConfigError, FinetuneConfig, validate
from engine.train.events import RunEnded, emit_all
from engine.train.faults import TrainingDiverged, explain_failure, interrupt_on_signals
from engine.train.loop import LoopState, fit
from engine.train.prepare import Workbench, check_before_runs, prepare
from engine.train.probe import EngineProbe
from engine.train.provenance import provenance
from engine.train.resume import restore, save_epoch
from engine.train.sinks import StoreSink
from engine.train.summary import RunResult, plan_summary, summarize
from engine.train.trainable import build_trainable, jsonable, make_optimizer


def run_finetune(config: FinetuneConfig, store=None, sinks: list | None = None, job_id: str | None = None,
                 log: Callable[[str], None] = lambda s: None, resume_run: str | None = None,
                 bench: Workbench | None = None) -> list[RunResult]:
    """Train every method of ``config`` (or continue ``resume_run``); returns one result per run.

    Statuses: completed; failed (diverged loss, an error: the message says why); interrupted
    (Ctrl-C / SIGTERM: every metric so far is kept, the remaining methods do not start).
    Raises ConfigError for bad arguments found before any run is created (among them a plan that does
    not match the run and an infeasible budget: ``engine.train.budget.resolve_plans``); one found only
    during a run's setup fails that run (``bad_argument``).
    """
    tune_malloc()  # a step's activations reuse freed heap memory instead of page-faulting it in (engine.malloc)
    validate(config)
    store = store or RunStore()
    # weights, --layers, the patch, the data, the plans (--ranks / --budget): bad ones create no run
    layer_names, resolution = check_before_runs(config) if bench is None else (bench.layer_names, bench.resolution)
    plans = resolve_plans(config, layer_names, resolution, log)
    todo = [(config.methods[0], resume_run)] if resume_run is not None else [(m, None) for m in config.methods]
    results: list[RunResult] = []
    for method, resumed in todo:
        run_id = _open_run(store, config, method, resumed, job_id)
        run_sinks = [StoreSink(store, run_id), *(sinks or [])]
        log(f"[{method}] run {run_id}")
        try:
            with interrupt_on_signals():
                if bench is None:
                    bench = prepare(config, log)                           # prepare, once per command
                store.update_config(run_id, bench.describe())
                if method in plans and plans[method].plan is not None:
                    plans[method].plan.save(store.run_dir(run_id) / "plan.json")
                trainable = build_trainable(bench, method, plans)          # build
                store.update_config(run_id, {"method_info": jsonable(trainable.method_info)})
                optimizer, scheduler = make_optimizer(trainable, config)
                checkpoint = store.checkpoint_path(run_id)
                state = LoopState()
                if resumed:                                                # resume?
                    state = restore(checkpoint, trainable, optimizer, scheduler, config.epochs)
                    store.truncate_metrics(run_id, state.step)
                fit(trainable.wrapper, optimizer, bench.train, epochs=config.epochs,   # fit
                    steps_per_epoch=bench.steps_per_epoch, sinks=run_sinks, method=method, val_batches=bench.val,
                    scheduler=scheduler, grad_clip=config.grad_clip, state=state, device=config.device,
                    probe=EngineProbe(trainable, config.device, state.step), train_mode=trainable.handle.train_mode,
                    on_epoch_end=partial(save_epoch, checkpoint, bench, method, trainable, optimizer, scheduler),
                    config=config.method_config(method))
                results.append(_finish(store, run_id, run_sinks, "completed", None,  # summarize, finish
                                       plan_summary(trainable.method_info)))
        except TrainingDiverged as exc:
            results.append(_finish_safely(store, run_id, run_sinks, "failed", str(exc), method, log))
        except KeyboardInterrupt as exc:
            message = _interrupted_message(store, run_id, exc)
            results.append(_finish_safely(store, run_id, run_sinks, "interrupted", message, method, log))
            break
        except ConfigError as exc:  # found only now (e.g. an infeasible budget): this run fails, go on
            result = _finish_safely(store, run_id, run_sinks, "failed", str(exc), method, log)
            result.bad_argument = True
            results.append(result)
        except Exception as exc:  # noqa: BLE001 - a crash fails this run, the next method still runs
            if os.environ.get("LANCE_DEBUG"):
                log(traceback.format_exc())
            message = explain_failure(exc, lr=config.lr, method=method)
            results.append(_finish_safely(store, run_id, run_sinks, "failed", message, method, log))
    return results


def _open_run(store, config: FinetuneConfig, method: str, existing: str | None, job_id: str | None) -> str:
    """A new run of ``method`` (its frozen config), or ``existing`` claimed for this process to go on."""
    if existing is None:
        frozen = {**config.to_dict(), "methods_in_command": list(config.methods), "methods": [method],
                  "method": method, "method_options": config.method_config(method),
                  "provenance": provenance(config.device)}
        return store.create_run(kind="finetune", method=method, config=frozen, job_id=job_id)
    store.claim_run(existing, job_id=job_id)
    if store.get_run(existing)["config"].get("epochs") != config.epochs:
        store.update_config(existing, {"epochs": config.epochs})  # the stored config says what ran
    return existing


def _interrupted_message(store, run_id: str, exc: KeyboardInterrupt) -> str:
    step = store.last_step(run_id)
    where = f"at step {step}" if step else "during setup, before the first step"
    if store.checkpoint_path(run_id).is_file():
        hint = f"`lance finetune --resume {run_id}` continues from the last finished epoch"
    else:
        hint = "no epoch had finished, so there is no checkpoint to resume from"
    return f"{str(exc) or 'stopped by Ctrl-C'} {where}; every metric so far is kept; {hint}"


def _finish(store, run_id: str, sinks: list, status: str, message: str | None,
            extra: dict | None = None) -> RunResult:
    """Summarize the run's rows and close it (``RunEnded`` to every sink: the store sink writes the summary)."""
    summary = {**summarize(store.metrics(run_id)), **(extra or {}), "status": status}
    method = store.get_run(run_id)["method"]
    emit_all(sinks, RunEnded(status=status, message=message, summary=summary, method=method))
    return RunResult(run_id, method, status, message, summary)


def _finish_safely(store, run_id: str, sinks: list, status: str, message: str, method: str,
                   log: Callable[[str], None]) -> RunResult:
    """``_finish``, but a store that cannot be written (disk full, read-only) never hides ``message``:
    the result keeps the run's own cause plus the store's, and both are logged."""
    try:
        return _finish(store, run_id, sinks, status, message)
    except Exception as store_exc:  # noqa: BLE001 - the failure handler must not fail
        full = f"{message}; the run store could not record this: {store_exc}"
        log(f"[{method}] run {run_id} {status}: {full}")
        try:
            summary = summarize(store.metrics(run_id))
        except Exception:  # noqa: BLE001
            summary = {}
        summary["status"] = status
        return RunResult(run_id, method, status, full, summary)
