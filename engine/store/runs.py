"""``RunStore``: runs and their metric rows in SQLite (WAL), one folder per run.

Layout under the root (``$LANCE_HOME`` or the user data dir)::

    runs.sqlite                  tables ``runs`` and ``metrics`` (long format), ``job_phases`` (what a job does now)
    runs/<run_id>/run.json       the run's record (kind, method, status, message, times, pid, job id)
    runs/<run_id>/config.json    frozen config (seed, package versions, git commit, device, ...)
    runs/<run_id>/summary.json   final figures, written by ``set_summary``
    runs/<run_id>/metrics.jsonl  every metric row, appended as it is logged
    runs/<run_id>/checkpoint.pt  what was trained, written by the training code

The database is an index of the run folders: ``lance runs repair`` (``engine.store.repair``) rebuilds
it from them when it is damaged or emptied. Ids must match ``engine.store.ids.RUN_ID_PATTERN`` and every
path is resolved inside ``runs/`` before use. A store on a read-only disk (or given ``read_only=True``)
opens read-only: listing, showing and exporting work, writing raises ``StoreReadOnly``.

Several processes may write at once: every write is one ``BEGIN IMMEDIATE`` transaction, SQLite
serialises them and waits (``busy_timeout``) instead of failing, so no row is lost. A run records the
pid (plus its start time and host) of the process that writes it; ``mark_orphans_interrupted`` turns
``running`` runs whose process is gone (kill -9, crash, reboot) into ``interrupted`` ones.

Timestamps (``created_at``, ``updated_at``, metric ``time``) are Unix seconds (float, UTC).
A metric value that is NaN is stored as NULL (SQLite has no NaN) and read back as ``None``.
"""
from __future__ import annotations

import csv
import errno
import io
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

from engine.home import lance_home
from engine.phases import check_phase
from engine.store import files
from engine.store.ids import BadRunId, check_prefix, is_run_id, run_folder
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
CREATE TABLE IF NOT EXISTS job_phases (
    job_id      TEXT PRIMARY KEY,
    phase       TEXT NOT NULL,
    done        INTEGER,
    total       INTEGER,
    updated_at  REAL NOT NULL
);
"""

_BUSY_TIMEOUT_S = 60.0


class StoreError(Exception):
    """A run store problem the user can act on (message says what to do)."""


class StoreReadOnly(StoreError):
    """The store was opened read-only (a read-only disk or folder): it can be read, not written."""


class StoreUnavailable(StoreError):
    """The store's disk failed us (full, I/O error, unwritable): the message keeps the cause."""


class StoreDamaged(StoreError):
    """The database is damaged, emptied or missing while run folders exist; ``lance runs repair`` fixes it."""


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

    def __init__(self, root: str | os.PathLike | None = None, *, mark_orphans: bool = True,
                 read_only: bool = False, check_index: bool = True):
        self.root = Path(root).expanduser() if root is not None else lance_home()
        self.db_path = self.root / "runs.sqlite"
        self.runs_root = self.root / "runs"
        self._local = threading.local()
        self.read_only = bool(read_only)
        if not self.read_only:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.runs_root.mkdir(exist_ok=True)
            except OSError as exc:
                if not self.db_path.is_file():
                    raise StoreError(
                        f"cannot create the run store at {self.root}: {exc}. "
                        "Set LANCE_HOME to a writable folder."
                    ) from exc
                self.read_only = True  # an existing store on a read-only disk: read it
        if not self.read_only and self.db_path.is_file() and not (
                os.access(self.db_path, os.W_OK) and os.access(self.root, os.W_OK)):
            self.read_only = True  # access(2) reports EROFS even to root; chmod to everyone else
        if self.read_only and not self.db_path.is_file():
            raise StoreError(f"no run store at {self.root} (no {self.db_path.name}); "
                             "set LANCE_HOME to the folder holding runs.sqlite")
        if check_index:
            self._check_index_file()
        if not self.read_only:
            try:
                self._init_schema()
            except (sqlite3.DatabaseError, StoreError) as exc:
                cause = exc.__cause__ if isinstance(exc, StoreError) else exc
                if isinstance(exc, StoreDamaged):
                    raise
                if not (isinstance(cause, sqlite3.OperationalError) and _is_readonly_error(cause)):
                    if isinstance(exc, StoreError):
                        raise
                    if isinstance(exc, sqlite3.OperationalError):  # disk full, I/O error: not damage
                        raise StoreUnavailable(f"cannot open the run store {self.db_path}: {exc}; check free disk "
                                               "space (df) and that the folder is writable") from exc
                    raise self._damaged(exc) from exc
                self.close()
                self.read_only = True
        if self.read_only:
            self._check_readable()
        elif mark_orphans:
            self.mark_orphans_interrupted()

    # ------------------------------------------------------------------ health
    def run_folders(self) -> list[Path]:
        """Folders under ``runs/`` whose name is a run id (anything else there is left alone)."""
        if not self.runs_root.is_dir():
            return []
        return sorted(p for p in self.runs_root.iterdir() if is_run_id(p.name) and p.is_dir())

    def _check_index_file(self) -> None:
        """An emptied (0-byte) or missing database beside run folders is damage, not a new store."""
        try:
            size = self.db_path.stat().st_size
        except FileNotFoundError:
            size = None
        if size:
            return
        folders = self.run_folders()
        if folders:
            what = "is empty (0 bytes)" if size == 0 else "is missing"
            raise StoreDamaged(
                f"the run store index {self.db_path} {what}, but {len(folders)} run folder(s) exist under "
                f"{self.runs_root}. Nothing on disk was touched. Run `lance runs repair` to rebuild the index "
                "from the run folders."
            )

    def _damaged(self, exc: BaseException) -> StoreDamaged:
        return StoreDamaged(
            f"the run store index {self.db_path} is damaged ({type(exc).__name__}: {exc}). Your run folders "
            f"under {self.runs_root} are untouched. Run `lance runs repair` to rebuild the index from them "
            "(the damaged file is kept beside it)."
        )

    def _check_readable(self) -> None:
        try:
            self._query("SELECT COUNT(*) FROM runs")
        except StoreError:
            raise
        except sqlite3.DatabaseError as exc:  # pragma: no cover - _query converts
            raise self._damaged(exc) from exc

    def _query(self, sql: str, params=()) -> list[sqlite3.Row]:
        """A read; a damaged database becomes ``StoreDamaged`` (with what to do)."""
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc) or "malformed" in str(exc):
                raise self._damaged(exc) from exc
            raise StoreError(f"cannot read the run store {self.db_path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def _folder_write(self, what: str, fn):
        """Write a file of a run folder; an OSError keeps its cause (ENOSPC, EROFS) in the message."""
        try:
            return fn()
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {what}: {exc.strerror or exc} ({_errno_name(exc)}); "
                             "free disk space or make the folder writable") from exc

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        """One connection per thread and process (sqlite3 connections must not cross either)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        if self.read_only:
            conn = _connect_read_only(self.db_path)
        else:
            conn = sqlite3.connect(
                self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
        if not self.read_only:
            conn.execute("PRAGMA synchronous = NORMAL")
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _write(self, fn):
        """Run ``fn(conn)`` in one immediate transaction; retry while another writer holds the lock.

        A read-only store raises ``StoreReadOnly``; a full or read-only disk a ``StoreError`` that keeps
        the cause; a damaged database ``StoreDamaged``.
        """
        if self.read_only:
            raise StoreReadOnly(f"the run store {self.root} is open read-only (read-only disk or folder); "
                                "list, show and export work, but nothing can be written: set LANCE_HOME to a "
                                "writable folder")
        conn = self._connect()
        _rollback_quietly(conn)  # a write interrupted (Ctrl-C) between BEGIN and COMMIT left it open
        try:
            return self._write_on(conn, fn)
        except BaseException:  # KeyboardInterrupt can land on any bytecode, also right after BEGIN
            _rollback_quietly(conn)
            raise

    def _write_on(self, conn: sqlite3.Connection, fn):
        deadline = time.monotonic() + _BUSY_TIMEOUT_S * 2
        try:
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
            result = fn(conn)
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if _is_readonly_error(exc) or "disk" in str(exc) or "full" in str(exc):
                raise StoreUnavailable(f"cannot write the run store {self.db_path}: {exc}; free disk space or "
                                 "make it writable (LANCE_HOME)") from exc
            if "malformed" in str(exc) or "no such table" in str(exc):
                raise self._damaged(exc) from exc
            raise
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc
        return result

    def _init_schema(self) -> None:
        conn = self._connect()
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
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
        """``<root>/runs/<run_id>/`` (run.json, config.json, summary.json, metrics.jsonl, checkpoint.pt).

        Raises ``StoreError`` for a string that is not a run id (``../x``): no path outside the store.
        """
        try:
            return run_folder(self.runs_root, run_id)
        except BadRunId as exc:
            raise StoreError(f"{exc}; refusing to touch any file for it") from None

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
        if self.read_only:
            self._write(lambda c: None)  # raises StoreReadOnly
        run_dir = self.run_dir(run_id)

        def make_folder():
            run_dir.mkdir(parents=True, exist_ok=True)
            files.write_json(run_dir / files.CONFIG, json.loads(config_text))
            files.write_json(run_dir / files.RUN_RECORD, {
                "id": run_id, "kind": kind, "method": method, "status": "running", "message": None,
                "created_at": now, "updated_at": now, "pid": pid, "host": hostname(), "job_id": job_id})

        self._folder_write(f"the run folder {run_dir}", make_folder)

        def insert(conn):
            conn.execute(
                "INSERT INTO runs (id, kind, method, status, message, config, summary, created_at,"
                " updated_at, pid, pid_start, host, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, kind, method, "running", None, config_text, None, now, now, pid,
                 process_start_token(pid), hostname(), job_id),
            )

        self._write(insert)
        return run_id

    def _write_record(self, run_id: str) -> None:
        """Mirror the run's database row into ``run.json`` (what ``lance runs repair`` reads back)."""
        rows = self._query("SELECT * FROM runs WHERE id=?", (run_id,))
        if not rows:
            return
        record = {k: rows[0][k] for k in ("id", "kind", "method", "status", "message", "created_at",
                                          "updated_at", "pid", "host", "job_id")}
        folder = self.run_dir(run_id)
        if folder.is_dir():
            self._folder_write(f"{folder / files.RUN_RECORD}",
                               lambda: files.write_json(folder / files.RUN_RECORD, record))

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
        self._write_record(run_id)

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
        self._write_record(run_id)

    def set_phase(self, job_id: str, phase: str, done: int | None = None, total: int | None = None) -> None:
        """Record what job ``job_id`` is doing now (one row per job, replaced on every call).

        ``phase``: one of ``engine.phases.PHASES``; ``done``/``total``: progress within it (None: unknown).
        """
        check_phase(phase)
        if not job_id:
            raise StoreError("set_phase needs a job id (the --job-id the job was started with)")
        done = None if done is None else int(done)
        total = None if total is None else int(total)
        if done is not None and (done < 0 or (total is not None and done > total)):
            raise StoreError(f"phase {phase!r}: done {done} is outside 0..{total}")
        self._write(lambda c: c.execute(
            "INSERT INTO job_phases (job_id, phase, done, total, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(job_id) DO UPDATE SET phase=excluded.phase, done=excluded.done,"
            " total=excluded.total, updated_at=excluded.updated_at",
            (str(job_id), phase, done, total, time.time())))

    def phase(self, job_id: str) -> dict | None:
        """``{"phase", "done", "total", "updated_at"}`` of job ``job_id``, or None when it reported none
        (also for a store made before phases existed and opened read-only)."""
        try:
            rows = self._connect().execute(
                "SELECT phase, done, total, updated_at FROM job_phases WHERE job_id=?", (str(job_id),)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise StoreError(f"cannot read the run store {self.db_path}: {exc}") from exc
        return dict(rows[0]) if rows else None

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

        def write():
            run_dir.mkdir(parents=True, exist_ok=True)
            files.write_json(run_dir / files.SUMMARY, json.loads(text))

        self._folder_write(f"{run_dir / files.SUMMARY}", write)

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
        path = self.run_dir(run_id) / files.CONFIG
        self._folder_write(f"{path}", lambda: files.write_json(path, config))
        return config

    @staticmethod
    def _row_to_run(row: sqlite3.Row) -> dict:
        run = dict(row)
        run["config"] = json.loads(run["config"]) if run["config"] else {}
        run["summary"] = json.loads(run["summary"]) if run["summary"] else None
        return run

    def get_run(self, run_id: str) -> dict:
        """id, kind, method, status, message, config, summary, created_at, updated_at, pid, job_id."""
        rows = self._query("SELECT * FROM runs WHERE id=?", (run_id,))
        row = rows[0] if rows else None
        if row is None:
            raise RunNotFound(
                f"no run {run_id!r} in {self.db_path}; `lance runs list` shows the stored runs"
            )
        return self._row_to_run(row)

    def find_run(self, prefix: str) -> dict:
        """The run whose id is ``prefix`` or starts with it (must be unambiguous).

        An empty prefix (it would match every run) or one that cannot start a run id is refused.
        """
        try:
            prefix = check_prefix(prefix)
        except BadRunId as exc:
            raise StoreError(str(exc)) from None
        rows = self._query("SELECT * FROM runs WHERE substr(id, 1, ?)=? ORDER BY created_at",
                           (len(prefix), prefix))
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
        return [self._row_to_run(r) for r in self._query(sql, params)]

    def delete_run(self, run_id: str) -> None:
        """Remove the run, its metric rows and its folder.

        The id is checked against the id pattern and the folder resolved inside ``runs/`` *before*
        anything is deleted: a row whose id is ``../../victim`` is refused and nothing is removed.
        A symlinked run folder is unlinked, never followed.
        """
        run_id = self.get_run(run_id)["id"]
        folder = self.run_dir(run_id)  # raises StoreError for a bad id, before any delete

        def delete(conn):
            conn.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id=?", (run_id,))

        self._write(delete)
        if folder.is_symlink():
            folder.unlink()
        elif folder.is_dir():
            shutil.rmtree(folder)

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
        folder = self.run_dir(run_id)
        self._write(
            lambda c: c.executemany(
                "INSERT INTO metrics (run_id, step, epoch, split, task, key, value, time)"
                " VALUES (?,?,?,?,?,?,?,?)",
                records,
            )
        )
        if folder.is_dir():
            self._folder_write(f"{folder / files.METRICS}", lambda: files.append_rows(folder, records))
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
        return [dict(r) for r in self._query(sql, params)]

    def metric_keys(self, run_id: str) -> list[str]:
        rows = self._query("SELECT DISTINCT key FROM metrics WHERE run_id=? ORDER BY key", (run_id,))
        return [r["key"] for r in rows]

    def count_metrics(self, run_id: str | None = None) -> int:
        if run_id is None:
            return self._query("SELECT COUNT(*) FROM metrics")[0][0]
        return self._query("SELECT COUNT(*) FROM metrics WHERE run_id=?", (run_id,))[0][0]

    def last_step(self, run_id: str) -> int | None:
        return self._query("SELECT MAX(step) FROM metrics WHERE run_id=?", (run_id,))[0][0]

    def truncate_metrics(self, run_id: str, after_step: int) -> int:
        """Delete rows with ``step > after_step`` (resume from a checkpoint taken at that step)."""
        cur = self._write(
            lambda c: c.execute(
                "DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, int(after_step))
            )
        )
        folder = self.run_dir(run_id)
        self._folder_write(f"{folder / files.METRICS}", lambda: files.truncate_rows(folder, int(after_step)))
        return cur.rowcount

    # ------------------------------------------------------------------ faults
    def mark_orphans_interrupted(self) -> list[str]:
        """Mark ``running`` runs of this host whose process is dead as ``interrupted``.

        Their metric rows stay. Runs owned by another host are left alone (their pid means nothing
        here). Returns the ids that were marked.
        """
        here = hostname()
        if self.read_only:
            return []
        rows = self._query("SELECT id, pid, pid_start, host FROM runs WHERE status='running'")
        marked = []
        for row in rows:
            if row["host"] not in (None, here) or not is_run_id(row["id"]):
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
                try:
                    self._write_record(row["id"])
                except StoreError:
                    pass  # a bad id or an unwritable folder: the database row is what counts here
        return marked

    # ------------------------------------------------------------------ export
    def is_store_file(self, path: str | os.PathLike) -> bool:
        """True for the database, its -wal/-shm/-journal files and anything inside the store folder."""
        target = Path(path).expanduser().resolve()
        root = self.root.resolve()
        return target == root or root in target.parents

    def export_run(self, run_id: str, path: str | os.PathLike, fmt: str | None = None, *,
                   force: bool = False) -> Path:
        """Write the run (CSV: its metric rows; JSON: run record plus rows) to ``path``.

        ``fmt`` is ``"csv"`` or ``"json"``; None -> from the file suffix. See ``export_runs``.
        """
        return self.export_runs([run_id], path, fmt, force=force, single_record=True)

    def export_runs(self, run_ids: list[str], path: str | os.PathLike, fmt: str | None = None, *,
                    force: bool = False, single_record: bool = False) -> Path:
        """Write several runs to one CSV (rows, a ``run_id`` column) or JSON (``{"runs": [...]}``) file.

        Refuses a path inside the store (its database would be overwritten) and an existing file
        unless ``force``; writes a temporary file beside ``path`` and renames it, so a failed export
        leaves no partial file and an old file is replaced only by a whole new one.
        """
        path = Path(path).expanduser()
        fmt = (fmt or path.suffix.lstrip(".") or "json").lower()
        if fmt not in ("csv", "json"):
            raise StoreError(f"unknown export format {fmt!r}; use csv or json")
        if self.is_store_file(path):
            raise StoreError(f"refusing to export into the run store itself ({path} is inside {self.root}); "
                             "write the export somewhere else")
        if path.is_dir():
            raise StoreError(f"{path} is a folder; give a file name, e.g. {path / ('runs.' + fmt)}")
        if path.exists() and not force:
            raise StoreError(f"{path} already exists; pass --force to replace it, or choose another file")
        return self._export(run_ids, path, fmt, single_record and len(run_ids) == 1)

    def write_metrics_csv(self, run_id: str) -> Path:
        """The run's rows as ``metrics.csv`` in its own folder (replaced atomically)."""
        return self._export([run_id], self.run_dir(run_id) / "metrics.csv", "csv", True)

    def _export(self, run_ids: list[str], path: Path, fmt: str, single: bool) -> Path:
        runs = [self.get_run(r) for r in run_ids]
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["run_id", "method", "step", "epoch", "split", "task", "key", "value", "time"])
            for run in runs:
                for r in self.metrics(run["id"]):
                    writer.writerow([run["id"], run["method"], r["step"], r["epoch"], r["split"],
                                     r["task"], r["key"], r["value"], r["time"]])
            text = buffer.getvalue()
        else:
            records = []
            for run in runs:
                record = dict(run)
                record["metrics"] = [{k: r[k] for k in ("step", "epoch", "split", "task", "key", "value", "time")}
                                     for r in self.metrics(run["id"])]
                records.append(record)
            text = _dumps(records[0] if single else {"runs": records}) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(path, text)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc} ({_errno_name(exc)}); nothing was "
                             "written there") from exc
        return path


def _is_readonly_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "readonly" in text or "read-only" in text or "unable to open" in text


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, "?") if exc.errno else type(exc).__name__


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    """Roll back an open transaction on ``conn``, if any; a connection that cannot is left to the next write."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _connect_read_only(db_path: Path) -> sqlite3.Connection:
    """Open ``db_path`` read-only: ``mode=ro``, or ``immutable=1`` where not even the WAL index can be made."""
    uri = db_path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
