"""Output helpers shared by the subcommands (not a subcommand: the leading underscore keeps it out)."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(target: str, data: dict) -> None:
    """Write ``data`` as indented JSON to ``target``, or to stdout when ``target`` is ``-``."""
    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        print(text)
    else:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
