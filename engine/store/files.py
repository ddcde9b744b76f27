"""The files of a run folder, written so that a crash never leaves half a file.

``<root>/runs/<id>/``:
    run.json        the run's record (id, kind, method, status, message, times, pid, host, job id)
    config.json     frozen config
    summary.json    final figures (``set_summary``)
    metrics.jsonl   every metric row, one JSON object a line, appended as rows are logged
    checkpoint.pt   what was trained (the training code)
    metrics.csv     the metric rows as CSV (written when a fine-tuning run ends)

The database indexes these; ``lance runs repair`` rebuilds it from them (``engine.store.repair``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RUN_RECORD = "run.json"
CONFIG = "config.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
ROW_FIELDS = ("step", "epoch", "split", "task", "key", "value", "time")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``.

    Readers see the old file or the new one, never a partial one; on error nothing is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def append_rows(folder: Path, rows: Iterable[tuple]) -> None:
    """Append metric rows ``(run_id, step, epoch, split, task, key, value, time)`` to ``metrics.jsonl``."""
    lines = []
    for row in rows:
        record = dict(zip(ROW_FIELDS, (_clean(v) for v in row[1:])))
        lines.append(json.dumps(record, allow_nan=True))
    if not lines:
        return
    with open(Path(folder) / METRICS, "a") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()


def read_rows(folder: Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record:
            out.append({k: record.get(k) for k in ROW_FIELDS})
    return out


def truncate_rows(folder: Path, after_step: int) -> None:
    """Keep only rows with ``step <= after_step`` (or no step) in ``metrics.jsonl``."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return
    kept = [r for r in read_rows(folder) if r["step"] is None or r["step"] <= after_step]
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_json_text(text: Any) -> Any | None:
    """``json.loads(text)``, or None when it is not JSON text."""
    try:
        return json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
