"""Fine-tuning runs: argument checks, repeatability, the metrics contract, budgets, resume, NaN, evaluate.

Real pieces throughout: the small CNN backbone, scikit-learn's digits, the engine's compressed layers,
the SQLite store. Sizes are tiny so the whole file stays well under a minute on two cores.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.cli import main
from engine.memory import PEAK_EVERY_STEPS, peak_due
from engine.store import RunStore
from engine.train.config import ConfigError, FinetuneConfig, load_ranks_file, per_method, validate
from engine.train.events import StepEnded
from engine.train.session import run_finetune
from engine.train.sinks import RecordingSink

TINY = dict(backbone="small-cnn", dataset="digits", layers=2, epochs=1, batch_size=32, limit_train=96,
            limit_val=64, seed=3)
TIMING_KEYS = {"step_ms", "epoch_ms", "peak_memory_bytes"}  # measured by the allocator: a few bytes of noise


@pytest.fixture(autouse=True)
def _shared_decode_cache(tmp_path_factory, monkeypatch):
    """Decoded digits are cached once per session (the run store stays per test)."""
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lance_cache"))


def tiny(**over) -> FinetuneConfig:
    args = {**TINY, **over}
    args.setdefault("methods", ["vanilla"])
    return FinetuneConfig(**args)


def rows_without_timing(store, run_id):
    return [(r["step"], r["epoch"], r["split"], r["key"], r["value"])
            for r in store.metrics(run_id) if r["key"] not in TIMING_KEYS]


# ---------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("argv, reason", [
    (["--method", "sgd"], "unknown method"),
    (["--method", "vanilla,vanilla"], "twice"),
    (["--backbone", "resnet9000"], "unknown backbone"),
    (["--dataset", "mnist-color"], "unknown dataset"),
    (["--dataset", "imagefolder:/nonexistent/folder"], "/nonexistent/folder"),
    (["--method", "hosvd", "--eps", "1.5"], "(0, 1]"),
    (["--method", "hosvd", "--eps", "0"], "(0, 1]"),
    (["--method", "lance", "--eps", "abc"], "must be a number"),
    (["--method", "asi", "--budget", "lots"], "cannot read the budget"),
    (["--method", "vanilla", "--budget", "1MB"], "applies to"),
    (["--method", "asi,hosvd", "--eps", "asi=0.5"], "does not apply to 'asi'"),
    (["--method", "asi", "--ranks", "/nonexistent/ranks.json"], "does not exist"),
    (["--layers", "0"], "--layers"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--device", "tpu"], "--device"),
    (["--layers", "99"], "only 4 compressible layers"),
])
def test_bad_arguments_are_refused_before_any_run(argv, reason, capsys):
    base = {"--backbone": "small-cnn", "--dataset": "digits", "--method": "vanilla"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    code = main(["finetune", *[t for kv in base.items() for t in kv], "--quiet"])
    assert code == 2
    assert reason in capsys.readouterr().err
    assert RunStore().list_runs() == []


def test_per_method_values():
    methods = ["vanilla", "hosvd", "lance"]
    assert per_method("0.8", methods, ("hosvd", "lance"), "--eps") == {"hosvd": "0.8", "lance": "0.8"}
    assert per_method("hosvd=0.9, lance=0.6", methods, ("hosvd", "lance"), "--eps") == {"hosvd": "0.9", "lance": "0.6"}
    with pytest.raises(ConfigError, match="not in --method"):
        per_method("asi=1MB", methods, ("asi", "lance"), "--budget")
    with pytest.raises(ConfigError, match="none of which runs"):
        per_method("1MB", ["vanilla"], ("asi", "lance"), "--budget")


def test_ranks_file_formats(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"layers": [{"name": "fc", "ranks": [4, 8]}], "total_bytes": 1}))
    with pytest.raises(ConfigError, match="older `lance ranks`"):  # a choice made for the calibration's batch
        load_ranks_file(a)
    plan = {"format": "lance-plan", "version": 1, "backbone": "small-cnn", "dataset": "digits", "layers": ["fc"],
            "batch_size": 8, "plan_total_bytes": 1, "per_layer": [
                {"name": "fc", "eps": 0.5, "input_shape": [8, 16], "ranks": {"asi": [4, 8], "lance": [4, 8]},
                 "bytes": {"asi": 1, "lance": 1}, "full_bytes": 512}]}
    a.write_text(json.dumps(plan))
    assert load_ranks_file(a) == {"fc": (4, 8)}
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"conv": [1, 2, 3, 4]}))
    assert load_ranks_file(b) == {"conv": (1, 2, 3, 4)}
    b.write_text(json.dumps({"conv": [0, 2]}))
    with pytest.raises(ConfigError, match="ranks >= 1"):
        load_ranks_file(b)


# ---------------------------------------------------------------------------- runs
def test_same_seed_same_config_same_metrics():
    store = RunStore()
    first = run_finetune(tiny(methods=["vanilla", "asi"]), store=store)
    second = run_finetune(tiny(methods=["vanilla", "asi"]), store=store)
    assert [r.status for r in first + second] == ["completed"] * 4
    for a, b in zip(first, second):
        rows_a, rows_b = rows_without_timing(store, a.run_id), rows_without_timing(store, b.run_id)
        assert len(rows_a) > 20
        assert rows_a == rows_b
    # methods in one command see the same data in the same order from the same weights: the forward
    # pass is exact for every method, so the very first loss agrees
    first_loss = [store.metrics(r.run_id, key="loss", split="train")[0]["value"] for r in first]
    assert first_loss[0] == pytest.approx(first_loss[1], rel=1e-6)
    # a different seed gives a different run
    other = run_finetune(tiny(methods=["vanilla"], seed=4), store=store)[0]
    assert rows_without_timing(store, other.run_id) != rows_without_timing(store, first[0].run_id)


def test_metric_rows_summary_config_and_checkpoint(tmp_path):
    store = RunStore()
    recorder = RecordingSink()
    results = run_finetune(tiny(methods=["vanilla", "hosvd", "asi", "lance", "gradient_filter"], epochs=2),
                           store=store, sinks=[recorder])
    by_method = {r.method: r for r in results}
    assert all(r.status == "completed" for r in results)
    steps_per_epoch = math.ceil(96 / 32)
    for r in results:
        keys = set(store.metric_keys(r.run_id))
        assert {"loss", "acc", "layer_activation_bytes", "region_activation_bytes",
                "analytic_activation_bytes", "step_ms", "flops", "lr", "epoch_ms"} <= keys
        losses = store.metrics(r.run_id, key="loss", split="train")
        assert [row["step"] for row in losses] == [1, 2, 3, 4, 5, 6]  # per-step rows
        epochs = store.metrics(r.run_id, split="train_epoch")  # the epoch's mean train loss/acc at its last step
        assert [(row["step"], row["key"]) for row in epochs] == [(3, "loss"), (3, "acc"), (3, "epoch_ms"),
                                                                  (6, "loss"), (6, "acc"), (6, "epoch_ms")]
        assert r.summary["loss"] == epochs[3]["value"] and r.summary["train_acc"] == epochs[4]["value"]
        assert r.summary["epochs_done"] == 2 and r.summary["steps"] == 6
        val = store.metrics(r.run_id, key="acc", split="val")
        assert [row["epoch"] for row in val] == [0, 1]
        assert r.summary["val_acc"] == pytest.approx(val[-1]["value"])
        assert 0 <= r.summary["val_acc"] <= 100
        run = store.get_run(r.run_id)
        assert run["status"] == "completed" and run["summary"]["val_acc"] == r.summary["val_acc"]
        cfg = json.loads((store.run_dir(r.run_id) / "config.json").read_text())
        assert cfg["seed"] == 3 and cfg["method"] == r.method and cfg["device"] == "cpu"
        assert cfg["provenance"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
            cfg["provenance"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
        assert "commit" in cfg["provenance"]["git"]
        assert cfg["layer_names"] == ["block3.conv", "classifier"] and cfg["input"] == "features"
        assert store.checkpoint_path(r.run_id).is_file()
        assert (store.run_dir(r.run_id) / "metrics.csv").is_file()
    for low_rank in ("hosvd", "asi", "lance"):
        keys = store.metric_keys(by_method[low_rank].run_id)
        assert "rank/block3.conv/1" in keys and "captured_energy/block3.conv" in keys, (low_rank, sorted(keys))
        assert set(by_method[low_rank].summary["ranks"]) == {"block3.conv", "classifier"}
    # measured bytes: every compressed method keeps less than vanilla for its layers
    vanilla = by_method["vanilla"].summary
    assert vanilla["layer_activation_bytes"] == vanilla["analytic_activation_bytes"]
    for method in ("gradient_filter", "hosvd", "asi", "lance"):
        s = by_method[method].summary
        assert 0 < s["layer_activation_bytes"] < vanilla["layer_activation_bytes"]
        assert s["region_activation_bytes"] < vanilla["region_activation_bytes"]
        assert s["layer_activation_bytes"] <= s["region_activation_bytes"]
    # the events the loop emitted are the rows the store holds
    steps = [e for e in recorder.events if isinstance(e, StepEnded)]
    assert len(steps) == 5 * 2 * steps_per_epoch


def test_budget_sets_asi_ranks_and_bytes_stay_within_it():
    store = RunStore()
    result = run_finetune(tiny(methods=["asi"], budget={"asi": "12kB"}, batch_size=32), store=store)[0]
    assert result.status == "completed"
    info = store.get_run(result.run_id)["config"]["method_info"]
    assert info["budget_bytes"] == 12_000 and info["plan_total_bytes"] <= 12_000
    full_batch_bytes = [r["value"] for r in store.metrics(result.run_id, key="layer_activation_bytes")]
    assert max(full_batch_bytes) <= 12_000
    assert max(full_batch_bytes) == info["plan_total_bytes"]


def test_infeasible_budget_says_the_least_that_fits(capsys):
    code = main(["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--method", "asi", "--layers", "2",
                 "--budget", "10B", "--epochs", "1", "--limit-train", "64", "--limit-val", "32", "--quiet"])
    assert code == 2
    assert "least total that fits" in capsys.readouterr().err


def test_resume_continues_exactly_where_an_interrupted_run_stopped():
    """Interrupt after epoch 1 of 2, resume: epoch 2 equals the uninterrupted run's epoch 2 (ASI's warm
    factors, optimizer, schedule and data order all come back from the checkpoint)."""
    store = RunStore()
    straight = run_finetune(tiny(methods=["asi"], epochs=2), store=store)[0]

    class StopAtSecondEpoch:
        def emit(self, event):
            if isinstance(event, StepEnded) and event.epoch == 1:
                raise KeyboardInterrupt("stopped by test")

    stopped = run_finetune(tiny(methods=["asi"], epochs=2), store=store, sinks=[StopAtSecondEpoch()])[0]
    assert stopped.status == "interrupted"
    run = store.get_run(stopped.run_id)
    assert run["status"] == "interrupted" and "--resume" in run["message"]
    code = main(["finetune", "--resume", stopped.run_id[:-1], "--quiet"])
    assert code == 0
    assert store.get_run(stopped.run_id)["status"] == "completed"
    a = [(r["step"], r["key"], r["value"]) for r in store.metrics(straight.run_id)
         if r["key"] not in TIMING_KEYS and r["epoch"] == 1]
    b = [(r["step"], r["key"], r["value"]) for r in store.metrics(stopped.run_id)
         if r["key"] not in TIMING_KEYS and r["epoch"] == 1]
    assert len(a) > 10
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, key, va), (_, _, vb) in zip(a, b):
        assert va == pytest.approx(vb, rel=1e-5, abs=1e-6), key
    # nothing left to resume
    assert main(["finetune", "--resume", stopped.run_id, "--quiet"]) == 2


def test_nan_loss_fails_the_run_with_step_and_advice():
    store = RunStore()
    result = run_finetune(tiny(methods=["vanilla"], lr=1e30, grad_clip=0.0, epochs=3), store=store)[0]
    assert result.status == "failed"
    run = store.get_run(result.run_id)
    assert run["status"] == "failed"
    assert "at step" in run["message"] and "--lr" in run["message"]
    bad_step = int(run["message"].split("at step ")[1].split()[0])
    assert bad_step >= 2
    assert store.last_step(result.run_id) == bad_step - 1  # every finished step kept


def test_evaluate_matches_the_runs_own_validation_accuracy(tmp_path, capsys):
    store = RunStore()
    result = run_finetune(tiny(methods=["lance"], limit_val=None), store=store)[0]
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--run", result.run_id, "--dataset", "digits", "--split", "val",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["run_id"] == result.run_id and data["samples"] == 179
    assert data["accuracy"] == pytest.approx(result.summary["val_acc"], abs=1e-9)
    assert main(["evaluate", "--run", result.run_id, "--dataset", "digits", "--split", "test"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_on_an_image_folder_with_the_same_classes(tmp_path, capsys):
    from PIL import Image

    from engine.data import get_dataset

    store = RunStore()
    result = run_finetune(tiny(methods=["vanilla"]), store=store)[0]
    digits = get_dataset("digits", split="test")
    root = tmp_path / "folder"
    assert len(set(int(digits[i][1]) for i in range(40))) == 10  # every class has an image
    for i in range(40):
        x, y = digits[i]
        img = ((x * 0.5 + 0.5).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        for split in ("train", "test"):
            d = root / split / digits.classes[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "e.json"
    code = main(["evaluate", "--run", result.run_id, "--dataset", f"imagefolder:{root}", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["samples"] == 40 and 0 <= data["accuracy"] <= 100
    # three classes only: refused with the reason
    small = tmp_path / "small"
    for c in ("0", "1", "2"):
        for split in ("train", "test"):
            (small / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(small / split / c / "a.png")
    code = main(["evaluate", "--run", result.run_id, "--dataset", f"imagefolder:{small}"])
    assert code == 2
    assert "classes" in capsys.readouterr().err


def test_json_summary_of_several_methods(tmp_path):
    out = tmp_path / "s.json"
    code = main(["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--method", "vanilla,hosvd",
                 "--layers", "2", "--eps", "0.9", "--epochs", "1", "--batch-size", "32", "--limit-train", "64",
                 "--limit-val", "32", "--json", str(out), "--quiet", "--job-id", "job-7"])
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["vanilla", "hosvd"]
    for r in runs:
        for key in ("run_id", "val_acc", "layer_activation_bytes", "region_activation_bytes",
                    "analytic_activation_bytes", "step_ms", "flops"):
            assert r[key] is not None, key
    store = RunStore()
    assert [r["id"] for r in store.list_runs(job_id="job-7")] == [r["run_id"] for r in runs]
    assert store.get_run(runs[1]["run_id"])["config"]["method_options"]["eps"] == 0.9
    assert runs[1]["layer_activation_bytes"] < runs[0]["layer_activation_bytes"]


def test_validate_accepts_the_defaults():
    cfg = validate(FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["vanilla", "hosvd", "lance"]))
    assert cfg.eps_for("hosvd") == 0.8 and cfg.eps_for("lance") == 0.95
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip, cfg.batch_size) == (0.05, 0.0, 1e-4, 2.0, 128)


def test_feature_cache_trains_like_whole_images():
    store = RunStore()
    cached = run_finetune(tiny(methods=["asi"]), store=store)[0]
    whole = run_finetune(tiny(methods=["asi"], feature_cache=False), store=store)[0]
    assert store.get_run(cached.run_id)["config"]["input"] == "features"
    assert store.get_run(whole.run_id)["config"]["input"] == "images"
    for key in ("loss", "layer_activation_bytes", "analytic_activation_bytes"):
        a = [r["value"] for r in store.metrics(cached.run_id, key=key, split="train")]
        b = [r["value"] for r in store.metrics(whole.run_id, key=key, split="train")]
        assert a == pytest.approx(b, rel=1e-4), key
    assert cached.summary["val_acc"] == pytest.approx(whole.summary["val_acc"], abs=1e-9)


def test_packing_is_exact_in_a_run_and_the_probe_measures_peak_memory():
    """Same seed, packing on (default) and off (--no-pack): the same losses; packed region bytes smaller;
    the sampled steps have a measured peak; the first step lists what the region saves, by op."""
    store = RunStore()
    (packed,) = run_finetune(tiny(methods=["asi"], epochs=4), store=store)  # 12 steps: two peak samples
    (plain,) = run_finetune(tiny(methods=["asi"], epochs=4, pack=False), store=store)
    loss = {r.run_id: [m["value"] for m in store.metrics(r.run_id) if m["key"] == "loss" and m["split"] == "train"
                       and m["epoch"] is not None] for r in (packed, plain)}
    assert len(loss[packed.run_id]) > 2
    assert loss[packed.run_id] == loss[plain.run_id]  # bit for bit
    assert packed.summary["region_activation_bytes"] < plain.summary["region_activation_bytes"]
    assert packed.summary["layer_activation_bytes"] == plain.summary["layer_activation_bytes"]
    peak_rows = [m for m in store.metrics(packed.run_id) if m["key"] == "peak_memory_bytes"]
    peaks = [m["value"] for m in peak_rows]
    steps = [m for m in store.metrics(packed.run_id) if m["key"] == "region_activation_bytes"]
    step_numbers = sorted({m["step"] for m in steps})  # 1-based; the CPU peak is sampled (peak_due)
    assert sorted({m["step"] for m in peak_rows}) == [s for s in step_numbers if peak_due(s - 1, "cpu")]
    assert len(step_numbers) > PEAK_EVERY_STEPS and min(peaks) > 0
    assert packed.summary["peak_memory_bytes"] == max(peaks)
    by_op = packed.summary["saved_by_op"]
    assert "NativeBatchNormBackward0" not in by_op and "_MaskedGradBackward" in by_op
    assert "NativeBatchNormBackward0" in plain.summary["saved_by_op"]
    assert sum(by_op.values()) == steps[0]["value"]


def test_cli_no_pack_flag_reaches_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANCE_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.json"  # outside the store: --json refuses paths inside it
    code = main(["finetune", "--backbone", "small-cnn", "--dataset", "digits", "--layers", "2", "--epochs", "1",
                 "--batch-size", "32", "--limit-train", "64", "--limit-val", "32", "--no-pack", "--quiet",
                 "--json", str(out)])
    assert code == 0
    run = json.loads(out.read_text())["runs"][0]
    assert RunStore().get_run(run["run_id"])["config"]["pack"] is False
