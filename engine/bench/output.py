"""One way the benchmark scripts report: indented JSON on stdout, and the same text in a file when asked."""
from __future__ import annotations

import json
from pathlib import Path

from engine.store.files import atomic_write_text


def emit_json(data: dict, path: str | None = None) -> str:
    """Print ``data`` as JSON (indent 1) and, with ``path``, write it there too (atomically); returns the text."""
    text = json.dumps(data, indent=1)
    print(text)
    if path:
        atomic_write_text(Path(path), text + "\n")
    return text
