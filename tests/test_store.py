"""The SQLite run store: API round trips, several writer processes, orphaned runs."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.store import RunNotFound, RunStore, StoreError
from engine.store.procinfo import is_alive, process_start_token

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_default_root_follows_lance_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_HOME", str(tmp_path / "elsewhere"))
    store = RunStore()
    assert store.root == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere" / "runs.sqlite").is_file()
    mode = sqlite3.connect(store.db_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_run_round_trip(tmp_path):
    store = RunStore(tmp_path / "s")
    config = {"seed": 3, "method": "asi", "ranks": {"a": (1, 2, 3, 4)}, "path": tmp_path}
    run_id = store.create_run(kind="finetune", method="asi", config=config, job_id="job-1")
    run = store.get_run(run_id)
    assert run["status"] == "running" and run["kind"] == "finetune" and run["method"] == "asi"
    assert run["pid"] == os.getpid() and run["job_id"] == "job-1"
    assert run["config"]["ranks"] == {"a": [1, 2, 3, 4]} and run["config"]["path"] == str(tmp_path)
    assert json.loads((store.run_dir(run_id) / "config.json").read_text())["seed"] == 3

    rows = [{"step": s, "epoch": 0, "split": "train", "key": "loss", "value": 1.0 / s} for s in (1, 2, 3)]
    rows.append({"step": 3, "epoch": 0, "split": "val", "key": "acc", "value": 50.0})
    rows.append({"step": 3, "epoch": 0, "split": "train", "key": "rank/fc/0", "value": 4})
    assert store.log_metrics(run_id, rows) == 5
    got = store.metrics(run_id, key="loss")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[1]["value"] == pytest.approx(0.5)
    assert [r["key"] for r in store.metrics(run_id, split="val")] == ["acc"]
    assert [r["key"] for r in store.metrics(run_id, key_prefix="rank/")] == ["rank/fc/0"]
    first_id = got[0]["id"]
    assert len(store.metrics(run_id, since_id=first_id)) == 4
    assert store.last_step(run_id) == 3
    assert store.metric_keys(run_id) == ["acc", "loss", "rank/fc/0"]

    store.set_status(run_id, "completed", message="done")
    store.set_summary(run_id, {"val_acc": 91.5})
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["message"] == "done"
    assert run["summary"] == {"val_acc": 91.5}
    assert json.loads((store.run_dir(run_id) / "summary.json").read_text()) == {"val_acc": 91.5}
    assert store.update_config(run_id, {"ranks_used": [1]})["ranks_used"] == [1]
    assert store.get_run(run_id)["config"]["seed"] == 3


def test_claim_run_takes_over_the_run_and_its_job(tmp_path):
    store = RunStore(tmp_path / "s")
    run_id = store.create_run("finetune", "asi", {}, job_id="job-1")
    store.set_status(run_id, "interrupted", "killed")
    store.claim_run(run_id)
    run = store.get_run(run_id)
    assert run["status"] == "running" and run["message"] is None and run["job_id"] == "job-1"
    store.claim_run(run_id, job_id="job-2")
    assert store.get_run(run_id)["job_id"] == "job-2"


def test_list_filter_find_and_delete(tmp_path):
    store = RunStore(tmp_path)
    a = store.create_run("finetune", "vanilla", {}, job_id="j1")
    b = store.create_run("continual", "lance", {}, job_id="j2")
    c = store.create_run("finetune", "asi", {}, job_id="j1")
    store.set_status(b, "failed", "boom")
    assert [r["id"] for r in store.list_runs()] == [a, b, c]
    assert [r["id"] for r in store.list_runs(kind="finetune")] == [a, c]
    assert [r["id"] for r in store.list_runs(status="failed")] == [b]
    assert [r["id"] for r in store.list_runs(job_id="j1")] == [a, c]
    assert store.find_run(b)["id"] == b
    assert store.find_run(c[:-2])["id"] == c
    with pytest.raises(StoreError, match="matches"):
        store.find_run("20")
    store.log_metrics(a, [{"step": 1, "key": "loss", "value": 1.0}])
    store.delete_run(a)
    assert not store.run_dir(a).exists()
    assert store.count_metrics(a) == 0
    with pytest.raises(RunNotFound, match="lance runs list"):
        store.get_run(a)


def test_bad_input_is_refused(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(StoreError, match="unknown run kind"):
        store.create_run("train", "asi", {})
    run_id = store.create_run("finetune", "asi", {})
    with pytest.raises(StoreError, match="unknown status"):
        store.set_status(run_id, "done")
    with pytest.raises(RunNotFound):
        store.set_status("nope", "completed")
    with pytest.raises(StoreError, match="key"):
        store.log_metrics(run_id, [{"step": 1, "value": 2}])


def test_nan_metric_is_stored_as_null(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run("finetune", "asi", {})
    store.log_metrics(run_id, [{"step": 1, "key": "loss", "value": float("nan")},
                               {"step": 1, "key": "acc", "value": float("inf")}])
    values = {r["key"]: r["value"] for r in store.metrics(run_id)}
    assert values["loss"] is None and values["acc"] == float("inf")


def test_export_csv_and_json(tmp_path):
    store = RunStore(tmp_path / "s")
    run_id = store.create_run("finetune", "lance", {"seed": 1})
    store.log_metrics(run_id, [{"step": s, "epoch": 0, "split": "train", "key": "loss", "value": s}
                               for s in range(1, 4)])
    csv_path = store.export_run(run_id, tmp_path / "out.csv")
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["value"]) for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0]["method"] == "lance" and rows[0]["key"] == "loss"
    data = json.loads(store.export_run(run_id, tmp_path / "out.json").read_text())
    assert data["id"] == run_id and data["config"] == {"seed": 1} and len(data["metrics"]) == 3
    with pytest.raises(StoreError, match="csv or json"):
        store.export_run(run_id, tmp_path / "out.xml")


# ---------------------------------------------------------------------- concurrency
N_PROCS, N_BATCHES, ROWS_PER_BATCH = 4, 60, 5


def _writer(root: str, worker: int, start_evt) -> None:
    store = RunStore(root)
    run_id = store.create_run("finetune", f"w{worker}", {"worker": worker})
    start_evt.wait()
    for batch in range(N_BATCHES):
        store.log_metrics(run_id, [
            {"step": batch, "epoch": 0, "split": "train", "key": f"k{i}", "value": worker * 1000 + batch}
            for i in range(ROWS_PER_BATCH)
        ])
        # readers and status writers interleave with the metric writers
        store.set_status(run_id, "running")
        store.metrics(run_id, since_id=0)
    store.set_status(run_id, "completed")


def test_concurrent_writer_processes_lose_no_row(tmp_path):
    root = str(tmp_path / "store")
    RunStore(root)
    ctx = mp.get_context("fork")
    start_evt = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(root, w, start_evt)) for w in range(N_PROCS)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    start_evt.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = RunStore(root)
    runs = store.list_runs()
    assert len(runs) == N_PROCS and all(r["status"] == "completed" for r in runs)
    assert store.count_metrics() == N_PROCS * N_BATCHES * ROWS_PER_BATCH
    for run in runs:
        worker = run["config"]["worker"]
        values = [r["value"] for r in store.metrics(run["id"], key="k0")]
        assert values == [worker * 1000 + b for b in range(N_BATCHES)]


def test_threads_share_one_store(tmp_path):
    import threading

    store = RunStore(tmp_path)
    run_id = store.create_run("finetune", "asi", {})

    def work(t):
        for s in range(50):
            store.log_metrics(run_id, [{"step": s, "task": t, "key": "x", "value": s}])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count_metrics(run_id) == 200


# ---------------------------------------------------------------------- orphans
def test_killed_owner_is_marked_interrupted_on_next_open(tmp_path):
    root = tmp_path / "store"
    script = textwrap.dedent(f"""
        import sys, time
        from engine.store import RunStore
        store = RunStore({str(root)!r})
        run_id = store.create_run("finetune", "asi", {{}})
        store.log_metrics(run_id, [{{"step": s, "key": "loss", "value": s}} for s in range(1, 8)])
        print(run_id, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    run_id = proc.stdout.readline().strip()
    store = RunStore(root)
    assert store.get_run(run_id)["status"] == "running"  # owner alive: left alone
    assert store.mark_orphans_interrupted() == []
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = RunStore(root)  # opening marks orphans
    run = store.get_run(run_id)
    assert run["status"] == "interrupted"
    assert "step 7" in run["message"]
    assert store.count_metrics(run_id) == 7


def test_reused_pid_counts_as_dead():
    token = process_start_token(os.getpid())
    assert is_alive(os.getpid(), token)
    if token is not None:
        assert not is_alive(os.getpid(), str(int(token) + 1))
    assert not is_alive(None) and not is_alive(0)


def test_other_hosts_runs_are_left_alone(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run("finetune", "asi", {}, pid=999_999_999 % 4_000_000 + 1)
    store._write(lambda c: c.execute("UPDATE runs SET host='another-machine' WHERE id=?", (run_id,)))
    assert store.mark_orphans_interrupted() == []
    store._write(lambda c: c.execute("UPDATE runs SET host=NULL WHERE id=?", (run_id,)))
    if not is_alive(store.get_run(run_id)["pid"]):
        assert store.mark_orphans_interrupted() == [run_id]
