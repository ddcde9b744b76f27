"""How a ``lance`` command ends when something goes wrong: a message with its cause, never a traceback.

Exit statuses: 0 done; 1 a run failed or the store/disk did (cause printed); 2 bad input (what to do
printed); 130 interrupted. ``LANCE_DEBUG=1`` re-raises unexpected errors so their traceback shows.
"""
from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from engine.calibration.budget import BudgetError
from engine.data.errors import BadImage, DatasetMissing
from engine.models.weights import WeightsMissing
from engine.store import StoreDamaged, StoreError, StoreReadOnly, StoreUnavailable
from engine.train.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def debug() -> bool:
    return os.environ.get("LANCE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _silence_stdout() -> None:
    """After EPIPE (``lance runs show X | head``): point stdout at /dev/null so the exit flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def describe_os_error(exc: OSError) -> str:
    """``"No space left on device (ENOSPC): /path"``: the cause in words, its errno name, the file."""
    name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    text = exc.strerror or str(exc)
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    return f"{text}{f' ({name})' if name else ''}{where}"


def bad_input_types() -> tuple[type, ...]:
    """Errors that mean "the user asked for something impossible": exit 2."""
    return (ConfigError, BudgetError, DatasetMissing, BadImage, WeightsMissing, StoreError)


def run_guarded(func: Callable, args, prog: str = "lance") -> int:
    """``func(args)`` with every escaping error turned into a message and an exit status."""
    try:
        return int(func(args) or 0)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StoreDamaged, StoreReadOnly, StoreUnavailable) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except bad_input_types() as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        if debug():
            raise
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug: say so, keep the traceback for LANCE_DEBUG=1
        if debug():
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc}\n"
              f"This is a bug in lance, not in your input. Rerun with LANCE_DEBUG=1 to see the traceback "
              "and report it.", file=sys.stderr)
        return EXIT_FAILED
