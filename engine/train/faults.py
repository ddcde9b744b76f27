"""What stops a run early: a diverged loss, Ctrl-C, SIGTERM."""
from __future__ import annotations

import contextlib
import signal
import threading


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf. The message says at which step and what to try."""

    def __init__(self, step: int, epoch: int, value: float, lr: float | None = None, method: str | None = None):
        self.step, self.epoch, self.value = step, epoch, value
        hints = [f"a lower --lr (now {lr:g})" if lr is not None else "a lower --lr",
                 "a smaller --grad-clip"]
        if method in ("asi", "lance"):
            hints.append("a larger --budget or --eps (more rank)")
        if method == "hosvd":
            hints.append("a larger --eps")
        super().__init__(
            f"loss became {value} at step {step} (epoch {epoch + 1}); the run stopped there. "
            f"Try {', '.join(hints)}, or check the data for broken images."
        )


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) asked the run to stop."""


@contextlib.contextmanager
def interrupt_on_sigterm():
    """Turn SIGTERM into ``RunInterrupted`` while the block runs (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
