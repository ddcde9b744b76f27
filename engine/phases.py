"""What a job is doing now: ``on_phase(phase, done, total)`` callbacks and the reporter that carries them.

Phases, in the order a fine-tune job passes them (``decoding`` and ``caching`` only when there is
something to decode or cache, ``calibrating`` only for methods that calibrate)::

    decoding     image files -> the decoded-array cache      done/total: images
    caching      the frozen prefix over the data set         done/total: images (one call per split)
    calibrating  LANCE calibration batches (or a budget's)   done/total: batches
    training     SGD steps                                   done/total: global steps of the run
    evaluating   validation after an epoch                   done/total: None (or epochs)
    done         the job has finished                        done/total: None

The engine reports through :func:`report`, which calls the callback installed by :func:`reporting`
(a context variable: no global state leaks between threads or nested jobs). Functions that report
also take an explicit ``on_phase`` argument; ``None`` there means "the installed one".
``Throttled`` keeps a callback from being called more than every ``interval_s`` within one phase
(a phase change and the last item, ``done == total``, always pass). ``StderrPhaseLine`` prints one
short line per phase and a progress line at most every few seconds.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from typing import Callable, Iterator, TextIO

PHASES = ("decoding", "caching", "calibrating", "training", "evaluating", "done")

PhaseCallback = Callable[[str, "int | None", "int | None"], None]

_current: contextvars.ContextVar[PhaseCallback | None] = contextvars.ContextVar("lance_on_phase", default=None)


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")
    return phase


@contextlib.contextmanager
def reporting(on_phase: PhaseCallback | None) -> Iterator[None]:
    """Within the block, :func:`report` (and every engine function that reports) calls ``on_phase``."""
    token = _current.set(on_phase)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> PhaseCallback | None:
    return _current.get()


def report(phase: str, done: int | None = None, total: int | None = None,
           on_phase: PhaseCallback | None = None) -> None:
    """Tell ``on_phase`` (default: the installed callback; none installed: nothing happens)."""
    callback = on_phase if on_phase is not None else _current.get()
    if callback is not None:
        callback(check_phase(phase), None if done is None else int(done), None if total is None else int(total))


class Throttled:
    """``callback`` called at most every ``interval_s`` per phase; a new phase and ``done == total`` always pass."""

    def __init__(self, callback: PhaseCallback, interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.callback, self.interval_s, self.clock = callback, float(interval_s), clock
        self._last_phase: str | None = None
        self._last_time = -float("inf")

    def __call__(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        now = self.clock()
        finished = done is not None and total is not None and done >= total
        if phase != self._last_phase or finished or now - self._last_time >= self.interval_s:
            self._last_phase, self._last_time = phase, now
            self.callback(phase, done, total)


def store_phase_writer(store, job_id: str, interval_s: float = 0.5, stream: TextIO | None = None) -> Throttled:
    """A throttled callback writing ``store.set_phase(job_id, ...)`` (the app's job runner reads it).

    A store that cannot be written (disk full, locked too long) never stops the job: the first failure
    is printed to ``stream`` (stderr) and later phases are no longer written.
    """
    state = {"failed": False}

    def write(phase: str, done: int | None, total: int | None) -> None:
        if state["failed"]:
            return
        try:
            store.set_phase(job_id, phase, done, total)
        except Exception as exc:  # noqa: BLE001 - a phase line is not worth a failed job
            state["failed"] = True
            print(f"lance: could not record the job phase ({exc}); the job goes on without phase updates",
                  file=stream or sys.stderr, flush=True)

    return Throttled(write, interval_s)


def cli_phase_callback(store, job_id: str | None, quiet: bool = False) -> PhaseCallback | None:
    """What the CLI installs: with a job id the store writer, else a short stderr line (None when quiet)."""
    if job_id:
        return store_phase_writer(store, job_id)
    return None if quiet else StderrPhaseLine()


class StderrPhaseLine:
    """Prints ``[phase] done/total`` lines: at every new phase, then at most every ``interval_s``.

    ``training`` is announced once after the phases before it (the loop's progress bar shows its steps,
    its epoch lines the validation), ``evaluating`` and ``done`` not at all.
    """

    def __init__(self, stream: TextIO | None = None, interval_s: float = 5.0):
        self._stream = stream
        self._throttled = Throttled(self._print, interval_s)
        self._last_phase: str | None = None

    def _print(self, phase: str, done: int | None, total: int | None) -> None:
        if phase in ("evaluating", "done") or (phase == "training" and self._last_phase == "training"):
            return
        self._last_phase = phase
        count = "" if done is None else (f" {done}/{total}" if total is not None else f" {done}")
        print(f"[{phase}]{count}", file=self._stream or sys.stderr, flush=True)

    def __call__(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self._throttled(phase, done, total)
