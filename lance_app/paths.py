"""Where the app's page scripts are.

The top-level ``pages/`` folder of the checkout is packaged as ``lance_app.pages``
(``package_dir`` in ``setup.py``): a wheel installs it at ``lance_app/pages``;
a checkout (editable install, or ``PYTHONPATH``) keeps it beside ``lance_app/``.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

# (file in pages_dir(), title, icon, url path): the app's navigation, in order
PAGES = [
    ("setup.py", "Setup", ":material/tune:", "setup"),
    ("spectra.py", "Spectra", ":material/show_chart:", "spectra"),
    ("budget.py", "Budget", ":material/memory:", "budget"),
    ("finetune.py", "Fine-tune", ":material/model_training:", "finetune"),
    ("continual.py", "Continual", ":material/linear_scale:", "continual"),
    ("sweep.py", "Sweep", ":material/scatter_plot:", "sweep"),
    ("runs.py", "Runs", ":material/table_view:", "runs"),
]


def pages_dir() -> Path:
    """The folder of the page scripts (``setup.py``, ``finetune.py``, …) of this installation."""
    installed = PACKAGE_DIR / "pages"
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / "pages"
