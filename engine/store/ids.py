"""Run ids: the one pattern every id in the store must match, and paths that stay inside the store.

An id is ``YYYYMMDD-HHMMSS-<6 lowercase hex>`` (UTC creation time + random suffix). Anything else read
from the database (``../../victim``, an absolute path, an empty string) is refused before it is used to
build a path, so no delete, export or checkpoint load can reach outside ``<root>/runs/``.
"""
from __future__ import annotations

import re
from pathlib import Path

RUN_ID_PATTERN = r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN + r"\Z")
_PREFIX_RE = re.compile(r"[0-9a-f-]{1,22}\Z")


class BadRunId(ValueError):
    """A string that is not a run id (or not a usable prefix of one)."""


def is_run_id(text: object) -> bool:
    """True when ``text`` is a whole run id, e.g. ``20261202-112718-8e1bd8``."""
    return isinstance(text, str) and _RUN_ID_RE.match(text) is not None


def check_run_id(text: object) -> str:
    """``text`` if it is a run id, else ``BadRunId`` naming the expected form."""
    if not is_run_id(text):
        raise BadRunId(f"{text!r} is not a run id (expected YYYYMMDD-HHMMSS-xxxxxx, e.g. 20261202-112718-8e1bd8)")
    return text  # type: ignore[return-value]


def check_prefix(text: object) -> str:
    """A non-empty prefix of a run id (digits, lowercase hex, '-'); surrounding spaces are stripped."""
    if not isinstance(text, str) or not text.strip():
        raise BadRunId("an empty run id matches every run; give the run id (or its first characters), "
                       "see `lance runs list`")
    prefix = text.strip()
    if not _PREFIX_RE.match(prefix):
        raise BadRunId(f"no run {text!r}: that is not a run id or the start of one (ids look like "
                       "20261202-112718-8e1bd8; see `lance runs list`)")
    return prefix


def run_folder(runs_root: Path, run_id: str) -> Path:
    """``runs_root/run_id``, after checking the id and that the resolved path is a direct child of
    ``runs_root`` (a symlinked run folder is not followed: the link itself is returned)."""
    check_run_id(run_id)
    folder = Path(runs_root) / run_id
    parent = folder.parent.resolve()
    if parent != Path(runs_root).resolve() or folder.name != run_id:
        raise BadRunId(f"run folder {folder} is not inside {runs_root}")
    return folder
