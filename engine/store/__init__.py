"""The run store: one SQLite database (WAL) plus one folder per run.

See ``docs/CONTRACTS.md`` ("Run store") for the API every other piece relies on.

    >>> from engine.store import RunStore
    >>> store = RunStore()                       # $LANCE_HOME or the user data dir
    >>> run_id = store.create_run(kind="finetune", method="asi", config={"seed": 0})
    >>> store.log_metrics(run_id, [{"step": 1, "epoch": 0, "split": "train", "key": "loss", "value": 2.3}])
    >>> store.set_status(run_id, "completed")
"""
from engine.store.runs import (
    RUN_KINDS,
    RUN_STATUSES,
    RunNotFound,
    RunStore,
    StoreDamaged,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
)

__all__ = ["RUN_KINDS", "RUN_STATUSES", "RunNotFound", "RunStore", "StoreDamaged", "StoreError", "StoreReadOnly",
           "StoreUnavailable"]
