"""The run store under a careless or hostile user: real files, real SQLite damage, a real read-only mount."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.store import RunStore, StoreDamaged, StoreError, StoreReadOnly
from engine.store.repair import repair_store

REPO_ROOT = Path(__file__).resolve().parents[1]


def _home() -> Path:
    return Path(os.environ["LANCE_HOME"])


def make_run(store: RunStore, method: str = "asi", status: str = "completed") -> str:
    run_id = store.create_run("finetune", method, {"backbone": "small-cnn", "dataset": "digits", "epochs": 2})
    store.log_metrics(run_id, [{"step": s, "epoch": 0, "split": "train", "key": "loss", "value": 1.0 / s}
                               for s in range(1, 6)])
    store.log_metrics(run_id, [{"step": 5, "epoch": 0, "split": "val", "key": "acc", "value": 55.5}])
    store.set_summary(run_id, {"val_acc": 55.5})
    store.set_status(run_id, status, None if status == "completed" else "boom")
    return run_id


def snapshot(store: RunStore) -> dict:
    return {r["id"]: (r["status"], r["method"], r["summary"], [(m["step"], m["key"], m["value"])
                                                                for m in store.metrics(r["id"])])
            for r in store.list_runs()}


# ---------------------------------------------------------------------- export
def test_export_refuses_the_store_itself_and_existing_files(capsys):
    store = RunStore()
    run_id = make_run(store)
    db_bytes = store.db_path.read_bytes()
    for target in (store.db_path, store.root / "runs.sqlite-wal", store.run_dir(run_id) / "config.json"):
        assert main(["runs", "export", run_id, "--out", str(target), "--format", "json", "--force"]) == 2
        assert "run store itself" in capsys.readouterr().err
    assert main(["runs", "list"]) == 0 and run_id in capsys.readouterr().out  # the store still works
    assert store.db_path.read_bytes()[:16] == db_bytes[:16] == b"SQLite format 3\x00"

    other = store.root.parent / "keep.json"
    other.write_text("precious")
    assert main(["runs", "export", run_id, "--out", str(other)]) == 2
    assert "already exists" in capsys.readouterr().err and other.read_text() == "precious"
    assert main(["runs", "export", run_id, "--out", str(other), "--force"]) == 0
    assert json.loads(other.read_text())["id"] == run_id


def test_failed_export_leaves_no_partial_file(tmp_path):
    store = RunStore()
    run_id = make_run(store)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ro = _read_only_view(out_dir, tmp_path / "ro_out")
    with ro as view, pytest.raises(StoreError, match="Read-only file system"):
        store.export_run(run_id, view / "x.csv")
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------- delete / ids
def test_empty_and_malformed_ids_are_refused(capsys):
    store = RunStore()
    a, b = make_run(store), make_run(store, "vanilla")
    for ref in ("", "  ", "%", "_", "../", "2026*"):
        assert main(["runs", "delete", ref]) == 2
        assert "run id" in capsys.readouterr().err
    assert main(["runs", "delete", "20"]) == 2  # ambiguous
    assert "matches 2 runs" in capsys.readouterr().err
    assert {r["id"] for r in store.list_runs()} == {a, b}
    assert store.run_dir(a).is_dir() and store.run_dir(b).is_dir()


def test_tampered_id_in_the_database_never_reaches_outside_the_store(tmp_path, capsys):
    store = RunStore()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    store_runs = store.root / "runs"
    evil = os.path.relpath(victim, store_runs)  # e.g. ../../victim
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("INSERT INTO runs (id, kind, method, status, config, created_at, updated_at) "
                     "VALUES (?, 'finetune', 'asi', 'completed', '{}', 0, 0)", (evil,))
    with pytest.raises(StoreError, match="not a run id"):
        store.delete_run(evil)
    with pytest.raises(StoreError, match="not a run id"):
        store.checkpoint_path(evil)
    assert main(["runs", "delete", evil]) == 2
    assert main(["runs", "list"]) == 0  # listing still works
    assert (victim / "precious.txt").read_text() == "keep me"


def test_symlinked_run_folder_is_unlinked_not_followed(tmp_path):
    store = RunStore()
    run_id = make_run(store)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    shutil.rmtree(store.run_dir(run_id))
    store.run_dir(run_id).symlink_to(outside)
    store.delete_run(run_id)
    assert (outside / "keep.txt").read_text() == "x" and not store.run_dir(run_id).exists()


# ---------------------------------------------------------------------- read-only
@contextlib.contextmanager
def _bind_read_only(src: Path, view: Path):
    view.mkdir()
    done = subprocess.run(["mount", "--bind", str(src), str(view)], check=False, capture_output=True)
    if done.returncode != 0:
        view.rmdir()
        pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()}); root ignores chmod, so no "
                    "read-only folder can be made")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(view)]
        if subprocess.run(remount, check=False, capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield view
    finally:
        import gc

        gc.collect()  # close stores (their sqlite connections) opened on the view
        if subprocess.run(["umount", str(view)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(view)], check=False, capture_output=True)
        view.rmdir()


def _read_only_view(src: Path, view: Path):
    """A real read-only view of ``src``: chmod where it binds (non-root), else a read-only bind mount."""
    if os.geteuid() != 0:
        @contextlib.contextmanager
        def chmodded():
            for p in [src, *src.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            try:
                yield src
            finally:
                for p in [src, *src.rglob("*")]:
                    p.chmod(p.stat().st_mode | 0o200)
        return chmodded()
    return _bind_read_only(src, view)


def test_read_only_store_lists_shows_and_exports(tmp_path, capsys, monkeypatch):
    src = tmp_path / "store"
    store = RunStore(src)
    run_id = make_run(store)
    store.close()
    before = snapshot(RunStore(src))
    with _read_only_view(src, tmp_path / "ro") as view:
        monkeypatch.setenv("LANCE_HOME", str(view))
        ro = RunStore()
        assert ro.read_only and snapshot(ro) == before
        assert main(["runs", "list"]) == 0 and run_id in capsys.readouterr().out
        assert main(["runs", "show", run_id[:10]]) == 0 and "completed" in capsys.readouterr().out
        out = tmp_path / "exported.csv"
        assert main(["runs", "export", run_id, "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 1 + 6
        with pytest.raises(StoreReadOnly, match="read-only"):
            ro.create_run("finetune", "asi", {})
        assert main(["runs", "delete", run_id]) == 1
        assert "read-only" in capsys.readouterr().err
        ro.close()
    assert snapshot(RunStore(src)) == before


# ---------------------------------------------------------------------- damage and repair
def test_zero_byte_database_is_reported_and_repair_restores_every_run(capsys):
    store = RunStore()
    runs = [make_run(store), make_run(store, "vanilla", "failed")]
    running = store.create_run("continual", "lance", {"benchmark": "split-digits"})
    store.log_metrics(running, [{"step": 0, "epoch": 0, "split": "train", "task": 0, "key": "loss", "value": 2.0}])
    before = snapshot(store)
    store.close()
    store.db_path.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(str(store.db_path) + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreDamaged, match="empty.*lance runs repair"):
        RunStore()
    assert main(["runs", "list"]) == 1
    err = capsys.readouterr().err
    assert "empty (0 bytes)" in err and "3 run folder(s)" in err and "Traceback" not in err
    assert main(["runs", "repair"]) == 0
    assert "restored 3 run(s)" in capsys.readouterr().out
    after = snapshot(RunStore())
    for run_id in runs:
        assert after[run_id] == before[run_id]
    # the unfinished run comes back interrupted, its rows kept
    assert after[running][0] == "interrupted" and after[running][3] == before[running][3]


def test_random_bytes_and_damaged_pages_are_reported_and_repaired(capsys):
    store = RunStore()
    runs = [make_run(store) for _ in range(3)]
    before = snapshot(store)
    store.close()
    # damaged pages: overwrite everything after the header page with garbage
    data = bytearray(store.db_path.read_bytes())
    for suffix in ("-wal", "-shm"):
        Path(str(store.db_path) + suffix).unlink(missing_ok=True)
    data[4096:] = os.urandom(len(data) - 4096)
    store.db_path.write_bytes(bytes(data))
    assert main(["runs", "list"]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "lance runs repair" in err and "Traceback" not in err
    report = repair_store(store.root)
    assert report["state"].startswith("damaged") and sorted(report["restored"]) == sorted(runs)
    assert Path(report["kept_as"]).is_file()  # the damaged file is kept, not deleted
    assert snapshot(RunStore()) == before

    # random bytes where the database was
    RunStore().close()
    store.db_path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreDamaged, match="not a database"):
        RunStore()
    assert main(["runs", "repair"]) == 0
    assert snapshot(RunStore()) == before


def test_repair_of_a_healthy_store_changes_nothing():
    store = RunStore()
    make_run(store)
    before = snapshot(store)
    report = repair_store(store.root)
    assert report["state"] == "ok" and report["restored"] == [] and snapshot(RunStore()) == before


def test_truncate_keeps_metrics_file_in_step_with_the_database():
    store = RunStore()
    run_id = make_run(store)
    store.truncate_metrics(run_id, after_step=2)
    from engine.store import files

    on_disk = [(r["step"], r["key"]) for r in files.read_rows(store.run_dir(run_id))]
    assert on_disk == [(m["step"], m["key"]) for m in store.metrics(run_id)] == [(1, "loss"), (2, "loss")]


# ---------------------------------------------------------------------- CLI output
def test_show_into_a_closed_pipe_prints_no_traceback():
    store = RunStore()
    run_id = make_run(store)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = (f"{sys.executable} -m engine runs show {run_id} | head -1; "
           f"{sys.executable} -m engine runs list | head -c 10")
    done = subprocess.run(["bash", "-c", cmd], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.startswith("run      ") and "Traceback" not in done.stderr
    assert "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("after_line", ['conn.execute("BEGIN IMMEDIATE")', "result = fn(conn)"])
def test_ctrl_c_inside_a_write_leaves_the_store_writable(tmp_path, after_line):
    """Stop (SIGINT) can land on any bytecode, also between BEGIN and COMMIT. The interrupted write is
    rolled back and the interrupt handler's next write (the run's ``interrupted`` status) goes through:
    it once failed with 'cannot start a transaction within a transaction' and the run stayed 'running'."""
    store = RunStore(tmp_path / "home")
    run_id = make_run(store, status="running")
    source, first = inspect.getsourcelines(RunStore._write_on)
    target = first + next(i for i, line in enumerate(source) if after_line in line)
    code = RunStore._write_on.__code__
    fired = []

    def tracer(frame, event, arg):
        if frame.f_code is not code:
            return None
        def local(frame, event, arg):
            if event == "line" and frame.f_lineno > target and not fired:
                fired.append(frame.f_lineno)
                raise KeyboardInterrupt  # what the SIGINT handler raises between two bytecodes
            return local
        return local

    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.log_metrics(run_id, [{"step": 6, "epoch": 0, "split": "train", "key": "loss", "value": 0.1}])
    finally:
        sys.settrace(None)
    assert fired, "the interrupt was never injected"
    store.set_status(run_id, "interrupted", "stopped by Ctrl-C")
    assert store.get_run(run_id)["status"] == "interrupted"
    assert [m["step"] for m in store.metrics(run_id, key="loss")] == [1, 2, 3, 4, 5]  # the cut write rolled back
