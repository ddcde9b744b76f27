"""Where LANCE Lab keeps its files: the home folder and the cache folder. Light: no torch.

``lance_home()``: ``$LANCE_HOME``, else the platform's user data dir for ``lance-lab``
(``~/.local/share/lance-lab`` on Linux). It holds the run store (``runs.sqlite``, ``runs/``), ``weights/``,
``datasets/``, ``plans/`` and the app's ``app_jobs/``. ``cache_root()``: ``$LANCE_CACHE_DIR``, else
``lance_home() / "cache"`` (decoded images, frozen-prefix features, calibrations).
"""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "lance-lab"


def lance_home() -> Path:
    """``$LANCE_HOME`` when set, else the user data dir (``~/.local/share/lance-lab`` on Linux)."""
    env = os.environ.get("LANCE_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_root() -> Path:
    """``$LANCE_CACHE_DIR`` when set, else ``lance_home() / "cache"`` (not created here)."""
    env = os.environ.get("LANCE_CACHE_DIR")
    return Path(env).expanduser() if env else lance_home() / "cache"
