"""Where the run store lives: ``$LANCE_HOME`` or the platform's user data directory."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "lance-lab"


def default_root() -> Path:
    """``$LANCE_HOME`` when set, else the user data dir (``~/.local/share/lance-lab`` on Linux)."""
    env = os.environ.get("LANCE_HOME")
    if env:
        return Path(env).expanduser()

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
