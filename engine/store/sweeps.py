"""Sweeps in the run store: tables ``sweeps`` and ``sweep_trials`` beside ``runs``.

A sweep is a grid of trials; every trial is one normal run (kind ``finetune`` or ``continual``)
whose ``job_id`` is ``<sweep_id>:<trial_key>`` and whose config carries ``sweep_id`` and
``sweep_trial``. The two tables add what a run cannot hold: the grid itself (``sweeps.spec``, so a
killed sweep can be resumed from its id alone) and one row per trial, also for trials that never got
a run (a worker that crashed, a setting refused before the run existed)::

    sweeps        id, kind, spec (JSON), status, message, created_at, updated_at, pid, pid_start, host, job_id
    sweep_trials  sweep_id, key, idx, method, seed, params (JSON), label, status, run_id, message,
                  attempts, started_at, ended_at

Trial statuses: ``pending`` (not started), ``running``, ``completed``, ``failed``, ``interrupted``.
A ``running`` sweep or trial whose process is gone (same host) reads back as ``interrupted``.
Timestamps are Unix seconds (float, UTC).
"""
from __future__ import annotations

import json
import os
import time

from engine.store.procinfo import hostname, is_alive, process_start_token
from engine.store.runs import RunStore, StoreError

SWEEP_STATUSES = ("running", "completed", "interrupted", "failed")
TRIAL_STATUSES = ("pending", "running", "completed", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    status      TEXT NOT NULL,
    message     TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    pid         INTEGER,
    pid_start   TEXT,
    host        TEXT,
    job_id      TEXT
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id    TEXT NOT NULL,
    key         TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    method      TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    params      TEXT NOT NULL,
    label       TEXT NOT NULL,
    status      TEXT NOT NULL,
    run_id      TEXT,
    message     TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    pid         INTEGER,
    pid_start   TEXT,
    host        TEXT,
    started_at  REAL,
    ended_at    REAL,
    PRIMARY KEY (sweep_id, key)
);
CREATE INDEX IF NOT EXISTS sweep_trials_run ON sweep_trials(run_id);
"""


class SweepNotFound(StoreError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "sweep not found"


def trial_job_id(sweep_id: str, key: str) -> str:
    """The ``job_id`` a trial's run carries."""
    return f"{sweep_id}:{key}"


class SweepStore:
    """The sweep tables of one ``RunStore`` (same database file, same transactions rules)."""

    def __init__(self, store: RunStore | None = None):
        self.store = store if store is not None else RunStore()
        statements = [s.strip() for s in _SCHEMA.split(";") if s.strip()]
        self.store._write(lambda c: [c.execute(s) for s in statements])

    # ------------------------------------------------------------------ sweeps
    def create_sweep(self, sweep_id: str, kind: str, spec: dict, trials: list[dict],
                     job_id: str | None = None) -> None:
        """New sweep (status ``running``, owned by this process) with its trials ``pending``.

        ``trials``: ``{key, method, seed, params, label}`` in grid order.
        """
        now, pid = time.time(), os.getpid()

        def insert(conn):
            if conn.execute("SELECT 1 FROM sweeps WHERE id=?", (sweep_id,)).fetchone():
                raise StoreError(f"a sweep {sweep_id!r} exists already; resume it with --resume {sweep_id}")
            conn.execute(
                "INSERT INTO sweeps (id, kind, spec, status, message, created_at, updated_at, pid, pid_start,"
                " host, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (sweep_id, kind, json.dumps(spec), "running", None, now, now, pid, process_start_token(pid),
                 hostname(), job_id))
            self._insert_trials(conn, sweep_id, trials)

        self.store._write(insert)

    @staticmethod
    def _insert_trials(conn, sweep_id: str, trials: list[dict]) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO sweep_trials (sweep_id, key, idx, method, seed, params, label, status)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [(sweep_id, t["key"], i, t["method"], int(t["seed"]), json.dumps(t["params"], sort_keys=True),
              t["label"], "pending") for i, t in enumerate(trials)])

    def add_trials(self, sweep_id: str, trials: list[dict]) -> None:
        """Insert trials that are not there yet (resume after the grid code changed); keeps the rest."""
        self.store._write(lambda c: self._insert_trials(c, sweep_id, trials))

    def claim_sweep(self, sweep_id: str, job_id: str | None = None) -> None:
        """Mark the sweep running again, owned by this process (``--resume``)."""
        pid = os.getpid()
        self.store._write(lambda c: c.execute(
            "UPDATE sweeps SET status='running', message=NULL, pid=?, pid_start=?, host=?, updated_at=?,"
            " job_id=COALESCE(?, job_id) WHERE id=?",
            (pid, process_start_token(pid), hostname(), time.time(), job_id, sweep_id)))

    def set_sweep_status(self, sweep_id: str, status: str, message: str | None = None) -> None:
        if status not in SWEEP_STATUSES:
            raise StoreError(f"unknown sweep status {status!r}; use one of {', '.join(SWEEP_STATUSES)}")
        cur = self.store._write(lambda c: c.execute(
            "UPDATE sweeps SET status=?, message=?, updated_at=? WHERE id=?",
            (status, message, time.time(), sweep_id)))
        if cur.rowcount == 0:
            raise SweepNotFound(f"no sweep {sweep_id!r} in {self.store.db_path}")

    def _sweep_row(self, row) -> dict:
        sweep = dict(row)
        sweep["spec"] = json.loads(sweep["spec"])
        if sweep["status"] == "running" and sweep["host"] in (None, hostname()) \
                and not is_alive(sweep["pid"], sweep["pid_start"]):
            sweep["status"] = "interrupted"
            sweep["message"] = (f"the sweep's process (pid {sweep['pid']}) is gone; "
                                f"`lance sweep --resume {sweep['id']}` runs the trials that did not finish")
        return sweep

    def get_sweep(self, sweep_id: str) -> dict:
        """id, kind, spec, status, message, created_at, updated_at, pid, host, job_id."""
        conn = self.store._connect()
        row = conn.execute("SELECT * FROM sweeps WHERE id=?", (sweep_id,)).fetchone()
        if row is None:
            rows = conn.execute("SELECT * FROM sweeps WHERE substr(id, 1, ?)=? ORDER BY created_at",
                                (len(sweep_id), sweep_id)).fetchall() if sweep_id else []
            if len(rows) == 1:
                row = rows[0]
            elif len(rows) > 1:
                raise StoreError(f"{sweep_id!r} matches {len(rows)} sweeps; give more of the id")
            else:
                raise SweepNotFound(f"no sweep {sweep_id!r} in {self.store.db_path}; "
                                    "`lance sweep --list` shows the stored sweeps")
        return self._sweep_row(row)

    def list_sweeps(self, job_id: str | None = None) -> list[dict]:
        """Sweeps, newest first (optionally the one an app job started)."""
        sql, params = "SELECT * FROM sweeps", []
        if job_id is not None:
            sql += " WHERE job_id=?"
            params.append(job_id)
        rows = self.store._connect().execute(sql + " ORDER BY created_at DESC", params).fetchall()
        return [self._sweep_row(r) for r in rows]

    # ------------------------------------------------------------------ trials
    def trials(self, sweep_id: str) -> list[dict]:
        """Trial rows in grid order; ``params`` decoded; dead ``running`` ones read as ``interrupted``."""
        rows = self.store._connect().execute(
            "SELECT * FROM sweep_trials WHERE sweep_id=? ORDER BY idx", (sweep_id,)).fetchall()
        out = []
        for row in rows:
            trial = dict(row)
            trial["params"] = json.loads(trial["params"])
            if trial["status"] == "running" and trial["host"] in (None, hostname()) \
                    and not is_alive(trial["pid"], trial["pid_start"]):
                trial["status"] = "interrupted"
                trial["message"] = trial["message"] or "the trial's worker process is gone"
            out.append(trial)
        return out

    def trial_started(self, sweep_id: str, key: str, pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else int(pid)
        cur = self.store._write(lambda c: c.execute(
            "UPDATE sweep_trials SET status='running', run_id=NULL, message=NULL, attempts=attempts+1, pid=?,"
            " pid_start=?, host=?, started_at=?, ended_at=NULL WHERE sweep_id=? AND key=?",
            (pid, process_start_token(pid), hostname(), time.time(), sweep_id, key)))
        if cur.rowcount == 0:
            raise SweepNotFound(f"no trial {key!r} in sweep {sweep_id!r}")

    def set_trial_run(self, sweep_id: str, key: str, run_id: str) -> None:
        self.store._write(lambda c: c.execute(
            "UPDATE sweep_trials SET run_id=? WHERE sweep_id=? AND key=?", (run_id, sweep_id, key)))

    def trial_ended(self, sweep_id: str, key: str, status: str, run_id: str | None = None,
                    message: str | None = None) -> None:
        if status not in TRIAL_STATUSES or status in ("pending", "running"):
            raise StoreError(f"a trial ends completed, failed or interrupted, not {status!r}")
        self.store._write(lambda c: c.execute(
            "UPDATE sweep_trials SET status=?, run_id=COALESCE(?, run_id), message=?, ended_at=?"
            " WHERE sweep_id=? AND key=?", (status, run_id, message, time.time(), sweep_id, key)))

    def delete_sweep(self, sweep_id: str, runs: bool = False) -> None:
        """Remove the sweep and its trial rows (and, with ``runs``, the trials' runs)."""
        sweep = self.get_sweep(sweep_id)
        if runs:
            for trial in self.trials(sweep["id"]):
                if trial["run_id"]:
                    try:
                        self.store.delete_run(trial["run_id"])
                    except StoreError:
                        pass

        def delete(conn):
            conn.execute("DELETE FROM sweep_trials WHERE sweep_id=?", (sweep["id"],))
            conn.execute("DELETE FROM sweeps WHERE id=?", (sweep["id"],))

        self.store._write(delete)
