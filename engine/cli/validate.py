"""Argument checks shared by the subcommands, before any run exists (the rest: ``engine.train.config``).

``check_not_empty(args, options)``: an option given as ``""`` (``--budget ""``) is refused instead of
being taken as "not given".
"""
from __future__ import annotations

from pathlib import Path

from engine.home import lance_home
from engine.train.config import ConfigError


def check_not_empty(args, options: tuple[str, ...]) -> None:
    """ConfigError naming the first of ``options`` (argparse dests) given as an empty or blank string."""
    for dest in options:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} is empty; give a value (see `lance {args.command} --help`) or leave {flag} out")


def check_json_target(target: str | None) -> None:
    """ConfigError when ``--json`` points into the run store (it would overwrite the database or a run file)."""
    if not target or target == "-":
        return

    root = lance_home().expanduser().resolve()
    path = Path(target).expanduser().resolve()
    if path == root or root in path.parents:
        raise ConfigError(f"--json {target}: that is inside the run store {root}; give a path outside it")
    if path.is_dir():
        raise ConfigError(f"--json {target} is a folder; give a file name")
