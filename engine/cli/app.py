"""``lance app``: start the Streamlit app (binds localhost unless told otherwise)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


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
    import lance_app

    return Path(lance_app.__file__).resolve().parent / "main.py"


def streamlit_argv(port: int, address: str) -> list[str]:
    """The command that serves the app: no telemetry, headless, no file watcher."""
    return [sys.executable, "-m", "streamlit", "run", str(entrypoint()),
            "--server.port", str(port), "--server.address", address,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false"]


def run(args: argparse.Namespace) -> int:
    if not (1 <= args.port <= 65535):
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    main = entrypoint()
    pages = main.parent.parent / "pages"
    if not pages.is_dir():
        print(f"error: the app's pages folder is missing ({pages}); install the project from its "
              "checkout with `pip install -e .`", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.home:
        env["LANCE_HOME"] = os.environ["LANCE_HOME"] = str(Path(args.home).expanduser().resolve())
    from lance_app.catalog import apply_shared_defaults

    for key, value in apply_shared_defaults(env).items():
        print(f"{key}={value} (../shared found)", flush=True)
    print(f"LANCE Lab on http://{args.address}:{args.port}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(streamlit_argv(args.port, args.address), env=env, cwd=str(main.parent.parent))
    except KeyboardInterrupt:
        return 0
