"""Faults keep their cause: diverging methods, a disk that fills up mid-run, continual at lr 1e30."""
from __future__ import annotations

import os
import signal
import subprocess
import weakref
from pathlib import Path

import pytest

from engine.cli import main
from engine.store import RunStore
from engine.train import FinetuneConfig, run_finetune
from engine.train.events import StepEnded
from engine.train.faults import RunInterrupted, interrupt_on_signals, raise_if_interrupted

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_diverging_method_fails_with_advice_and_the_next_still_runs(capsys):
    argv = ["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--method", "hosvd,vanilla",
            "--lr", "1e30", "--grad-clip", "0", "--epochs", "1", "--limit-train", "64", "--batch-size", "16",
            "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    runs = RunStore().list_runs()
    assert [r["method"] for r in runs] == ["hosvd", "vanilla"]
    for run in runs:
        assert run["status"] == "failed"
        assert "lower --lr" in run["message"], run["message"]
        assert f"[{run['method']}] failed" in err


def test_continual_at_lr_1e30_fails_each_method_with_advice(capsys):
    argv = ["continual", "--benchmark", "split-digits", "--method", "finetune,lance", "--lr", "1e30", "--epochs", "1",
            "--limit-train", "64", "--limit-test", "32", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    runs = RunStore().list_runs()
    assert [r["method"] for r in runs] == ["finetune", "lance"]  # lance ran after finetune failed
    assert all(r["status"] == "failed" and "lower --lr" in r["message"] for r in runs)
    assert "loss became nan" in runs[0]["message"]
    # no NULL training loss reported as a finished task
    store = RunStore()
    assert all(m["value"] is not None for m in store.metrics(runs[0]["id"], key="loss"))


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=False,
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    import gc

    gc.collect()
    if subprocess.run(["umount", str(mount_point)], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


class FillDisk:
    """At the first training step, fill the disk the store is on (a real ENOSPC from then on)."""

    def __init__(self, folder: Path):
        self.filler = folder / "filler"
        self.done = False

    def emit(self, event) -> None:
        if isinstance(event, StepEnded) and not self.done:
            self.done = True
            with open(self.filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * (1 << 16))
                        fh.flush()
                except OSError:
                    pass


def test_disk_full_mid_run_keeps_the_cause_and_the_rows(small_disk):
    store = RunStore(small_disk / "home")
    config = FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["vanilla"], epochs=2, batch_size=16,
                            limit_train=128)
    lines: list[str] = []
    results = run_finetune(config, store=store, sinks=[FillDisk(small_disk)], log=lines.append)
    (result,) = results
    assert result.status == "failed"
    assert "ENOSPC" in result.message or "disk is full" in result.message or "No space" in result.message
    os.unlink(small_disk / "filler")
    after = RunStore(small_disk / "home")
    run = after.get_run(result.run_id)
    assert after.count_metrics(result.run_id) > 0  # the rows written before the disk filled are kept
    if run["status"] == "failed":  # recorded where the disk allowed it
        assert "ENOSPC" in run["message"] or "No space" in run["message"] or "disk is full" in run["message"]
    else:
        assert any("could not record" in line for line in lines)


def test_full_disk_before_the_run_exits_1_with_the_cause(small_disk, monkeypatch, capsys):
    monkeypatch.setenv("LANCE_HOME", str(small_disk / "home"))
    RunStore().close()
    FillDisk(small_disk).emit(StepEnded(step=1, epoch=0, metrics={}))
    argv = ["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--method", "vanilla", "--epochs", "1",
            "--limit-train", "32", "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert any(cause in err for cause in ("No space left on device", "disk is full", "disk I/O error"))
    assert "free disk space" in err or "ENOSPC" in err
    assert "Traceback" not in err and "damaged" not in err  # a full disk is not reported as damage


def test_resume_with_fewer_epochs_than_done_is_refused_and_more_is_recorded(capsys):
    base = ["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--method", "vanilla",
            "--limit-train", "48", "--batch-size", "16", "--quiet"]
    assert main(base + ["--epochs", "1"]) == 0
    store = RunStore()
    (run,) = store.list_runs()
    # as if a 3-epoch run had been stopped after its first epoch (its checkpoint is real)
    store.update_config(run["id"], {"epochs": 3})
    store.set_status(run["id"], "interrupted", "stopped by Ctrl-C")
    assert main(["finetune", "--resume", run["id"], "--epochs", "1", "--quiet"]) == 2
    assert "has finished 1 of its 3 epochs" in capsys.readouterr().err
    assert store.get_run(run["id"])["status"] == "interrupted"  # untouched
    assert main(["finetune", "--resume", run["id"], "--epochs", "2", "--quiet"]) == 0
    after = store.get_run(run["id"])
    assert after["status"] == "completed" and after["config"]["epochs"] == 2  # the config says what ran
    assert after["summary"]["epochs_done"] == 2


def test_a_bug_is_reported_without_traceback_unless_lance_debug(monkeypatch, capsys):
    from engine.cli._errors import run_guarded

    def buggy(args):
        raise RuntimeError("something the code did not expect")

    monkeypatch.delenv("LANCE_DEBUG", raising=False)
    assert run_guarded(buggy, None, prog="lance x") == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something the code did not expect" in err and "LANCE_DEBUG=1" in err
    monkeypatch.setenv("LANCE_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_guarded(buggy, None)


def _sigint_inside_a_finalizer() -> None:
    """Send SIGINT to this process while a weakref finalizer runs: Python prints 'Exception ignored in …'
    and drops the KeyboardInterrupt its handler raises there (seen in the app: Stop did nothing)."""
    class Holder:
        pass

    def finalizer():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # bytecodes for the handler to run on, inside the finalizer
            pass

    obj = Holder()
    weakref.finalize(obj, finalizer)
    del obj  # the finalizer runs here; its exception never reaches this frame


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one
def test_a_stop_signal_swallowed_by_a_finalizer_still_stops_the_run():
    store = RunStore()

    class SwallowAtStep3:
        def emit(self, event):
            if isinstance(event, StepEnded) and event.step == 3:
                _sigint_inside_a_finalizer()

    config = FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["vanilla", "asi"], epochs=3,
                            batch_size=32, limit_train=256, limit_val=64)
    results = run_finetune(config, store=store, sinks=[SwallowAtStep3()])
    assert [r.status for r in results] == ["interrupted"]  # stopped; the next method never started
    run = store.get_run(results[0].run_id)
    assert run["status"] == "interrupted" and "SIGINT" in run["message"]
    assert store.last_step(results[0].run_id) == 3  # stopped at the next step boundary, rows kept
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_raise_if_interrupted_is_quiet_without_a_signal():
    with interrupt_on_signals():
        raise_if_interrupted()  # nothing pending: no exception
        with pytest.raises(RunInterrupted, match="SIGINT"):
            _sigint_inside_a_finalizer()
            raise_if_interrupted()
        raise_if_interrupted()  # taken once: quiet again
