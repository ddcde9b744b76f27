"""Streamlit entrypoint: ``streamlit run lance_app/main.py`` (``lance app`` does this for you).

Builds the page list with ``st.navigation`` from the packaged pages (``lance_app.paths.pages_dir``)
and does the once-per-server startup work (orphaned runs marked interrupted).
"""
from __future__ import annotations

import streamlit as st

from lance_app.paths import PAGES, pages_dir
from lance_app.state import startup

PAGES_DIR = pages_dir()

st.set_page_config(page_title="LANCE Lab", page_icon=":material/memory:", layout="wide")

info = startup()
if info["error"]:
    st.sidebar.warning(info["error"])
elif info["marked"]:
    st.sidebar.info(f"{len(info['marked'])} run(s) of a previous server were marked interrupted.")

pages = [st.Page(PAGES_DIR / f, title=t, icon=i, url_path=u, default=(u == "setup"))
         for f, t, i, u in PAGES]
st.sidebar.caption("LANCE Lab · memory-efficient on-device learning")
st.navigation(pages).run()
