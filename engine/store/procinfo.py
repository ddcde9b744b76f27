"""Is the process that owns a run still alive? (pid + start time, so a reused pid is not mistaken)."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def hostname() -> str:
    return socket.gethostname()


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may itself contain spaces or ')'
    return text[text.rfind(")") + 2 :].split()


def process_start_token(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot) as a string; None if unknown."""
    fields = _proc_stat_fields(pid)
    if not fields or len(fields) < 20:
        return None
    return fields[19]  # field 22 of stat: starttime


def is_alive(pid: int | None, start_token: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``start_token``."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat_fields(pid)
    if fields is None:
        return True  # no /proc (macOS, Windows): trust kill(0)
    if fields[0] in ("Z", "X", "x"):
        return False
    if start_token is not None and len(fields) >= 20 and fields[19] != start_token:
        return False  # the pid was reused by a newer process
    return True
