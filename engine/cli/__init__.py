"""The ``lance`` command line.

Every module in this package that defines ``register(subparsers)`` adds its own subcommand(s);
``register`` must call ``parser.set_defaults(func=run)`` where ``run(args) -> int`` is the exit status.
Other installed packages add theirs through the ``lance.commands`` entry point group (the app's
``lance app`` comes from ``lance_app.cli``): the engine itself never imports the app.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from importlib.metadata import entry_points

from engine.cli._errors import run_guarded
from engine.malloc import tune_malloc
from engine.shared import apply_shared_defaults

ENTRY_POINT_GROUP = "lance.commands"

# OpenMP threads that spin while waiting slow small kernels down by orders of magnitude on a busy
# machine; set before torch is first imported (every subcommand imports it lazily).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lance",
        description="LANCE Lab: memory-efficient on-device learning (ASI, LANCE, HOSVD, gradient filter).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``lance`` command; returns the exit status (0 ok, 1 a run or the store failed, 2 bad input).

    No traceback reaches the user: bad input gets its message and 2; a failure (a full or read-only disk,
    a damaged store, a bug) gets its cause and 1. ``LANCE_DEBUG=1`` shows the traceback of a bug.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage (2) or help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    # ../shared, as `lance app` finds it (the app prints what it set; it sets them itself)
    changed = {} if args.func.__module__ == "lance_app.cli" else apply_shared_defaults(os.environ)
    tune_malloc()  # engine.malloc: freed activations stay in the heap (no page faults every step)
    try:
        return run_guarded(args.func, args, prog=f"lance {args.command}")
    finally:
        for key in changed:  # in-process callers (tests) get their environment back
            os.environ.pop(key, None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
