"""Job phases: the engine's ``on_phase`` reports in a real small run, the store's ``job_phases`` table,
the CLI wiring (``--job-id`` -> store, none -> a short stderr line), and the throttle."""
from __future__ import annotations

import itertools

import pytest
from PIL import Image

from engine.cli import main
from engine.data import get_dataset
from engine.phases import PHASES, StderrPhaseLine, Throttled, report, reporting
from engine.store import RunStore, StoreError
from engine.train.config import FinetuneConfig
from engine.train.session import run_finetune

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def digit_folder(tmp_path, monkeypatch):
    """60 digits as PNG files in an image folder (train and test), so a run has files to decode."""
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path / "cache"))  # nothing decoded before this test
    digits = get_dataset("digits", split="test")
    root = tmp_path / "folder"
    for i in range(60):
        x, y = digits[i]
        img = ((x * 0.5 + 0.5).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        for split in ("train", "test"):
            d = root / split / digits.classes[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def _segments(calls):
    """[(phase, [(done, total), ...]), ...]: consecutive calls of one phase grouped; a pass that starts
    again at 0 after a finished one (the next split's images) is a segment of its own."""
    out = []
    for phase, group in itertools.groupby(calls, key=lambda c: c[0]):
        for _, done, total in group:
            last = out[-1][1][-1] if out and out[-1][0] == phase else None
            if last is None or (done == 0 and last[0] is not None and last[0] == last[1] and last[0] > 0):
                out.append((phase, []))
            out[-1][1].append((done, total))
    return out


def test_a_real_run_reports_its_phases_in_order_with_consistent_counts(digit_folder):
    calls = []
    config = FinetuneConfig(backbone="small-cnn", dataset=f"imagefolder:{digit_folder}", methods=["vanilla", "lance"],
                            layers=2, epochs=2, batch_size=16, limit_train=40, limit_val=20, seed=1,
                            calibration_batches=2)
    store = RunStore()
    with reporting(lambda phase, done, total: calls.append((phase, done, total))):
        results = run_finetune(config, store=store)
    assert [r.status for r in results] == ["completed", "completed"]
    described = store.get_run(results[0].run_id)["config"]
    assert described["input"] == "features" and described["train_samples"] == 40
    segments = _segments(calls)
    order = [phase for phase, _ in segments]
    # the files are decoded first (train + test lists), then the frozen prefix runs over both splits
    assert order[0] == "decoding"
    assert [counts[-1][1] for phase, counts in segments if phase == "caching"] == [40, described["val_samples"]]
    first_training = order.index("training")
    assert "caching" in order[:first_training]
    assert order.index("caching") > order.index("decoding")
    assert order.index("calibrating") > first_training  # LANCE calibrates before its own training, after vanilla
    assert order[-1] == "evaluating"
    assert set(order) <= set(PHASES)
    steps_per_epoch = -(-40 // 16)
    for phase, counts in segments:
        dones = [d for d, _ in counts]
        assert dones == sorted(dones), (phase, counts)  # progress never goes back within a phase
        for done, total in counts:
            assert total is None or 0 <= done <= total, (phase, done, total)
        if phase in ("decoding", "caching", "calibrating"):
            assert counts[0][0] == 0 and counts[-1][0] == counts[-1][1], (phase, counts)
        if phase == "caching":
            assert counts[-1][1] in (40, described["val_samples"])  # one pass per split
        if phase == "calibrating":
            assert counts[-1] == (2, 2)
    training = [counts for phase, counts in segments if phase == "training"]
    total = 2 * steps_per_epoch  # two methods x two epochs, each epoch's validation in between
    epoch_0 = [(step, total) for step in range(0, steps_per_epoch + 1)]
    epoch_1 = [(step, total) for step in range(steps_per_epoch + 1, total + 1)]
    assert training == [epoch_0, epoch_1, epoch_0, epoch_1]
    evaluating = [counts for phase, counts in segments if phase == "evaluating"]
    assert evaluating == [[(1, 2)], [(2, 2)], [(1, 2)], [(2, 2)]]

    # a second run of the same setup decodes nothing (the decoded arrays are on disk); features this small
    # are kept in memory only, so the prefix runs again
    calls.clear()
    with reporting(lambda phase, done, total: calls.append((phase, done, total))):
        run_finetune(FinetuneConfig(**{**config.__dict__, "methods": ["vanilla"]}), store=RunStore())
    assert [phase for phase, _ in _segments(calls)] == ["caching", "caching", "training", "evaluating",
                                                         "training", "evaluating"]


def test_store_phase_rows_replace_each_other_and_refuse_bad_values():
    store = RunStore()
    assert store.phase("job-a") is None
    store.set_phase("job-a", "caching", 10, 400)
    row = store.phase("job-a")
    assert (row["phase"], row["done"], row["total"]) == ("caching", 10, 400)
    first_time = row["updated_at"]
    store.set_phase("job-a", "training", 3, 90)
    store.set_phase("job-b", "decoding")
    row = store.phase("job-a")
    assert (row["phase"], row["done"], row["total"]) == ("training", 3, 90) and row["updated_at"] >= first_time
    assert store.phase("job-b")["done"] is None and store.phase("job-b")["total"] is None
    assert RunStore(store.root).phase("job-a")["phase"] == "training"  # another connection reads it
    with pytest.raises(ValueError, match="unknown phase 'sleeping'"):
        store.set_phase("job-a", "sleeping")
    with pytest.raises(StoreError, match="outside 0..90"):
        store.set_phase("job-a", "training", 91, 90)
    assert store.phase("job-a")["done"] == 3  # a refused call changes nothing


def test_cli_with_a_job_id_writes_the_phases_to_the_store(digit_folder, capsys):
    code = main(["finetune", "--backbone", "small-cnn", "--dataset", f"imagefolder:{digit_folder}", "--method",
                 "vanilla", "--layers", "2", "--epochs", "1", "--batch-size", "16", "--limit-train", "32",
                 "--limit-val", "16", "--quiet", "--job-id", "job-ph"])
    assert code == 0, capsys.readouterr().err
    row = RunStore().phase("job-ph")
    assert row["phase"] == "done" and row["done"] is None
    assert "[caching]" not in capsys.readouterr().err  # with a job id the phases go to the store only


def test_cli_without_a_job_id_prints_a_short_phase_line(digit_folder, capsys):
    code = main(["finetune", "--backbone", "small-cnn", "--dataset", f"imagefolder:{digit_folder}", "--method",
                 "vanilla", "--layers", "2", "--epochs", "2", "--batch-size", "8", "--limit-train", "40",
                 "--limit-val", "16"])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[") and "] " in ln + " "
             and ln.split("]")[0][1:] in PHASES]
    assert lines[0].startswith("[decoding] 0/")
    assert "[caching] 0/40" in lines and "[caching] 40/40" in lines
    assert sum(ln.startswith("[training]") for ln in lines) == 1  # announced once, the bar shows the steps
    assert len(lines) < 20  # not one line per image or step
    assert RunStore().phase("anything") is None


def test_throttle_passes_new_phases_and_the_last_item_only():
    now = [0.0]
    seen = []
    throttled = Throttled(lambda p, d, t: seen.append((p, d, t)), interval_s=1.0, clock=lambda: now[0])
    for i in range(10):
        throttled("caching", i, 10)
        now[0] += 0.3
    throttled("caching", 10, 10)
    throttled("training", 0, 5)
    assert seen == [("caching", 0, 10), ("caching", 4, 10), ("caching", 8, 10), ("caching", 10, 10),
                    ("training", 0, 5)]


def test_report_without_a_callback_does_nothing_and_checks_the_phase(capsys):
    report("training", 1, 2)  # nothing installed
    with pytest.raises(ValueError, match="unknown phase"):
        with reporting(lambda *a: None):
            report("napping")
    line = StderrPhaseLine(interval_s=0)
    line("caching", 1, 2)
    line("done")
    assert capsys.readouterr().err == "[caching] 1/2\n"


def test_continual_cli_with_a_job_id_records_done_at_the_end(capsys):
    small = ["continual", "--benchmark", "split-digits", "--backbone", "alexnet-cl", "--epochs", "1",
             "--limit-train", "24", "--limit-test", "30", "--basis-samples", "16", "--calibration-batches", "1",
             "--batch-size", "12", "--lr", "0.01", "--quiet", "--method", "finetune"]
    assert RunStore().phase("job-cl") is None
    assert main([*small, "--job-id", "job-cl"]) == 0, capsys.readouterr().err
    row = RunStore().phase("job-cl")
    assert row["phase"] == "done" and row["updated_at"] > 0
