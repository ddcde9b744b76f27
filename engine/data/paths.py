"""Where datasets and caches live.

Data roots: the ``data_root`` argument, else ``$LANCE_DATA_ROOT`` (several folders separated by
``os.pathsep`` are searched in order), else ``$LANCE_HOME/datasets``. Caches (decoded arrays,
frozen-prefix features): ``$LANCE_CACHE_DIR``, else ``$LANCE_HOME/cache``.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.home import cache_root, lance_home


def data_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for datasets, in order."""
    if data_root:
        return [Path(p).expanduser() for p in str(data_root).split(os.pathsep) if p]
    env = os.environ.get("LANCE_DATA_ROOT")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [lance_home() / "datasets"]


def cache_dir(kind: str) -> Path:
    """``<cache>/<kind>`` (created), e.g. ``decoded`` or ``features``."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
