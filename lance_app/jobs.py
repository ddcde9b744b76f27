"""Job runner: starts `lance finetune|continual ... --job-id ID` in its own process group.

The app never trains in its script thread. A job is one CLI subprocess; the runs it creates in the
run store carry its ``job_id``, so any page, browser refresh or second tab re-attaches by polling
``RunStore.list_runs(job_id=ID)``. This module makes no Streamlit calls.

A job record is a small JSON file ``$LANCE_HOME/app_jobs/<job_id>.json``
(``{job_id, kind, argv, pid, started_at, log_path, label, returncode}``) plus the job's combined
stdout/stderr in ``<job_id>.log`` beside it. Records survive a server restart; the processes do not
belong to the server (new session / process group), so a restart does not kill them.

Stop sends SIGINT to the job's whole process group: the CLI turns it into KeyboardInterrupt and
marks its run ``interrupted`` with every metric so far.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.home import lance_home

JOB_KINDS = ("finetune", "continual", "sweep")



@dataclass
class Job:
    """One CLI subprocess started by the app."""

    job_id: str
    kind: str
    argv: list[str]
    pid: int
    started_at: float
    log_path: str
    label: str = ""
    returncode: int | None = None
    extra: dict = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux /proc; ``kill 0`` elsewhere)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _default_sigint() -> None:
    """In a job's child between fork and exec: SIGINT back to its default (only when the runner ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class JobRunner:
    """Starts, lists, polls and stops CLI jobs; thread-safe; one per server process.

    ``home``: the LANCE_HOME the jobs write their runs to (records go to ``home/app_jobs``).
    ``command``: what runs ``lance``; defaults to ``[<this python>, "-m", "engine"]``.
    """

    def __init__(self, home: Path | str | None = None, command: list[str] | None = None):
        self.home = Path(home) if home is not None else lance_home()
        self.jobs_dir = self.home / "app_jobs"
        self.command = list(command) if command else [sys.executable, "-m", "engine"]
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # -- starting -------------------------------------------------------------------------------
    def start(self, kind: str, cli_args: list[str], label: str = "", extra: dict | None = None) -> Job:
        """Start ``lance <kind> <cli_args> --job-id ID`` in a new process group; returns the Job.

        ``cli_args`` must not contain ``--job-id``; the runner adds a fresh one.
        """
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(JOB_KINDS)}")
        if "--job-id" in cli_args:
            raise ValueError("cli_args must not contain --job-id: the job runner assigns it")
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.jobs_dir / f"{job_id}.log"
        argv = [*self.command, kind, *[str(a) for a in cli_args], "--job-id", job_id]
        env = dict(os.environ)
        env["LANCE_HOME"] = str(self.home)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Stop is SIGINT to the job's group. A runner in a process that ignores SIGINT (started in the background
        # by a non-interactive shell: nohup, `cmd &` in a script) would hand that to every job, since SIG_IGN
        # survives exec (a handler, like the Streamlit server's, does not): only then is it reset in the child.
        ignoring = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own session and process group: stop hits the whole job
                preexec_fn=_default_sigint if ignoring else None,
                cwd=os.getcwd(),
            )
        job = Job(job_id=job_id, kind=kind, argv=argv, pid=proc.pid, started_at=time.time(),
                  log_path=str(log_path), label=label, extra=dict(extra or {}))
        with self._lock:
            self._procs[job_id] = proc
            self._write(job)
        return job

    # -- reading --------------------------------------------------------------------------------
    def _record_path(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs_dir / f"{job_id}.json"

    def _write(self, job: Job) -> None:
        path = self._record_path(job.job_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1))
        os.replace(tmp, path)

    def get(self, job_id: str) -> Job | None:
        """The job's record, or None when there is no such job."""
        try:
            data = json.loads(self._record_path(job_id).read_text())
        except (OSError, ValueError):
            return None
        job = Job(**data)
        self._refresh(job)
        return job

    def list(self, kind: str | None = None, active_only: bool = False) -> list[Job]:
        """Jobs newest first, optionally only one kind / only those still running."""
        if not self.jobs_dir.is_dir():
            return []
        jobs = []
        for path in self.jobs_dir.glob("*.json"):
            job = self.get(path.stem)
            if job is None or (kind and job.kind != kind):
                continue
            if active_only and not self.is_alive(job.job_id):
                continue
            jobs.append(job)
        return sorted(jobs, key=lambda j: j.started_at, reverse=True)

    def _refresh(self, job: Job) -> None:
        """Reap a finished child of this server and persist its exit status."""
        proc = self._procs.get(job.job_id)
        if proc is not None and job.returncode is None:
            rc = proc.poll()
            if rc is not None:
                job.returncode = rc
                with self._lock:
                    self._write(job)

    def is_alive(self, job_id: str) -> bool:
        """True while the job's process runs."""
        proc = self._procs.get(job_id)
        if proc is not None:
            alive = proc.poll() is None
            if not alive:
                self.get(job_id)  # persists returncode
            return alive
        job = self.get(job_id)
        return job is not None and job.returncode is None and _pid_alive(job.pid)

    def returncode(self, job_id: str) -> int | None:
        """Exit status when known (None while running, or for a job of a previous server)."""
        job = self.get(job_id)
        return None if job is None else job.returncode

    def log_tail(self, job_id: str, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters of the job's stdout+stderr."""
        job = self.get(job_id)
        if job is None:
            return ""
        try:
            with open(job.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_chars))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    # -- stopping -------------------------------------------------------------------------------
    def stop(self, job_id: str, sig: int = signal.SIGINT) -> bool:
        """Send ``sig`` (default SIGINT) to the job's process group; False when it already ended."""
        if not self.is_alive(job_id):
            return False
        job = self.get(job_id)
        try:
            os.killpg(os.getpgid(job.pid), sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, job_id: str, timeout_s: float = 30.0) -> int | None:
        """Block until the job ends (tests and the CLI); returns its exit status when known."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_alive(job_id):
                return self.returncode(job_id)
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
