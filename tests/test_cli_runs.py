"""`lance runs list|show|export|delete` on a store holding real runs."""
from __future__ import annotations

import csv
import json

import pytest

from engine.cli import main
from engine.store import RunStore


def make_runs() -> tuple[str, str]:
    """Two runs written the way the trainer writes them (store API), one completed, one failed."""
    store = RunStore()
    a = store.create_run("finetune", "asi", {"backbone": "small-cnn", "dataset": "digits", "seed": 1})
    store.log_metrics(a, [{"step": s, "epoch": 0, "split": "train", "key": "loss", "value": 2.0 / s}
                          for s in range(1, 5)])
    store.log_metrics(a, [{"step": 4, "epoch": 0, "split": "val", "key": "acc", "value": 61.5}])
    store.set_summary(a, {"val_acc": 61.5, "layer_activation_bytes": 12345})
    store.set_status(a, "completed")
    b = store.create_run("finetune", "vanilla", {"backbone": "small-cnn", "dataset": "digits"}, job_id="j9")
    store.log_metrics(b, [{"step": 1, "epoch": 0, "split": "train", "key": "loss", "value": 2.3}])
    store.set_status(b, "failed", "loss became nan at step 2")
    return a, b


def test_list_shows_runs_and_filters(capsys):
    assert main(["runs", "list"]) == 0
    assert "no runs" in capsys.readouterr().out
    a, b = make_runs()
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert a in out and b in out and "61.50" in out and "12.3 kB" in out
    assert main(["runs", "list", "--status", "failed", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == [b] and listed[0]["message"].startswith("loss became nan")
    assert main(["runs", "list", "--job-id", "j9", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [b]


def test_show_by_prefix(capsys):
    a, _ = make_runs()
    assert main(["runs", "show", a[:-1]]) == 0
    out = capsys.readouterr().out
    assert a in out and "completed" in out and "val_acc" in out and "epoch 1: val acc 61.50%" in out
    assert main(["runs", "show", a, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["id"] == a and data["metric_rows"] == 5 and data["summary"]["val_acc"] == 61.5
    assert main(["runs", "show", "nope"]) == 2
    assert "lance runs list" in capsys.readouterr().err


def test_export_csv_and_json(tmp_path, capsys):
    a, b = make_runs()
    assert main(["runs", "export", a, "--out", str(tmp_path / "a.csv")]) == 0
    with (tmp_path / "a.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and rows[0]["key"] == "loss" and float(rows[1]["value"]) == pytest.approx(1.0)
    assert main(["runs", "export", a, b, "--out", str(tmp_path / "both.json")]) == 0
    data = json.loads((tmp_path / "both.json").read_text())
    assert [r["id"] for r in data["runs"]] == [a, b]
    assert len(data["runs"][0]["metrics"]) == 5 and data["runs"][1]["status"] == "failed"
    assert main(["runs", "export", a, b, "--out", str(tmp_path / "both.csv")]) == 0
    with (tmp_path / "both.csv").open() as fh:
        assert {r["run_id"] for r in csv.DictReader(fh)} == {a, b}
    assert main(["runs", "export", a, "--out", str(tmp_path / "x.txt")]) == 2
    assert "csv" in capsys.readouterr().err


def test_delete(capsys):
    a, b = make_runs()
    store = RunStore()
    assert store.run_dir(a).is_dir()
    assert main(["runs", "delete", a]) == 0
    assert [r["id"] for r in store.list_runs()] == [b]
    assert not store.run_dir(a).exists() and store.count_metrics(a) == 0
    # a run owned by a live process (this one) is refused without --force
    live = store.create_run("finetune", "lance", {})
    assert main(["runs", "delete", live]) == 2
    assert "still running" in capsys.readouterr().err
    assert main(["runs", "delete", live, "--force"]) == 0
    assert [r["id"] for r in store.list_runs()] == [b]
