"""engine.train.summary.summarize on many rows written the way the store sink writes them."""
from __future__ import annotations

import statistics

import pytest

from engine.store import RunStore
from engine.train.events import EpochEnded, RunEnded, StepEnded
from engine.train.sinks import StoreSink
from engine.train.summary import summarize

EPOCHS, STEPS_PER_EPOCH = 20, 100  # 2,000 steps, 20,100 rows


def step_metrics(step: int) -> dict[str, float]:
    return {"loss": 10.0 / step, "acc": float(step % 100), "step_ms": float(step % 7 + 1),
            "layer_activation_bytes": float(1000 + step % 13), "region_activation_bytes": float(2000 + step),
            "analytic_activation_bytes": 1000.0, "flops": float(step % 5), "rank/conv/0": float(1 + step % 4),
            "rank/conv/1": 3.0, "captured_energy/conv": step / (EPOCHS * STEPS_PER_EPOCH)}


def epoch_metrics(epoch: int) -> dict[str, dict[str, float]]:
    return {"train": {"loss": 1.0 / (epoch + 1), "acc": 50.0 + epoch, "epoch_ms": 100.0 + epoch},
            "val": {"loss": 2.0 / (epoch + 1), "acc": 40.0 + (epoch * 7) % 23}}


@pytest.fixture(scope="module")
def rows():
    store = RunStore()
    run_id = store.create_run(kind="finetune", method="asi", config={})
    sink = StoreSink(store, run_id)
    step = 0
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            sink.emit(StepEnded(step=step, epoch=epoch, metrics=step_metrics(step)))
        sink.emit(EpochEnded(epoch=epoch, step=step, metrics=epoch_metrics(epoch)))
    return store.metrics(run_id)


def test_epoch_rows_are_told_apart_by_their_split(rows):
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], set()).add(r["key"])
    assert by_split["train_epoch"] == {"loss", "acc", "epoch_ms"}
    assert by_split["val"] == {"loss", "acc"}
    assert "epoch_ms" not in by_split["train"]
    assert len(rows) == EPOCHS * (STEPS_PER_EPOCH * 10 + 5)


def test_summary_of_many_rows(rows):
    s = summarize(rows)
    n = EPOCHS * STEPS_PER_EPOCH
    steps = range(1, n + 1)
    val_acc = [40.0 + (e * 7) % 23 for e in range(EPOCHS)]
    assert s["steps"] == n and s["epochs_done"] == EPOCHS
    assert s["val_acc"] == val_acc[-1] and s["best_val_acc"] == max(val_acc) == 62.0
    assert s["val_loss"] == pytest.approx(2.0 / EPOCHS)
    assert s["train_acc"] == 50.0 + EPOCHS - 1           # the last epoch's mean, not a step's
    assert s["loss"] == pytest.approx(1.0 / EPOCHS)       # the last epoch's mean train loss
    assert s["epoch_ms"] == statistics.median(100.0 + e for e in range(EPOCHS))
    assert s["step_ms"] == statistics.median(float(k % 7 + 1) for k in steps)
    assert s["flops"] == statistics.median(float(k % 5) for k in steps)
    assert s["layer_activation_bytes"] == 1012.0
    assert s["region_activation_bytes"] == 2000.0 + n
    assert s["region_activation_bytes_mean"] == pytest.approx(2000.0 + (n + 1) / 2)
    assert s["ranks"] == {"conv": [1 + n % 4, 3]}
    assert s["ranks_mean"] == {"conv": [2.5, 3.0]}
    quarter = [k / n for k in steps][-(n // 4):]
    assert s["captured_energy"]["conv"] == pytest.approx(statistics.fmean(quarter))


def test_summary_before_any_epoch_ends_uses_the_last_step():
    rows = [{"step": k, "epoch": 0, "split": "train", "key": "loss", "value": 1.0 / k} for k in (1, 2, 3, 4)]
    s = summarize(rows)
    assert s["loss"] == 0.25 and s["epochs_done"] == 0 and s["steps"] == 4
    assert s["val_acc"] is None and "train_acc" not in s


def test_rows_written_before_the_train_epoch_split_count_their_epochs():
    """Older stores wrote epoch rows with split "train": their ``epoch_ms`` rows still count the epochs
    (``--resume`` of such a run reads ``epochs_done``)."""
    rows = []
    for epoch in range(3):
        rows += [{"step": 2 * epoch + k, "epoch": epoch, "split": "train", "key": "loss", "value": 1.0}
                 for k in (1, 2)]
        rows.append({"step": 2 * epoch + 2, "epoch": epoch, "split": "train", "key": "epoch_ms", "value": 9.0})
    s = summarize(rows)
    assert s["epochs_done"] == 3 and s["epoch_ms"] == 9.0 and s["steps"] == 6


def test_the_store_sink_closes_the_run_with_the_summary():
    store = RunStore()
    run_id = store.create_run(kind="finetune", method="vanilla", config={})
    sink = StoreSink(store, run_id)
    sink.emit(StepEnded(step=1, epoch=0, metrics={"loss": 2.0}))
    sink.emit(EpochEnded(epoch=0, step=1, metrics=epoch_metrics(0)))
    summary = summarize(store.metrics(run_id))
    sink.emit(RunEnded(status="completed", message=None, summary=summary))
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["summary"]["train_acc"] == 50.0 and run["summary"]["loss"] == 1.0
