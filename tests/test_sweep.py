"""``lance sweep`` on a real local Ray cluster (one per module), on the embedded default (small-cnn, digits).

Every trial is a real fine-tuning run in the real SQLite store; the configurations' mean ± std and the
Pareto front are checked against figures recomputed here from the runs' own metric rows. The resume test
kills a sweep's driver process (SIGKILL) mid-sweep and checks that resuming reruns only what did not finish.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import ray

from engine.cli import main
from engine.store import RunStore
from engine.store.sweeps import SweepStore, trial_job_id
from engine.sweep import (
    SweepError,
    SweepSpec,
    pareto_front,
    run_sweep,
    start_ray,
    sweep_results,
)

BASE = {"layers": 2, "epochs": 1, "limit_train": 192, "limit_val": 96, "batch_size": 32}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the whole module; the decoded-data cache shared by its trials."""
    os.environ["LANCE_CACHE_DIR"] = str(tmp_path_factory.mktemp("sweep_cache"))
    assert start_ray(workers=2, threads_per_worker=1)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    os.environ.pop("LANCE_CACHE_DIR", None)


def _row_figures(store: RunStore, run_id: str) -> tuple[float, float]:
    """(last validation accuracy, largest measured layer bytes of any step) from the run's metric rows."""
    rows = store.metrics(run_id)
    acc = [r["value"] for r in rows if r["split"] == "val" and r["key"] == "acc"][-1]
    layer = max(r["value"] for r in rows if r["split"] == "train" and r["key"] == "layer_activation_bytes")
    return acc, layer


def test_grid_of_two_methods_two_budgets_two_seeds(ray_cluster):
    store = RunStore()
    spec = SweepSpec(kind="finetune", methods=["asi", "lance"], seeds=[0, 1],
                     axes={"budget": ["12kB", "40kB"]}, base=dict(BASE))
    seen = []
    sweep_id = run_sweep(spec, store, workers=2, on_trial=seen.append)
    assert len(seen) == 8 and {o["status"] for o in seen} == {"completed"}
    results = sweep_results(sweep_id, store)
    assert results["sweep"]["status"] == "completed" and results["sweep"]["completed"] == 8

    # every trial is a normal, completed run in the store, tagged with the sweep
    trials = SweepStore(store).trials(sweep_id)
    assert len(trials) == 8
    assert {(t["method"], t["params"]["budget"], t["seed"]) for t in trials} == \
        {(m, b, s) for m in ("asi", "lance") for b in ("12kB", "40kB") for s in (0, 1)}
    for t in trials:
        run = store.get_run(t["run_id"])
        assert run["status"] == "completed" and run["kind"] == "finetune" and run["method"] == t["method"]
        assert run["job_id"] == trial_job_id(sweep_id, t["key"])
        assert run["config"]["sweep_id"] == sweep_id and run["config"]["seed"] == t["seed"]
        assert run["config"]["budget"] == {t["method"]: t["params"]["budget"]}
    assert len(store.list_runs()) == 8

    # mean ± std per configuration, recomputed from the runs' own rows
    configs = {c["label"]: c for c in results["configurations"]}
    assert sorted(configs) == ["asi budget=12kB", "asi budget=40kB", "lance budget=12kB", "lance budget=40kB"]
    recomputed = {}
    for label, c in configs.items():
        figures = [_row_figures(store, r) for r in c["run_ids"]]
        accs, layers = [f[0] for f in figures], [f[1] for f in figures]
        assert c["completed"] == 2 and sorted(c["seeds"]) == [0, 1]
        assert c["metrics"]["accuracy"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert c["metrics"]["accuracy"]["std"] == pytest.approx(statistics.stdev(accs))
        assert c["metrics"]["peak_layer_activation_bytes"]["mean"] == pytest.approx(statistics.fmean(layers))
        budget = 12_000 if "12kB" in label else 40_000
        assert max(layers) <= budget
        recomputed[c["config_key"]] = (c["method"], statistics.fmean(layers), statistics.fmean(accs))

    # the front: exactly the configurations no other of the same method dominates
    for method in ("asi", "lance"):
        mine = {k: v for k, v in recomputed.items() if v[0] == method}
        expected = {k for k, (_, x, y) in mine.items()
                    if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y)
                               for k2, (_, x2, y2) in mine.items() if k2 != k)}
        assert set(results["front"][method]) == expected and expected
        small = min(mine, key=lambda k: mine[k][1])
        assert small in results["front"][method]  # the fewest bytes is never dominated


def test_failed_trial_is_recorded_and_the_sweep_goes_on(ray_cluster, capsys, tmp_path):
    out = tmp_path / "sweep.json"
    code = main(["sweep", "--method", "asi", "--budget", "10B,20kB", "--seeds", "0", "--layers", "2",
                 "--epochs", "1", "--set", "limit_train=96", "--set", "limit_val=64", "--batch-size", "32",
                 "--workers", "2", "--json", str(out), "--csv", str(tmp_path / "sweep.csv"), "--quiet"])
    assert code == 1  # not every trial completed
    results = json.loads(out.read_text())
    by_budget = {t["params"]["budget"]: t for t in results["trials"]}
    assert by_budget["10B"]["status"] == "failed" and "least total that fits" in by_budget["10B"]["message"]
    # refused before or during its run's set-up: any run it left is failed, never running or completed
    failed_runs = RunStore().list_runs(job_id=trial_job_id(results["sweep"]["id"], by_budget["10B"]["key"]))
    assert [r["status"] for r in failed_runs] in ([], ["failed"])
    assert by_budget["20kB"]["status"] == "completed" and by_budget["20kB"]["accuracy"] is not None
    assert results["front"]["asi"] == [c["config_key"] for c in results["configurations"] if c["completed"]]
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("method,label,budget,trials,completed,failed,on_front,accuracy_mean")
    assert len(lines) == 3


def test_killed_sweep_resumes_and_skips_finished_trials(ray_cluster):
    """The driver joins the module's cluster (--address), is SIGKILLed after two trials finished; resume
    reruns only the rest (the finished trials keep their runs and were attempted once)."""
    store = RunStore()
    argv = [sys.executable, "-m", "engine", "sweep", "--method", "vanilla,asi", "--budget", "20kB",
            "--seeds", "0,1,2", "--layers", "2", "--epochs", "2", "--set", "limit_train=192", "--set",
            "limit_val=64", "--batch-size", "32", "--workers", "1", "--address", ray_cluster, "--quiet"]
    proc = subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sweeps = SweepStore(store)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            listed = sweeps.list_sweeps()
            trials = sweeps.trials(listed[0]["id"]) if listed else []
            if sum(t["status"] == "completed" for t in trials) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("two trials did not complete within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sweep_id = listed[0]["id"]
    assert sweeps.get_sweep(sweep_id)["status"] == "interrupted"  # its process is gone
    before = {t["key"]: t for t in sweeps.trials(sweep_id)}
    finished = {k for k, t in before.items() if t["status"] == "completed"}
    assert 2 <= len(finished) < 6

    SweepStore(store).claim_sweep(sweep_id)  # owned by a live process (this one): resuming it is refused
    with pytest.raises(SweepError, match="still running"):
        run_sweep(store=store, resume=sweep_id)
    SweepStore(store).set_sweep_status(sweep_id, "interrupted")
    run_sweep(store=store, resume=sweep_id, workers=2)
    after = {t["key"]: t for t in sweeps.trials(sweep_id)}
    assert all(t["status"] == "completed" for t in after.values()) and len(after) == 6
    for key in finished:
        assert after[key]["run_id"] == before[key]["run_id"] and after[key]["attempts"] == 1
    for key in set(after) - finished:
        assert after[key]["run_id"] != before[key]["run_id"]
    runs = store.list_runs()
    assert {r["id"] for r in runs if r["status"] == "completed"} == {t["run_id"] for t in after.values()}
    assert sweep_results(sweep_id, store)["sweep"]["status"] == "completed"


def test_pareto_front_keeps_only_the_undominated():
    pts = [("a", 10.0, 50.0), ("b", 20.0, 60.0), ("c", 30.0, 55.0), ("d", 5.0, 40.0), ("e", 20.0, 60.0)]
    assert pareto_front(pts) == ["d", "a", "b"]


@pytest.mark.parametrize("spec, reason", [
    (SweepSpec(methods=["sgd"]), "unknown finetune method"),
    (SweepSpec(methods=["asi"], seeds=[0, 0]), "seed twice"),
    (SweepSpec(methods=["asi"], axes={"budgt": ["1MB"]}), "not a finetune option"),
    (SweepSpec(methods=["asi"], axes={"hosvd.eps": [0.8]}), "not in --method"),
    (SweepSpec(methods=["vanilla"], axes={"vanilla.eps": [0.8]}), "does not take eps"),
    (SweepSpec(kind="continual", methods=["lance"], base={"lr": 0.1, "epoch": 2}), "--set epoch"),
])
def test_bad_sweeps_are_refused_before_any_trial(spec, reason):
    with pytest.raises(SweepError, match=reason):
        spec.validate()


def test_axes_apply_to_the_methods_that_take_them():
    spec = SweepSpec(methods=["vanilla", "hosvd", "asi", "lance"], seeds=[0, 1],
                     axes={"budget": ["1MB", "2MB"], "eps": [0.6, 0.8], "lr": [0.01]})
    counts = {}
    for t in spec.trials():
        counts[t.method] = counts.get(t.method, 0) + 1
    assert counts == {"vanilla": 2, "hosvd": 4, "asi": 4, "lance": 4}  # lance: budget, not eps
    lance = next(t for t in spec.trials() if t.method == "lance")
    config = spec.finetune_config(lance)
    assert config.budget == {"lance": "1MB"} and config.eps == {} and config.lr == 0.01
    assert len({t.key for t in spec.trials()}) == 14
    assert [t.key for t in spec.trials()] == [t.key for t in SweepSpec.from_dict(spec.to_dict()).trials()]
