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
