"""One way the benchmark scripts report: indented JSON on stdout, and the same text in a file when asked."""
from __future__ import annotations

import argparse
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


def bench_parser(doc: str, repeats: int | None = None) -> argparse.ArgumentParser:
    """The benchmark scripts' parser: described by the first line of ``doc``, with ``--json OUT`` and, when
    ``repeats`` is given, ``--repeats N`` (default ``repeats``); a script adds its own options to it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", default=None)
    return parser
