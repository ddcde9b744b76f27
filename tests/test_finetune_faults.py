"""Faults with real processes: Ctrl-C (SIGINT to the process group, as the app's stop button sends),
SIGTERM and kill -9 in the middle of a `lance finetune` run."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.store import RunStore

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _shared_decode_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lance_cache"))


def start_run(job_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine", "finetune", "--backbone", "small-cnn", "--dataset", "digits",
           "--method", "asi", "--layers", "2", "--epochs", "40", "--batch-size", "32", "--limit-train", "96",
           "--limit-val", "32", "--quiet", "--job-id", job_id]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def raw_run(db: Path, job_id: str) -> dict | None:
    """Read the run row without RunStore (which would mark orphans on open)."""
    if not db.is_file():
        return None
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM runs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            return None
        run = dict(row)
        run["val_rows"] = conn.execute("SELECT COUNT(*) FROM metrics WHERE run_id=? AND split='val'",
                                       (run["id"],)).fetchone()[0]
        run["rows"] = conn.execute("SELECT COUNT(*) FROM metrics WHERE run_id=?", (run["id"],)).fetchone()[0]
        run["last_step"] = conn.execute("SELECT MAX(step) FROM metrics WHERE run_id=?", (run["id"],)).fetchone()[0]
        return run
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()


def wait_for_progress(proc, db: Path, job_id: str, epochs: int = 1, timeout_s: float = 120) -> dict:
    """Until the run has finished ``epochs`` epochs (2 val rows each) and one more step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()[-2000:]}")
        run = raw_run(db, job_id)
        if run and run["val_rows"] >= 2 * epochs and run["last_step"] and run["last_step"] > 3 * epochs:
            return run
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run made no progress in time")


def test_sigterm_inside_the_process_interrupts_the_run():
    """SIGTERM arriving mid-step (here sent by a sink at step 4) ends the run as interrupted."""
    from engine.train.config import FinetuneConfig
    from engine.train.events import StepEnded
    from engine.train.session import run_finetune

    class TermAtStep4:
        def emit(self, event):
            if isinstance(event, StepEnded) and event.step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    config = FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["vanilla", "asi"], layers=2,
                            epochs=3, batch_size=32, limit_train=96, limit_val=32)
    store = RunStore()
    results = run_finetune(config, store=store, sinks=[TermAtStep4()])
    assert [r.status for r in results] == ["interrupted"]  # the second method never starts
    run = store.get_run(results[0].run_id)
    assert run["status"] == "interrupted" and "SIGTERM" in run["message"]
    assert store.last_step(run["id"]) == 4
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


def test_sigint_to_the_process_group_marks_the_run_interrupted_with_its_metrics():
    sig = signal.SIGINT
    store_root = Path(os.environ["LANCE_HOME"])
    db = store_root / "runs.sqlite"
    proc = start_run("job-stop")
    seen = wait_for_progress(proc, db, "job-stop")
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    run = RunStore().get_run(seen["id"])
    assert run["status"] == "interrupted"
    assert "at step" in run["message"] and "--resume" in run["message"]
    assert "Traceback" not in err
    rows = RunStore().metrics(run["id"])
    assert len(rows) >= seen["rows"]
    assert run["summary"]["steps"] >= seen["last_step"]


def test_kill_9_leaves_a_readable_store_and_the_next_start_marks_the_run_interrupted():
    store_root = Path(os.environ["LANCE_HOME"])
    db = store_root / "runs.sqlite"
    proc = start_run("job-kill")
    seen = wait_for_progress(proc, db, "job-kill")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    after = raw_run(db, "job-kill")
    assert after["status"] == "running"  # nobody could close it
    assert after["rows"] >= seen["rows"]

    store = RunStore()  # the next start: the dead owner is noticed
    run = store.get_run(seen["id"])
    assert run["status"] == "interrupted"
    assert f"step {after['last_step']}" in run["message"]
    assert len(store.metrics(run["id"])) == after["rows"]

    # and it resumes from its last finished epoch to completion
    ckpt_epoch = __import__("torch").load(store.checkpoint_path(run["id"]), weights_only=False)["epoch"]
    assert ckpt_epoch >= 1
    assert main(["finetune", "--resume", run["id"], "--epochs", str(ckpt_epoch + 1), "--quiet"]) == 0
    run = store.get_run(run["id"])
    assert run["status"] == "completed"
    steps = [r["step"] for r in store.metrics(run["id"], key="loss", split="train")]
    per_epoch = 3
    assert max(steps) == (ckpt_epoch + 1) * per_epoch
    assert len(set(steps)) == max(steps)  # no step twice, none missing
