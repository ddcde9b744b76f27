"""``lance runs repair``: rebuild the run index (``runs.sqlite``) from the run folders.

The database is an index; each run folder holds what it needs to be indexed again: ``run.json``
(kind, method, status, message, times, job id), ``config.json``, ``summary.json`` and every metric row
(``metrics.jsonl``; older fine-tuning runs: ``metrics.csv``). Repair

1. checks the database; a damaged, emptied (0-byte) or missing one is moved aside to
   ``runs.sqlite.damaged-<UTC time>`` (never deleted) and whatever rows can still be read from it are
   kept as a fallback for folders that lack their own files;
2. opens (or creates) a fresh index and adds every run folder whose id is not indexed yet;
3. changes no file inside any run folder and leaves folders that are not runs alone (reported).
"""
from __future__ import annotations

import csv
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from engine.store import files
from engine.store.ids import is_run_id
from engine.store.runs import RUN_KINDS, RUN_STATUSES, RunStore, _dumps

_SIDE_FILES = ("-wal", "-shm", "-journal")


def database_state(db_path: Path) -> str:
    """``"ok"``, ``"missing"``, ``"empty"`` (0 bytes) or ``"damaged: <reason>"``."""
    if not db_path.exists():
        return "missing"
    if db_path.stat().st_size == 0:
        return "empty"
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                return f"damaged: {check}"
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"runs", "metrics"} <= tables:
                return "damaged: the runs/metrics tables are missing"
            conn.execute("SELECT COUNT(*) FROM runs").fetchone()
            conn.execute("SELECT COUNT(*) FROM metrics").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"damaged: {exc}"
    return "ok"


def _salvage(db_path: Path) -> dict[str, dict]:
    """Rows still readable from a damaged database: ``{run_id: {"run": row, "metrics": [rows]}}``."""
    out: dict[str, dict] = {}
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?immutable=1", uri=True)
        conn.row_factory = sqlite3.Row
    except sqlite3.Error:
        return out
    try:
        for row in conn.execute("SELECT * FROM runs"):
            out.setdefault(row["id"], {"run": None, "metrics": []})["run"] = dict(row)
    except sqlite3.Error:
        pass
    try:
        for row in conn.execute("SELECT * FROM metrics ORDER BY id"):
            out.setdefault(row["run_id"], {"run": None, "metrics": []})["metrics"].append(
                {k: row[k] for k in files.ROW_FIELDS})
    except sqlite3.Error:
        pass
    conn.close()
    return out


def _move_aside(db_path: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    target = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = db_path.with_name(f"{db_path.name}.damaged-{stamp}-{n}")
        n += 1
    db_path.rename(target)
    for suffix in _SIDE_FILES:
        side = db_path.with_name(db_path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    return target


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []

    def num(text, kind):
        return None if text in (None, "", "None") else kind(float(text)) if kind is int else float(text)

    rows = []
    try:
        with path.open(newline="") as fh:
            for r in csv.DictReader(fh):
                rows.append({"step": num(r.get("step"), int), "epoch": num(r.get("epoch"), int),
                             "split": r.get("split") or None, "task": num(r.get("task"), int),
                             "key": r["key"], "value": num(r.get("value"), float),
                             "time": num(r.get("time"), float) or 0.0})
    except (OSError, KeyError, ValueError, csv.Error):
        return []
    return rows


def _created_at(run_id: str, folder: Path) -> float:
    try:
        return datetime.strptime(run_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return folder.stat().st_mtime


def repair_store(root: str | Path) -> dict:
    """Rebuild the index of the store at ``root``; returns a report (what was found, restored, skipped)."""
    root = Path(root).expanduser()
    db_path = root / "runs.sqlite"
    runs_root = root / "runs"
    state = database_state(db_path)
    salvaged: dict[str, dict] = {}
    kept_as = None
    if state != "ok" and db_path.exists():
        kept_as = _move_aside(db_path)
        salvaged = _salvage(kept_as) if state != "empty" else {}
    store = RunStore(root, mark_orphans=False, check_index=False)
    indexed = {r["id"] for r in store.list_runs()}
    restored, rows_restored, skipped = [], 0, []
    folders = sorted(runs_root.iterdir()) if runs_root.is_dir() else []
    for folder in folders:
        if not folder.is_dir() or folder.is_symlink():
            skipped.append(f"{folder.name}: not a run folder, left alone")
            continue
        run_id = folder.name
        if not is_run_id(run_id):
            skipped.append(f"{run_id}: not a run id, left alone")
            continue
        if run_id in indexed:
            continue
        old = salvaged.get(run_id, {})
        record = files.read_json(folder / files.RUN_RECORD) or old.get("run") or {}
        config = files.read_json(folder / files.CONFIG)
        if config is None and old.get("run"):
            config = files.read_json_text(old["run"].get("config"))
        if not isinstance(config, dict):
            skipped.append(f"{run_id}: no readable config.json, left alone")
            continue
        kind = record.get("kind") or ("continual" if "benchmark" in config else "finetune")
        if kind not in RUN_KINDS:
            kind = "continual" if "benchmark" in config else "finetune"
        method = record.get("method") or config.get("method") or (config.get("training") or {}).get("method")
        status, message = record.get("status"), record.get("message")
        if status == "running" or status not in RUN_STATUSES:
            status = "interrupted"
            message = ("restored by `lance runs repair`: the run was not closed (or its last status was not on "
                       "disk); its metric rows are kept")
        summary = files.read_json(folder / files.SUMMARY)
        rows = files.read_rows(folder) or _csv_rows(folder / "metrics.csv") or old.get("metrics") or []
        created = float(record.get("created_at") or _created_at(run_id, folder))
        updated = float(record.get("updated_at") or created)

        run_row = (run_id, kind, method, status, message, _dumps(config),
                   None if summary is None else _dumps(summary), created, updated, record.get("pid"), None,
                   record.get("host"), record.get("job_id"))
        metric_rows = [(run_id, r.get("step"), r.get("epoch"), r.get("split"), r.get("task"), str(r["key"]),
                        r.get("value"), float(r.get("time") or updated)) for r in rows]

        def insert(conn, run_row=run_row, metric_rows=metric_rows):
            conn.execute(
                "INSERT INTO runs (id, kind, method, status, message, config, summary, created_at,"
                " updated_at, pid, pid_start, host, job_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", run_row)
            conn.executemany(
                "INSERT INTO metrics (run_id, step, epoch, split, task, key, value, time)"
                " VALUES (?,?,?,?,?,?,?,?)", metric_rows)

        store._write(insert)
        restored.append(run_id)
        rows_restored += len(rows)
    store.close()
    what = {"ok": "the index was readable", "missing": "there was no index", "empty": "the index was empty (0 bytes)"}
    found = what.get(state, f"the index was {state}")
    summary_line = (f"{found}; restored {len(restored)} run(s) with {rows_restored} metric row(s) from "
                    f"{runs_root}" + (f"; the old index is kept at {kept_as}" if kept_as else "")
                    + f"; {len(indexed) + len(restored)} run(s) indexed now")
    return {"state": state, "kept_as": str(kept_as) if kept_as else None, "restored": restored,
            "metric_rows": rows_restored, "skipped": skipped, "summary": summary_line,
            "time": time.time()}
