"""SIGINT for app jobs: the app stops a job by sending SIGINT to its process group (``lance_app.jobs``).

A non-interactive shell starts background commands with SIGINT ignored (``lance app &`` in a script, a
``nohup`` line, a CI step), every child inherits that, and Python then installs no handler of its own: the
app's Stop would never reach its jobs. A job (a command given ``--job-id``) puts Python's handler back.
"""
from __future__ import annotations

import signal
import threading


def restore_sigint(job_id: str | None) -> bool:
    """For an app job (``job_id`` set), turn an inherited "SIGINT ignored" back into ``KeyboardInterrupt``.

    Returns whether it changed anything: only in the main thread, only when SIGINT was ignored (a handler
    someone installed, or the default, is left alone), never for a plain command line run.
    """
    if not job_id or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True
