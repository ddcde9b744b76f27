"""Job runner + live polling against the real run store, with real subprocesses.

The job here is a small stand-in CLI written by the test (it creates a run with ``--job-id`` in the
real SQLite store, logs rows, turns SIGINT into ``interrupted``), so the runner's process-group,
stop, re-attach and failure handling are tested independently of the training code.
"""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from engine.store import RunStore
from lance_app.jobs import JobRunner
from lance_app.live import JobView, job_progress, readable_failure, steps_per_run

STANDIN = textwrap.dedent('''
    import sys, time
    from engine.store import RunStore
    args = sys.argv[1:]
    kind, job_id = args[0], args[args.index("--job-id") + 1]
    if "--fail" in args:
        print("error: dataset 'nope' not found; looked in /nowhere", file=sys.stderr)
        sys.exit(2)
    steps = int(args[args.index("--steps") + 1])
    store = RunStore()
    run = store.create_run(kind=kind, method="vanilla", config={"steps": steps}, job_id=job_id)
    try:
        for step in range(steps):
            store.log_metrics(run, [{"step": step, "epoch": 0, "split": "train", "key": "loss",
                                     "value": 1.0 / (step + 1)}])
            time.sleep(0.05)
        store.set_status(run, "completed")
    except KeyboardInterrupt:
        store.set_status(run, "interrupted", message="stopped by the user")
        sys.exit(130)
''')


@pytest.fixture()
def runner(tmp_path):
    script = tmp_path / "standin_cli.py"
    script.write_text(STANDIN)
    return JobRunner(os.environ["LANCE_HOME"], command=[sys.executable, str(script)])


def _wait_for(pred, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_job_runs_in_its_own_process_group_and_stop_interrupts_it(runner):
    job = runner.start("finetune", ["--steps", "2000"], label="t")
    assert runner.is_alive(job.job_id)
    assert os.getpgid(job.pid) == job.pid != os.getpgid(0)
    store = RunStore()
    view = JobView(job.job_id)
    _wait_for(lambda: view.poll(store) and len(view.frame) >= 3)
    n_first = len(view.frame)
    new = _wait_for(lambda: view.poll(store))
    assert len(view.frame) == n_first + new  # only new rows were fetched and appended
    assert view.frame["step"].tolist() == sorted(view.frame["step"].tolist())
    assert view.active
    assert runner.stop(job.job_id)
    assert runner.wait(job.job_id, timeout_s=20) == 130
    view.poll(store)
    assert view.runs[0]["status"] == "interrupted"
    assert not view.active
    assert not runner.stop(job.job_id)  # already ended


def test_stop_reaches_a_job_whose_parent_ignores_sigint(runner):
    """A runner in a process that ignores SIGINT (started in the background by a non-interactive shell: nohup,
    `cmd &` in a script): SIG_IGN survives exec, so the runner resets it in the child; Stop still interrupts the
    job and its run is marked. Also right after the start, before the child's Python is up."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        early = runner.start("finetune", ["--steps", "2000"])
        assert runner.stop(early.job_id)  # at once: the child may still be starting Python
        assert runner.wait(early.job_id, timeout_s=20) != 0
        job = runner.start("finetune", ["--steps", "2000"])
    finally:
        signal.signal(signal.SIGINT, previous)
    store = RunStore()
    view = JobView(job.job_id)
    _wait_for(lambda: view.poll(store) and len(view.frame) >= 2)
    assert runner.stop(job.job_id)
    assert runner.wait(job.job_id, timeout_s=20) == 130
    view.poll(store)
    assert view.runs[0]["status"] == "interrupted"


def test_a_second_runner_reattaches_like_a_restarted_server(runner):
    job = runner.start("continual", ["--steps", "2000"])
    other = JobRunner(runner.home)  # no Popen handle: finds the job through its record and pid
    assert other.get(job.job_id).argv == job.argv
    assert other.is_alive(job.job_id)
    assert [j.job_id for j in other.list(kind="continual", active_only=True)] == [job.job_id]
    assert other.list(kind="finetune") == []
    assert other.stop(job.job_id)
    runner.wait(job.job_id, timeout_s=20)
    assert not other.is_alive(job.job_id)


def test_two_jobs_at_once_write_their_own_runs(runner):
    a = runner.start("finetune", ["--steps", "20"])
    b = runner.start("finetune", ["--steps", "30"])
    assert runner.wait(a.job_id) == 0 and runner.wait(b.job_id) == 0
    store = RunStore()
    va, vb = JobView(a.job_id), JobView(b.job_id)
    va.poll(store), vb.poll(store)
    assert len(va.frame) == 20 and len(vb.frame) == 30
    assert [r["status"] for r in va.runs + vb.runs] == ["completed", "completed"]
    assert job_progress(va, 1, 20, 1) == 1.0


def test_a_failed_job_gives_a_readable_message(runner):
    job = runner.start("finetune", ["--fail"])
    assert runner.wait(job.job_id) == 2
    msg = readable_failure(runner.log_tail(job.job_id))
    assert msg == "error: dataset 'nope' not found; looked in /nowhere"


def test_runner_refuses_bad_input(runner):
    with pytest.raises(ValueError, match="unknown job kind"):
        runner.start("train", [])
    with pytest.raises(ValueError, match="--job-id"):
        runner.start("finetune", ["--job-id", "x"])
    assert runner.get("no-such-job") is None
    assert not runner.is_alive("no-such-job")


def test_readable_failure_drops_traceback_frames():
    log = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    foo()\n'
           '    ^^^^^\nengine.data.DatasetMissing: cifar10 not found in /data; set LANCE_DATA_ROOT\n')
    assert readable_failure(log) == "engine.data.DatasetMissing: cifar10 not found in /data; set LANCE_DATA_ROOT"
    assert readable_failure("") == "the job ended without writing any run"


def test_steps_per_run():
    assert steps_per_run(512, 64, 2) == 16
    assert steps_per_run(500, 64, 1) == 8
    assert steps_per_run(0, 64, 1) is None

