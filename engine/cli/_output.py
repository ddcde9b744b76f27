"""Output helpers shared by the subcommands (not a subcommand: the leading underscore keeps it out)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.home import lance_home
from engine.store import StoreError
from engine.store.files import atomic_write_text


def write_json(target: str, data: dict) -> None:
    """Write ``data`` as indented JSON to ``target``, or to stdout when ``target`` is ``-``."""
    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        print(text)
    else:

        path = Path(target).expanduser()
        root = lance_home().resolve()
        if path.resolve() == root or root in path.resolve().parents:
            raise StoreError(f"refusing to write {path}: it is inside the run store {root}; give --json a path "
                             "outside it")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")


def fail(command: str, message: str, code: int = 2) -> int:
    """``lance <command>: error: <message>`` on stderr; returns the exit status (2: bad arguments)."""
    print(f"lance {command}: error: {message}", file=sys.stderr)
    return code
