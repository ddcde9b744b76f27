"""The last values of the app's forms, kept in ``$LANCE_HOME/app_forms/<form>.json`` so a browser reload
(a new Streamlit session) finds the form as it was left. No Streamlit here.

One file per form, shared by every session of this LANCE_HOME (a local, single-user app: "the last
values typed here"). Values are plain JSON (numbers, strings, lists). A file that is missing, unreadable
or not a JSON object reads as ``{}``; writing is atomic (temporary file + rename).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lance_app.jobs import lance_home


def form_path(form: str, home: str | Path | None = None) -> Path:
    """``<home>/app_forms/<form>.json`` (``home`` defaults to ``$LANCE_HOME``)."""
    if not re.fullmatch(r"[a-z0-9_]+", form):
        raise ValueError(f"form name {form!r}: use lower-case letters, digits and _")
    return Path(home if home is not None else lance_home()) / "app_forms" / f"{form}.json"


def load_form(form: str, home: str | Path | None = None) -> dict:
    """The form's last saved values (``{}`` when none were saved or the file is unreadable)."""
    try:
        data = json.loads(form_path(form, home).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_form(form: str, values: dict, home: str | Path | None = None) -> bool:
    """Write ``values`` when they differ from what is saved; True when the file was written."""
    if load_form(form, home) == values:
        return False
    path = form_path(form, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return True


def like_default(default, value, allowed: tuple | list | None = None):
    """``value`` in the type of ``default`` (ints stay ints, floats floats, lists keep only ``allowed``
    items, a scalar not in ``allowed`` falls back), else ``default``: a hand-edited or old form file never
    breaks a page."""
    try:
        if isinstance(default, list):
            if not isinstance(value, list):
                return list(default)
            return [v for v in value if allowed is None or v in allowed]
        if allowed is not None and value not in allowed:
            return default
        if isinstance(default, bool):
            return bool(value)
        if isinstance(default, int):
            number = float(value)
            return int(number) if number == int(number) else default
        if isinstance(default, float):
            return float(value)
        return str(value if value is not None else "")
    except (TypeError, ValueError, OverflowError):
        return default


def seed_session(state, form: str, defaults: dict, allowed: dict | None = None, flag: str | None = None) -> dict:
    """Once per session, put the form's stored values (or the defaults) into ``state`` (Streamlit's
    session_state) under the widget keys; returns what was stored."""
    stored = load_form(form)
    flag = flag or f"{form}_form_seeded"
    if not state.get(flag):
        for key, default in defaults.items():
            state[key] = like_default(default, stored.get(key, default), (allowed or {}).get(key))
        state[flag] = True
    return stored
