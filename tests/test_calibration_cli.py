"""`lance calibrate`, `lance ranks`, `lance bench-calibration`: real runs on digits, exit statuses, JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """One real `lance calibrate` run on digits for the whole module (its own LANCE_HOME)."""
    root = tmp_path_factory.mktemp("calibrate_cli")
    out = root / "cal.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANCE_HOME", str(root / "lance_home"))
        torch.set_num_threads(1)
        rc = main(["calibrate", "--backbone", "small-cnn", "--weights", "none", "--dataset", "digits",
                   "--layers", "3", "--eps", "0.5,0.7,0.9", "--batches", "2", "--batch-size", "16",
                   "--out", str(out), "--quiet"])
        assert rc == 0
        assert len(list((root / "lance_home" / "cache" / "calibration").glob("*.json"))) == 1
    return out


def test_calibrate_writes_a_calibration(calibration_file, capsys):
    data = json.loads(calibration_file.read_text())
    assert data["eps_grid"] == [0.5, 0.7, 0.9] and data["batch_size"] == 16
    assert data["config"]["backbone"] == "small-cnn" and data["config"]["dataset"] == "digits"
    tuned = [layer for layer in data["layers"] if layer["finetuned"]]
    assert len(tuned) == 3 and len(data["layers"]) >= 4
    for layer in tuned:
        assert len(layer["perplexity"]) == len(layer["bytes"]) == len(layer["ranks"]) == 3
    for layer in data["layers"]:
        assert {m["mode"] for m in layer["modes"]} <= {"B", "C", "H", "W", "F", "L"}
        assert all(abs(m["cumulative"][-1] - 1) < 1e-6 for m in layer["modes"])


def test_ranks_prints_and_writes_json(calibration_file, tmp_path, capsys):
    """At the calibration's own batch size (16) the plan's per-ε bytes are the calibration's."""
    data = json.loads(calibration_file.read_text())
    tuned = [layer for layer in data["layers"] if layer["finetuned"]]
    least = sum(min(layer["bytes"]) for layer in tuned)
    out = tmp_path / "plan.json"
    budget = f"{(least + 2000) / 1e6}MB"
    assert main(["ranks", "--calibration", str(calibration_file), "--budget", budget, "--batch-size", "16",
                 "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["budget_bytes"] == least + 2000 and plan["batch_size"] == 16
    assert plan["plan_total_bytes"] <= plan["budget_bytes"]
    assert [c["name"] for c in plan["per_layer"]] == [layer["name"] for layer in tuned]
    for c, layer in zip(plan["per_layer"], tuned):
        j = data["eps_grid"].index(c["eps"])
        assert c["ranks"]["asi"] == c["ranks"]["lance"] == layer["ranks"][j]
        assert c["bytes"]["asi"] == layer["bytes"][j]
        assert c["perplexity"] == pytest.approx(layer["perplexity"][j])
    assert plan["plan_total_bytes"] == sum(c["bytes"]["asi"] for c in plan["per_layer"])
    printed = capsys.readouterr().out
    assert "total" in printed and str(plan["plan_total_bytes"]) in printed


def test_ranks_infeasible_budget_exits_2_with_the_least_total(calibration_file, capsys):
    data = json.loads(calibration_file.read_text())
    least = sum(min(layer["bytes"]) for layer in data["layers"] if layer["finetuned"])
    args = ["ranks", "--calibration", str(calibration_file), "--batch-size", "16", "--budget"]
    assert main([*args, str(least - 1)]) == 2
    err = capsys.readouterr().err
    assert f"least total that fits is {least} bytes" in err and "training batches of 16" in err
    assert main([*args, str(least)]) == 0


def test_ranks_exit_status_in_a_real_process(calibration_file):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "engine", "ranks", "--calibration", str(calibration_file),
                           "--budget", "1"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "infeasible" in proc.stderr and "least total that fits" in proc.stderr


@pytest.mark.parametrize("argv, needle", [
    (["ranks", "--calibration", "{cal}", "--budget", "12 parsecs"], "unknown budget unit"),
    (["ranks", "--calibration", "{missing}", "--budget", "1MB"], "lance calibrate"),
    (["calibrate", "--backbone", "small-cnn", "--dataset", "digits", "--layers", "last", "--out", "{out}"],
     "--layers must be"),
    (["calibrate", "--backbone", "small-cnn", "--dataset", "digits", "--eps", "0.5,x", "--out", "{out}"],
     "--eps must be"),
    (["calibrate", "--backbone", "small-cnn", "--dataset", "digits", "--eps", "0.5,1.5", "--out", "{out}"],
     "(0, 1]"),
    (["calibrate", "--backbone", "small-cnn", "--weights", "none", "--dataset", "cifar100", "--data-root", "{empty}",
      "--out", "{out}"], "cifar100"),
])
def test_bad_input_exits_2_with_a_message(argv, needle, calibration_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fill = {"cal": str(calibration_file), "missing": str(tmp_path / "nope.json"), "out": str(tmp_path / "o.json"),
            "empty": str(tmp_path / "empty")}
    assert main([a.format(**fill) for a in argv]) == 2
    assert needle in capsys.readouterr().err


def test_bench_solver_prints_json(capsys):
    assert main(["bench-calibration", "solver", "--layers", "64", "--eps", "12", "--repeats", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == 64 and report["eps"] == 12
    assert report["seconds_max"] > 0 and report["brute_force_6x6_matches"] is True  # times: reported, not pass marks
