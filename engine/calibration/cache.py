"""On-disk cache of calibrations: ``$LANCE_HOME/cache/calibration/<key>.json``.

``$LANCE_CACHE_DIR`` (shared with engine.data's decoded-image and feature caches) replaces
``$LANCE_HOME/cache`` when set.

The key is a SHA-256 over everything that changes the result: backbone, weights (for a file: its
absolute path, size and modification time), dataset, data root, fine-tuned layers, resolution, seed,
ε grid, number of batches and batch size, plus the format version.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from engine.home import cache_root

CACHE_VERSION = 1



def cache_dir() -> Path:
    """``cache_root() / "calibration"``."""
    return cache_root() / "calibration"


def _weights_identity(weights: str | None) -> Any:
    if weights is None:
        return None
    path = Path(str(weights)).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return str(weights)


def cache_key(config: dict[str, Any]) -> str:
    """Stable key of a calibration config (see the module docstring for what it covers)."""
    material = dict(config)
    material["weights"] = _weights_identity(config.get("weights"))
    material["cache_version"] = CACHE_VERSION
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def load_cached(key: str) -> dict | None:
    """The cached calibration dict, or ``None`` when absent or unreadable (a corrupt file is ignored)."""
    path = cache_path(key)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("cache_key") == key else None


def store_cached(key: str, data: dict) -> Path:
    """Write atomically (temp file + rename) so a concurrent reader never sees half a file."""
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path
