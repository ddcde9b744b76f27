"""Keep a page steady while it reruns: no dimming of elements Streamlit has marked stale.

Streamlit fades every element of a running script (or fragment) to a low opacity until it is sent
again; a live view that polls every 0.5 s then blinks on a busy CPU. The figures of our pages are
re-sent unchanged on idle polls (same spec, same key), so showing the previous frame at full opacity
until the new one lands is correct.
"""
from __future__ import annotations

import streamlit as st

STEADY_CSS = """<style>
[data-stale="true"], [data-stale="true"] * { opacity: 1 !important; transition: none !important; }
</style>"""


def steady_layout() -> None:
    """Inject the no-dimming style once per page run (an invisible element)."""
    st.html(STEADY_CSS)
