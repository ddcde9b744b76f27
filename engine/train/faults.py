"""What stops a run early: a diverged loss, Ctrl-C, SIGTERM."""
from __future__ import annotations

import contextlib
import errno
import signal
import threading

import torch


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf. The message says at which step and what to try."""

    def __init__(self, step: int, epoch: int, value: float, lr: float | None = None, method: str | None = None,
                 continual: bool = False):
        self.step, self.epoch, self.value = step, epoch, value
        hints = [f"a lower --lr (now {lr:g})" if lr is not None else "a lower --lr"]
        if continual:
            hints.append("--momentum 0")
        else:
            hints.append("a smaller --grad-clip")
        if method in ("asi", "lance") and not continual:
            hints.append("a larger --budget or --eps (more rank)")
        if method == "hosvd":
            hints.append("a larger --eps")
        super().__init__(
            f"loss became {value} at step {step} (epoch {epoch + 1}); the run stopped there. "
            f"Try {', '.join(hints)}, or check the data for broken images."
        )


def is_numerical_failure(exc: BaseException) -> bool:
    """A linear-algebra or non-finite-value error: what a diverging run raises inside SVD/eigh/QR."""
    if isinstance(exc, (torch.linalg.LinAlgError, TrainingDiverged)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("linalg", "lapack", "svd", "eigh", "did not converge"))


def explain_failure(exc: BaseException, lr: float | None = None, method: str | None = None) -> str:
    """The message a failed run keeps: the advice for a diverged run, else ``Type: message`` (+ errno name)."""
    if isinstance(exc, TrainingDiverged):
        return str(exc)
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.errno:
        cause += f" ({errno.errorcode.get(exc.errno, exc.errno)})"
    if is_numerical_failure(exc):
        lr_text = f" (now {lr:g})" if lr is not None else ""
        extra = ", a larger --eps or --budget" if method in ("asi", "lance", "hosvd") else ""
        return (f"a linear-algebra step failed, most likely because the loss became nan/inf and the activations "
                f"are no longer finite; the run stopped there. Try a lower --lr{lr_text}{extra}, or check the data "
                f"for broken images. Cause: {cause}")
    return cause


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) asked the run to stop."""


_pending: list[str] = []  # signals received inside ``interrupt_on_signals`` whose exception may have been lost


@contextlib.contextmanager
def interrupt_on_signals():
    """Turn SIGINT (Ctrl-C, the app's Stop) and SIGTERM into ``RunInterrupted`` while the block runs.

    Python drops an exception raised while a finalizer or ``__del__`` runs ("Exception ignored in …"): a
    signal landing there would be lost and the run would go on. The signal is also remembered, and
    :func:`raise_if_interrupted` (the training loops call it at every step) raises it again. Main thread only;
    elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        _pending.append(name)
        raise RunInterrupted(_signal_message(name))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _pending.clear()


def raise_if_interrupted() -> None:
    """Raise ``RunInterrupted`` when a stop signal arrived and its exception did not reach the run."""
    if _pending:
        name = _pending[-1]
        _pending.clear()
        raise RunInterrupted(_signal_message(name))


def _signal_message(name: str) -> str:
    return "stopped by Ctrl-C (SIGINT)" if name == "SIGINT" else f"stopped by signal {name}"
