"""``RunStore``: runs and their metric rows in SQLite (WAL), one folder per run.

Layout under the root (``$LANCE_HOME`` or the user data dir)::

    runs.sqlite                  tables ``runs`` and ``metrics`` (long format)
    runs/<run_id>/config.json    frozen config (seed, package versions, git commit, device, ...)
    runs/<run_id>/summary.json   final figures, written by ``set_summary``
    runs/<run_id>/checkpoint.pt  what was trained, written by the training code

Several processes may write at once: every write is one ``BEGIN IMMEDIATE`` transaction, SQLite
serialises them and waits (``busy_timeout``) instead of failing, so no row is lost. A run records the
pid (plus its start time and host) of the process that writes it; ``mark_orphans_interrupted`` turns
``running`` runs whose process is gone (kill -9, crash, reboot) into ``interrupted`` ones.

Timestamps (``created_at``, ``updated_at``, metric ``time``) are Unix seconds (float, UTC).
A metric value that is NaN is stored as NULL (SQLite has no NaN) and read back as ``None``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from engine.store.paths import default_root
from engine.store.procinfo import hostname, is_alive, process_start_token

RUN_KINDS = ("finetune", "continual")
RUN_STATUSES = ("running", "completed", "failed", "interrupted")
METRIC_FIELDS = ("step", "epoch", "split", "task", "key", "value")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    method      TEXT,
    status      TEXT NOT NULL,
    message     TEXT,
    config      TEXT NOT NULL,
    summary     TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    pid         INTEGER,
    pid_start   TEXT,
    host        TEXT,
    job_id      TEXT
);
CREATE INDEX IF NOT EXISTS runs_job ON runs(job_id);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS metrics (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  TEXT NOT NULL,
    step    INTEGER,
    epoch   INTEGER,
    split   TEXT,
    task    INTEGER,
    key     TEXT NOT NULL,
    value   REAL,
    time    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, id);
CREATE INDEX IF NOT EXISTS metrics_run_key ON metrics(run_id, key);
"""

_BUSY_TIMEOUT_S = 60.0


class StoreError(Exception):
    """A run store problem the user can act on (message says what to do)."""


class RunNotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "run not found"


def _new_run_id() -> str:
    """Sortable and unique: ``YYYYMMDD-HHMMSS-<6 hex>`` (UTC)."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:  # noqa: BLE001
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, allow_nan=True)


def _to_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return None if math.isnan(value) else value


class RunStore:
    """SQLite run store. Safe to use from several threads and several processes at once.

    Args:
        root: folder of the store; None -> ``$LANCE_HOME`` or the user data dir (``lance-lab``).
        mark_orphans: on open, mark ``running`` runs whose process is dead as ``interrupted``.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, mark_orphans: bool = True):
        self.root = Path(root).expanduser() if root is not None else default_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "runs").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the run store at {self.root}: {exc}. "
                "Set LANCE_HOME to a writable folder."
            ) from exc
        self.db_path = self.root / "runs.sqlite"
        self._local = threading.local()
        self._init_schema()
        if mark_orphans:
            self.mark_orphans_interrupted()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections must not cross either)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        conn = sqlite3.connect(
            self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _write(self, fn):
        """Run ``fn(conn)`` in one immediate transaction; retry while another writer holds the lock."""
        conn = self._connect()
        deadline = time.monotonic() + _BUSY_TIMEOUT_S * 2
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise StoreError(f"the run store {self.db_path} stayed locked: {exc}") from exc
                time.sleep(0.01 + secrets.randbelow(20) / 1000)
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _init_schema(self) -> None:
        conn = self._connect()
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise StoreError(f"cannot open the run store {self.db_path}: {exc}") from exc
                time.sleep(0.02)
        if str(mode).lower() != "wal":
            raise StoreError(
                f"the run store {self.db_path} cannot use WAL mode (got {mode!r}); "
                "put LANCE_HOME on a local disk"
            )
        statements = [s.strip() for s in _SCHEMA.split(";") if s.strip()]
        self._write(lambda c: [c.execute(s) for s in statements])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def run_dir(self, run_id: str) -> Path:
        """``<root>/runs/<run_id>/`` (config.json, summary.json, checkpoint.pt)."""
        return self.root / "runs" / run_id

    def checkpoint_path(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "checkpoint.pt"

    def create_run(
        self,
        kind: str,
        method: str | None = None,
        config: dict | None = None,
        job_id: str | None = None,
        pid: int | None = None,
    ) -> str:
        """New run in status ``running``, owned by this process (or ``pid``); returns its id.

        Writes ``config.json`` into the run folder as well.
        """
        if kind not in RUN_KINDS:
            raise StoreError(f"unknown run kind {kind!r}; use one of {', '.join(RUN_KINDS)}")
        config = dict(config or {})
        pid = os.getpid() if pid is None else int(pid)
        now = time.time()
        run_id = _new_run_id()
        config_text = _dumps(config)
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(json.loads(config_text), indent=2) + "\n")

        def insert(conn):
            conn.execute(
                "INSERT INTO runs (id, kind, method, status, message, config, summary, created_at,"
                " updated_at, pid, pid_start, host, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, method, "running", None, config_text, None, now, now, pid,
                 process_start_token(pid), hostname(), job_id),
            )

        self._write(insert)
        return run_id

    def claim_run(self, run_id: str, pid: int | None = None, job_id: str | None = None) -> None:
        """Mark ``run_id`` as running again, owned by this process (used by ``--resume``).

        ``job_id``: the app job now driving the run (kept as it was when None)."""
        self.get_run(run_id)
        pid = os.getpid() if pid is None else int(pid)
        self._write(
            lambda c: c.execute(
                "UPDATE runs SET status='running', message=NULL, pid=?, pid_start=?, host=?,"
                " updated_at=?, job_id=COALESCE(?, job_id) WHERE id=?",
                (pid, process_start_token(pid), hostname(), time.time(), job_id, run_id),
            )
        )

    def set_status(self, run_id: str, status: str, message: str | None = None) -> None:
        if status not in RUN_STATUSES:
            raise StoreError(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}")
        cur = self._write(
            lambda c: c.execute(
                "UPDATE runs SET status=?, message=?, updated_at=? WHERE id=?",
                (status, message, time.time(), run_id),
            )
        )
        if cur.rowcount == 0:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}")

    def set_summary(self, run_id: str, summary: dict) -> None:
        """Store the run's summary (also written to ``summary.json`` in the run folder)."""
        text = _dumps(summary)
        cur = self._write(
            lambda c: c.execute(
                "UPDATE runs SET summary=?, updated_at=? WHERE id=?", (text, time.time(), run_id)
            )
        )
        if cur.rowcount == 0:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(json.loads(text), indent=2) + "\n")

    def update_config(self, run_id: str, updates: dict) -> dict:
        """Merge ``updates`` into the stored config (e.g. ranks known only after calibration)."""
        def merge(conn):
            row = conn.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
            config = json.loads(row["config"])
            config.update(updates)
            text = _dumps(config)
            conn.execute("UPDATE runs SET config=?, updated_at=? WHERE id=?", (text, time.time(), run_id))
            return json.loads(text)

        config = self._write(merge)
        (self.run_dir(run_id) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return config

    @staticmethod
    def _row_to_run(row: sqlite3.Row) -> dict:
        run = dict(row)
        run["config"] = json.loads(run["config"]) if run["config"] else {}
        run["summary"] = json.loads(run["summary"]) if run["summary"] else None
        return run

    def get_run(self, run_id: str) -> dict:
        """id, kind, method, status, message, config, summary, created_at, updated_at, pid, job_id."""
        row = self._connect().execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(
                f"no run {run_id!r} in {self.db_path}; `lance runs list` shows the stored runs"
            )
        return self._row_to_run(row)

    def find_run(self, prefix: str) -> dict:
        """The run whose id is ``prefix`` or starts with it (must be unambiguous)."""
        rows = self._connect().execute(
            "SELECT * FROM runs WHERE id=? OR id LIKE ? ESCAPE '\\' ORDER BY created_at",
            (prefix, prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"),
        ).fetchall()
        exact = [r for r in rows if r["id"] == prefix]
        if exact:
            return self._row_to_run(exact[0])
        if not rows:
            raise RunNotFound(
                f"no run {prefix!r} in {self.db_path}; `lance runs list` shows the stored runs"
            )
        if len(rows) > 1:
            ids = ", ".join(r["id"] for r in rows[:5])
            raise StoreError(f"{prefix!r} matches {len(rows)} runs ({ids}...); give more of the id")
        return self._row_to_run(rows[0])

    def list_runs(
        self, kind: str | None = None, status: str | None = None, job_id: str | None = None
    ) -> list[dict]:
        """Runs, oldest first, optionally filtered."""
        where, params = [], []
        for column, value in (("kind", kind), ("status", status), ("job_id", job_id)):
            if value is not None:
                where.append(f"{column}=?")
                params.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at, id"
        return [self._row_to_run(r) for r in self._connect().execute(sql, params).fetchall()]

    def delete_run(self, run_id: str) -> None:
        """Remove the run, its metric rows and its folder."""
        self.get_run(run_id)

        def delete(conn):
            conn.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id=?", (run_id,))

        self._write(delete)
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, run_id: str, rows: Iterable[dict]) -> int:
        """Append metric rows ``{step, epoch, split, task, key, value}`` in one transaction.

        Missing fields are NULL; ``key`` is required. Returns the number of rows written.
        """
        now = time.time()
        records = []
        for row in rows:
            if "key" not in row:
                raise StoreError(f"metric row without 'key': {row!r}")
            records.append((
                run_id,
                None if row.get("step") is None else int(row["step"]),
                None if row.get("epoch") is None else int(row["epoch"]),
                row.get("split"),
                None if row.get("task") is None else int(row["task"]),
                str(row["key"]),
                _to_float(row.get("value")),
                float(row.get("time", now)),
            ))
        if not records:
            return 0
        self._write(
            lambda c: c.executemany(
                "INSERT INTO metrics (run_id, step, epoch, split, task, key, value, time)"
                " VALUES (?,?,?,?,?,?,?,?)",
                records,
            )
        )
        return len(records)

    def metrics(
        self,
        run_id: str,
        key: str | None = None,
        split: str | None = None,
        since_id: int | None = None,
        task: int | None = None,
        key_prefix: str | None = None,
    ) -> list[dict]:
        """Rows ``{id, run_id, step, epoch, split, task, key, value, time}`` ordered by ``id``.

        ``since_id``: only rows with a larger id (for polling). ``key_prefix``: e.g. ``"rank/"``.
        """
        where, params = ["run_id=?"], [run_id]
        if key is not None:
            where.append("key=?")
            params.append(key)
        if key_prefix is not None:
            where.append("substr(key, 1, ?)=?")
            params += [len(key_prefix), key_prefix]
        if split is not None:
            where.append("split=?")
            params.append(split)
        if task is not None:
            where.append("task=?")
            params.append(int(task))
        if since_id is not None:
            where.append("id>?")
            params.append(int(since_id))
        sql = "SELECT * FROM metrics WHERE " + " AND ".join(where) + " ORDER BY id"
        return [dict(r) for r in self._connect().execute(sql, params).fetchall()]

    def metric_keys(self, run_id: str) -> list[str]:
        rows = self._connect().execute(
            "SELECT DISTINCT key FROM metrics WHERE run_id=? ORDER BY key", (run_id,)
        ).fetchall()
        return [r["key"] for r in rows]

    def count_metrics(self, run_id: str | None = None) -> int:
        if run_id is None:
            return self._connect().execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        return self._connect().execute(
            "SELECT COUNT(*) FROM metrics WHERE run_id=?", (run_id,)
        ).fetchone()[0]

    def last_step(self, run_id: str) -> int | None:
        return self._connect().execute(
            "SELECT MAX(step) FROM metrics WHERE run_id=?", (run_id,)
        ).fetchone()[0]

    def truncate_metrics(self, run_id: str, after_step: int) -> int:
        """Delete rows with ``step > after_step`` (resume from a checkpoint taken at that step)."""
        cur = self._write(
            lambda c: c.execute(
                "DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, int(after_step))
            )
        )
        return cur.rowcount

    # ------------------------------------------------------------------ faults
    def mark_orphans_interrupted(self) -> list[str]:
        """Mark ``running`` runs of this host whose process is dead as ``interrupted``.

        Their metric rows stay. Runs owned by another host are left alone (their pid means nothing
        here). Returns the ids that were marked.
        """
        here = hostname()
        rows = self._connect().execute(
            "SELECT id, pid, pid_start, host FROM runs WHERE status='running'"
        ).fetchall()
        marked = []
        for row in rows:
            if row["host"] not in (None, here):
                continue
            if is_alive(row["pid"], row["pid_start"]):
                continue
            last = self.last_step(row["id"])
            message = (
                f"the process (pid {row['pid']}) ended without closing the run (killed or crashed)"
                + (f"; metrics up to step {last} are kept" if last is not None else "")
                + (f"; `lance finetune --resume {row['id']}` continues from the last finished epoch"
                   if self.checkpoint_path(row["id"]).is_file() else "")
            )
            cur = self._write(
                lambda c, rid=row["id"], pid=row["pid"], message=message: c.execute(
                    "UPDATE runs SET status='interrupted', message=?, updated_at=?"
                    " WHERE id=? AND status='running' AND pid IS ?",
                    (message, time.time(), rid, pid),
                )
            )
            if cur.rowcount:
                marked.append(row["id"])
        return marked

    # ------------------------------------------------------------------ export
    def export_run(self, run_id: str, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write the run (CSV: its metric rows; JSON: run record plus rows) to ``path``.

        ``fmt`` is ``"csv"`` or ``"json"``; None -> from the file suffix.
        """
        path = Path(path)
        fmt = (fmt or path.suffix.lstrip(".") or "json").lower()
        run = self.get_run(run_id)
        rows = self.metrics(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            with path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["run_id", "method", "step", "epoch", "split", "task", "key", "value", "time"])
                for r in rows:
                    writer.writerow([run_id, run["method"], r["step"], r["epoch"], r["split"],
                                     r["task"], r["key"], r["value"], r["time"]])
        elif fmt == "json":
            record = dict(run)
            record["metrics"] = [
                {k: r[k] for k in ("step", "epoch", "split", "task", "key", "value", "time")} for r in rows
            ]
            path.write_text(_dumps(record) + "\n")
        else:
            raise StoreError(f"unknown export format {fmt!r}; use csv or json")
        return path
