"""Argument checks shared by the subcommands, before any run exists (the rest: ``engine.train.config``).

``check_not_empty(args, options)``: an option given as ``""`` (``--budget ""``) is refused instead of
being taken as "not given".
"""
from __future__ import annotations

from engine.train.config import ConfigError


def check_not_empty(args, options: tuple[str, ...]) -> None:
    """ConfigError naming the first of ``options`` (argparse dests) given as an empty or blank string."""
    for dest in options:
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} is empty; give a value (see `lance {args.command} --help`) or leave {flag} out")
