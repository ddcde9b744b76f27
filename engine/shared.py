"""``../shared`` (real datasets and weights on developer and CI machines), found the same way by the app
and the CLI. Light: no torch.

``apply_shared_defaults`` points ``LANCE_DATA_ROOT`` and ``LANCE_WEIGHTS_DIR`` at
``<checkout>/../shared/{datasets,weights}`` when they are unset and those folders exist (``$LANCE_SHARED``
names another folder). ``lance app`` and every other ``lance`` command call it; the variables, when set,
always win.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.home import lance_home

CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding engine/ (the repository, when editable)


def shared_root(environ=os.environ) -> Path:
    """``$LANCE_SHARED`` or ``<checkout>/../shared``."""
    return Path(environ.get("LANCE_SHARED") or CHECKOUT.parent / "shared")


def apply_shared_defaults(environ=os.environ) -> dict:
    """Set LANCE_DATA_ROOT / LANCE_WEIGHTS_DIR in ``environ`` to ``../shared``'s folders when they are
    unset and there; the data root keeps ``$LANCE_HOME/datasets`` after the shared one (a
    ``os.pathsep``-separated list). Returns what was set."""

    changed = {}
    shared = shared_root(environ)
    if not environ.get("LANCE_DATA_ROOT") and (shared / "datasets").is_dir():
        changed["LANCE_DATA_ROOT"] = os.pathsep.join([str(shared / "datasets"), str(lance_home() / "datasets")])
    if not environ.get("LANCE_WEIGHTS_DIR") and (shared / "weights").is_dir():
        changed["LANCE_WEIGHTS_DIR"] = str(shared / "weights")
    environ.update(changed)
    return changed
