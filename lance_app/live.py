"""Reading a job's runs and metrics from the run store, incrementally. No Streamlit calls.

A job (one CLI process) creates one run per method; :class:`JobView` gathers them and their metric
rows (long format) into one DataFrame labelled by run, fetching only rows newer than the last poll
(``since_id``), so a poll every second stays cheap however long the run is.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pandas as pd

from lance_app.figures import metrics_frame, run_label

TERMINAL = ("completed", "failed", "interrupted")
POLL_S = float(os.environ.get("LANCE_APP_POLL_S", "0.5"))


@dataclass
class JobView:
    """Accumulated state of one job: its runs and all their metric rows so far."""

    job_id: str
    runs: list[dict] = field(default_factory=list)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    last_ids: dict[str, int] = field(default_factory=dict)

    def poll(self, store) -> int:
        """Fetch the job's runs and their new metric rows; returns how many rows were new."""
        self.runs = sorted(store.list_runs(job_id=self.job_id), key=lambda r: str(r.get("created_at", "")))
        new = 0
        for run in self.runs:
            rid = run["id"]
            since = self.last_ids.get(rid)
            rows = store.metrics(rid, since_id=since) if since is not None else store.metrics(rid)
            if not rows:
                continue
            has_ids = all(r.get("id") is not None for r in rows)
            frame = metrics_frame(rows, label=run_label(run), run_id=rid)
            if since is not None and has_ids and rid in self.frames:
                self.frames[rid] = pd.concat([self.frames[rid], frame], ignore_index=True)
            else:  # first poll, or a store without row ids (then every poll refetches everything)
                self.frames[rid] = frame
            if has_ids:
                self.last_ids[rid] = max(int(r["id"]) for r in rows)
            new += len(rows)
        return new

    @property
    def frame(self) -> pd.DataFrame:
        """All runs' rows, in run order."""
        frames = [self.frames[r["id"]] for r in self.runs if r["id"] in self.frames]
        frames = [f for f in frames if f is not None and not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else metrics_frame([])

    @property
    def active(self) -> bool:
        return any(r.get("status") not in TERMINAL for r in self.runs)


def run_progress(frame: pd.DataFrame, run: dict, total_steps: int | None = None,
                 epochs: int | None = None) -> float:
    """Fraction in [0, 1] of one run done: from its steps when the total is known, else its epochs.

    The total comes from the run's config (``steps_per_epoch`` × ``epochs``, written by
    ``lance finetune``) or else from ``total_steps``; steps are counted from 1.
    """
    if run.get("status") == "completed":
        return 1.0
    if frame is None or frame.empty:
        return 0.0
    part = frame[frame["run_id"] == run["id"]]
    if part.empty:
        return 0.0
    config = run.get("config") or {}
    epochs = config.get("epochs") or epochs
    if config.get("steps_per_epoch") and epochs:
        total_steps = int(config["steps_per_epoch"]) * int(epochs)
    if total_steps:
        steps = part.loc[part["split"] == "train", "step"].dropna()
        if not steps.empty:
            return min(1.0, float(steps.max()) / total_steps)
    if epochs:
        ep = part.loc[part["split"] == "val", "epoch"].dropna()
        if not ep.empty:
            return min(1.0, (float(ep.max()) + 1) / epochs)
    return 0.0


def job_progress(view: JobView, n_runs_expected: int, steps_per_run: int | None,
                 epochs: int | None) -> float:
    """Overall fraction of a job that runs ``n_runs_expected`` methods one after another."""
    if n_runs_expected <= 0:
        return 0.0
    frame = view.frame
    done = sum(run_progress(frame, run, steps_per_run, epochs) for run in view.runs)
    return max(0.0, min(1.0, done / n_runs_expected))


def steps_per_run(limit_train: int | None, batch_size: int, epochs: int) -> int | None:
    """Training steps of one run when the number of training images is known (``--limit-train``)."""
    if not limit_train or batch_size <= 0:
        return None
    return int(math.ceil(limit_train / batch_size)) * max(1, epochs)


PHASE_LABELS = {"decoding": "Decoding images", "caching": "Caching frozen features", "calibrating": "Calibrating",
                "training": "Training", "evaluating": "Evaluating", "done": "Done"}


def phase_line(phase: dict | None, now: float | None = None) -> tuple[str, float | None] | None:
    """(text, fraction done or None) for a job's phase record ``{"phase", "done", "total", "updated_at"}``
    (``RunStore.phase(job_id)``); None when the job has reported no phase yet."""
    if not phase or not phase.get("phase"):
        return None
    name = str(phase["phase"])
    text = PHASE_LABELS.get(name, name.capitalize())
    done, total = phase.get("done"), phase.get("total")
    fraction = None
    if total:
        fraction = max(0.0, min(1.0, float(done or 0) / float(total)))
        text += f" · {int(done or 0):,}/{int(total):,} ({fraction:.0%})"
    elif done is not None:
        text += f" · {int(done):,}"
    else:
        text += "…"
    updated = phase.get("updated_at")
    if now is not None and updated:
        text += f" · updated {max(0.0, now - float(updated)):.0f} s ago"
    return text, fraction


def readable_failure(log_tail: str, max_lines: int = 3) -> str:
    """The last meaningful lines of a job's output, without traceback frames."""
    lines = [ln.rstrip() for ln in log_tail.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Traceback", "  ", "\t")) and "^^^" not in ln
            and not ln.lstrip().startswith("File \"")]
    return "\n".join(keep[-max_lines:]) if keep else "the job ended without writing any run"
