"""``lance app``: start the Streamlit app (binds localhost unless told otherwise).

The app package registers this subcommand through the ``lance.commands`` entry point group
(``pyproject.toml``); the engine's CLI discovers it and never imports Streamlit or ``lance_app``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import lance_app
from engine.models import build_backbone
from lance_app import catalog
from lance_app.catalog import DEFAULT_BACKBONE, apply_shared_defaults
from lance_app.paths import pages_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("app", help="start the LANCE Lab app in the browser (Streamlit)",
                              description="Start the Streamlit app on http://ADDRESS:PORT. Binds "
                                          "localhost by default; use --address 0.0.0.0 to expose it.")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    p.add_argument("--address", default="localhost",
                   help="address to bind (default localhost; 0.0.0.0 exposes it to the network)")
    p.add_argument("--home", default=None, help="run store folder (sets LANCE_HOME for the app and its jobs)")
    p.set_defaults(func=run)


def entrypoint() -> Path:
    """``lance_app/main.py`` of this installation."""
    return Path(lance_app.__file__).resolve().parent / "main.py"


def streamlit_argv(port: int, address: str) -> list[str]:
    """The command that serves the app: no telemetry, headless, no file watcher."""
    return [sys.executable, "-m", "streamlit", "run", str(entrypoint()),
            "--server.port", str(port), "--server.address", address,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false"]


PRELOAD = ("torch", "engine", "engine.models", "engine.data", "engine.store", "engine.calibration",
           "torchvision.models", "pandas", "pyarrow", "plotly.graph_objects", "plotly.io", "lance_app.figures",
           "lance_app.live", "lance_app.catalog")


def preload() -> float:
    """Import the heavy modules before the server answers, so the first page does not wait on them.

    Streamlit runs page scripts in this same process, so they find these in ``sys.modules``.
    Returns the seconds spent.
    """
    start = time.perf_counter()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a piece missing in this install: its page says so
            pass
    try:  # first use of torch's module init / kernels: the default backbone the Setup page shows

        build_backbone(DEFAULT_BACKBONE, weights="none", num_classes=10)

        catalog.dataset_options()
        for name in catalog.backbone_names():  # weight look-ups import their model families
            catalog.weights_options(name)
    except Exception:  # noqa: BLE001 - the page reports any problem readably
        pass
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    if not (1 <= args.port <= 65535):
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    pages = pages_dir()
    if not (pages / "setup.py").is_file():
        print(f"error: the app's pages are missing ({pages}); reinstall the project "
              "(`pip install .` or `pip install -e .` from its checkout)", file=sys.stderr)
        return 2
    if args.home:
        os.environ["LANCE_HOME"] = str(Path(args.home).expanduser().resolve())

    for key, value in apply_shared_defaults(os.environ).items():
        print(f"{key}={value} (../shared found)", flush=True)
    seconds = preload()
    print(f"LANCE Lab on http://{args.address}:{args.port}  (modules loaded in {seconds:.1f} s; Ctrl-C stops it)",
          flush=True)
    from streamlit.web import cli as streamlit_cli

    try:  # in-process, so the preloaded modules serve the page scripts
        streamlit_cli.main(args=streamlit_argv(args.port, args.address)[3:], prog_name="streamlit",
                           standalone_mode=False)
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
