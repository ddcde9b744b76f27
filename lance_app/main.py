"""Streamlit entrypoint: ``streamlit run lance_app/main.py`` (``lance app`` does this for you).

Builds the page list with ``st.navigation`` from ``<repo>/pages`` and does the once-per-server
startup work (orphaned runs marked interrupted).
"""
from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `import lance_app` also when run from another directory
    sys.path.insert(0, str(REPO_ROOT))

from lance_app.state import startup  # noqa: E402

PAGES_DIR = REPO_ROOT / "pages"
PAGES = [
    ("setup.py", "Setup", ":material/tune:", "setup"),
    ("spectra.py", "Spectra", ":material/show_chart:", "spectra"),
    ("budget.py", "Budget", ":material/memory:", "budget"),
    ("finetune.py", "Fine-tune", ":material/model_training:", "finetune"),
    ("continual.py", "Continual", ":material/linear_scale:", "continual"),
    ("runs.py", "Runs", ":material/table_view:", "runs"),
]

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
