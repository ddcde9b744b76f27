"""Plans train exactly: `lance ranks --batch-size` → PLAN.json → `lance finetune --ranks` / `--budget`.

Real pieces: the small CNN on scikit-learn's digits, `lance calibrate`'s pipeline, the exact knapsack,
the engine's ASI and LANCE layers, the saved-bytes meter and the SQLite store.
"""
from __future__ import annotations

import json
import math

import pytest

from engine.calibration import DEFAULT_EPS_GRID, calibrate
from engine.calibration.plan import PLAN_FORMAT, Plan, PlanError, check_plan, load_plan, solve_plan, stored_bytes
from engine.cli import main
from engine.store import RunStore
from engine.train.config import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["--backbone", "small-cnn", "--dataset", "digits", "--layers", "2", "--epochs", "1", "--limit-train", "96",
       "--limit-val", "32", "--seed", "3", "--quiet"]
BATCH = 32


@pytest.fixture(autouse=True)
def _shared_cache(tmp_path_factory, monkeypatch):
    """Decoded digits and calibrations are cached once per session (the run store stays per test)."""
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lance_cache"))


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """`lance calibrate` with its defaults (12 ε, 2 batches of 64) on the run's backbone, layers and seed."""
    root = tmp_path_factory.mktemp("plan")
    out = root / "cal.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANCE_HOME", str(root / "home"))
        mp.setenv("LANCE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lance_cache"))
        assert main(["calibrate", "--backbone", "small-cnn", "--dataset", "digits", "--layers", "2", "--seed", "3",
                     "--out", str(out), "--quiet"]) == 0
    return out


def _budget_between(calibration_file, batch_size: int) -> int:
    """A budget strictly inside the feasible range at ``batch_size`` (some layers compressed, not all cheapest)."""
    data = json.loads(calibration_file.read_text())
    tuned = [layer for layer in data["layers"] if layer["finetuned"]]
    least = most = 0
    for layer in tuned:
        shape = [batch_size, *layer["input_shape"][1:]]
        costs = [stored_bytes(shape, [min(r, d) for r, d in zip(ranks, shape)]) for ranks in layer["ranks"]]
        least, most = least + min(costs), most + max(costs)
    return (least + most) // 2


def _make_plan(calibration_file, tmp_path, batch_size=BATCH, budget=None) -> tuple[dict, int]:
    budget = budget or _budget_between(calibration_file, batch_size)
    out = tmp_path / "plan.json"
    assert main(["ranks", "--calibration", str(calibration_file), "--budget", str(budget),
                 "--batch-size", str(batch_size), "--json", str(out)]) == 0
    return json.loads(out.read_text()), budget


def _step1_layer_bytes(store, run_id) -> float:
    rows = store.metrics(run_id, key="layer_activation_bytes")
    assert rows[0]["step"] == 1
    return rows[0]["value"]


def _assert_trained_plan(store, run_id: str, plan: dict, budget: int) -> None:
    run = store.get_run(run_id)
    assert run["status"] == "completed", run["message"]
    info = run["config"]["method_info"]
    planned = {layer["name"]: layer["ranks"][run["method"]] for layer in plan["per_layer"]}
    assert info["ranks"] == planned                   # the layers were built at exactly the plan's ranks
    assert info["plan_ranks"] == planned and info["plan_total_bytes"] == plan["plan_total_bytes"]
    assert run["summary"]["plan_total_bytes"] == plan["plan_total_bytes"]
    assert _step1_layer_bytes(store, run_id) == plan["plan_total_bytes"] <= budget
    saved = json.loads((store.run_dir(run_id) / "plan.json").read_text())
    assert saved["per_layer"] == plan["per_layer"] and saved["batch_size"] == plan["batch_size"]


def test_lance_ranks_writes_a_versioned_plan_for_the_training_batch(calibration_file, tmp_path):
    plan, budget = _make_plan(calibration_file, tmp_path, batch_size=BATCH)
    cal = json.loads(calibration_file.read_text())
    assert plan["format"] == PLAN_FORMAT and plan["version"] == 1
    assert plan["backbone"] == "small-cnn" and plan["dataset"] == "digits" and plan["batch_size"] == BATCH
    assert plan["layers"] == ["block3.conv", "classifier"] == cal["finetuned_layers"]
    assert plan["budget_bytes"] == budget and plan["plan_total_bytes"] <= budget
    assert plan["calibration"]["batch_size"] == 64 and plan["calibration"]["eps_grid"] == list(DEFAULT_EPS_GRID)
    assert plan["calibration"]["path"] == str(calibration_file.resolve())
    total = 0
    for layer in plan["per_layer"]:
        assert layer["input_shape"][0] == BATCH
        assert layer["ranks"]["asi"] == layer["ranks"]["lance"]
        assert layer["bytes"]["asi"] == stored_bytes(layer["input_shape"], layer["ranks"]["asi"])
        assert layer["ranks"]["asi"][0] <= BATCH
        total += layer["bytes"]["asi"]
    assert plan["plan_total_bytes"] == total
    # the same budget at another batch size is another plan, with its own bytes
    other, _ = _make_plan(calibration_file, tmp_path, batch_size=8, budget=budget)
    assert all(layer["input_shape"][0] == 8 for layer in other["per_layer"])
    assert other["plan_total_bytes"] <= budget


def test_lance_ranks_defaults_to_the_finetune_batch_size(calibration_file, tmp_path):
    from engine.cli.calibrate import DEFAULT_TRAIN_BATCH_SIZE

    assert DEFAULT_TRAIN_BATCH_SIZE == FinetuneConfig.__dataclass_fields__["batch_size"].default == 128
    out = tmp_path / "p.json"
    assert main(["ranks", "--calibration", str(calibration_file), "--budget", "1MB", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["batch_size"] == 128


def test_ranks_plan_trains_exactly_with_asi_and_lance(calibration_file, tmp_path):
    plan, budget = _make_plan(calibration_file, tmp_path)
    store = RunStore()
    assert main(["finetune", *RUN, "--method", "asi,lance", "--batch-size", str(BATCH),
                 "--ranks", str(tmp_path / "plan.json"), "--json", str(tmp_path / "out.json")]) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["asi", "lance"]
    for entry in runs:
        _assert_trained_plan(store, entry["run_id"], plan, budget)
        assert entry["plan_total_bytes"] == plan["plan_total_bytes"]
        assert entry["layer_activation_bytes"] == plan["plan_total_bytes"]  # every step is a full batch


def test_budget_with_calibration_trains_the_plan_lance_ranks_makes(calibration_file, tmp_path):
    plan, budget = _make_plan(calibration_file, tmp_path)
    store = RunStore()
    from engine.train.session import run_finetune

    config = FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["asi", "lance"], layers=2, epochs=1,
                            batch_size=BATCH, limit_train=96, limit_val=32, seed=3,
                            budget={"asi": str(budget), "lance": str(budget)}, calibration=str(calibration_file))
    results = run_finetune(config, store=store)
    assert [r.method for r in results] == ["asi", "lance"]
    for result in results:
        _assert_trained_plan(store, result.run_id, plan, budget)
        info = store.get_run(result.run_id)["config"]["method_info"]
        assert info["plan_calibration"]["path"] == str(calibration_file.resolve())


def test_plain_budget_calibrates_once_with_lance_calibrates_defaults(calibration_file, tmp_path):
    """No calibration file: the plan is the one `lance calibrate` (defaults) + `lance ranks` give, for both."""
    plan, budget = _make_plan(calibration_file, tmp_path)
    store = RunStore()
    assert main(["finetune", *RUN, "--method", "asi,lance", "--batch-size", str(BATCH), "--budget", str(budget),
                 "--json", str(tmp_path / "out.json")]) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["asi", "lance"]
    for entry in runs:
        _assert_trained_plan(store, entry["run_id"], plan, budget)
        source = store.get_run(entry["run_id"])["config"]["method_info"]["plan_calibration"]
        assert source["batch_size"] == 64 and source["batches"] == 2 and source["eps_grid"] == list(DEFAULT_EPS_GRID)


@pytest.mark.parametrize("change, needle", [
    ({"batch_size": 64}, "batches of 64; this run uses --batch-size 32"),
    ({"backbone": "mcunet-in3"}, "backbone 'mcunet-in3'"),
    ({"layers": ["classifier"]}, "it plans layers classifier"),
])
def test_a_mismatched_plan_is_refused_with_exit_2_and_no_run(calibration_file, tmp_path, capsys, change, needle):
    plan, _ = _make_plan(calibration_file, tmp_path)
    plan.update(change)
    if "layers" in change:
        plan["per_layer"] = [layer for layer in plan["per_layer"] if layer["name"] in change["layers"]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["finetune", *RUN, "--method", "asi,lance", "--batch-size", str(BATCH), "--ranks", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not match this run" in err and needle in err and "lance ranks" in err
    assert RunStore().list_runs() == []


def test_a_mismatched_calibration_is_refused_with_exit_2_and_no_run(calibration_file, tmp_path, capsys):
    cal = json.loads(calibration_file.read_text())
    cal["config"]["backbone"] = "mobilenetv2"
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    assert main(["finetune", *RUN, "--method", "lance", "--batch-size", str(BATCH), "--budget", "1MB",
                 "--calibration", str(path)]) == 2
    assert "calibrated backbone 'mobilenetv2'" in capsys.readouterr().err
    assert RunStore().list_runs() == []


def test_an_infeasible_budget_is_refused_before_any_run_with_the_least_that_fits(calibration_file, tmp_path, capsys):
    data = json.loads(calibration_file.read_text())
    least = 0
    for layer in (layer for layer in data["layers"] if layer["finetuned"]):
        shape = [BATCH, *layer["input_shape"][1:]]
        least += min(stored_bytes(shape, [min(r, d) for r, d in zip(ranks, shape)]) for ranks in layer["ranks"])
    for extra in ([], ["--calibration", str(calibration_file)]):
        capsys.readouterr()
        assert main(["finetune", *RUN, "--method", "asi,lance", "--batch-size", str(BATCH),
                     "--budget", str(least - 1), *extra]) == 2
        err = capsys.readouterr().err
        assert f"least total that fits is {least} bytes" in err
        assert RunStore().list_runs() == []


def test_calibration_without_budget_and_bad_plan_files_are_refused(calibration_file, tmp_path, capsys):
    assert main(["finetune", *RUN, "--method", "asi", "--calibration", str(calibration_file)]) == 2
    assert "give --budget too" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"layers": [{"name": "classifier", "ranks": [2, 2]}], "total_bytes": 1}))
    assert main(["finetune", *RUN, "--method", "asi", "--ranks", str(old)]) == 2
    assert "older `lance ranks`" in capsys.readouterr().err
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": PLAN_FORMAT, "version": 99}))
    with pytest.raises(PlanError, match="version 99"):
        load_plan(future)
    assert RunStore().list_runs() == []


def test_solve_plan_round_trips_and_check_plan_names_every_difference(calibration_file, tmp_path):
    result = calibrate("small-cnn", dataset="digits", layers_k=2, seed=3)  # the cached default calibration
    plan = solve_plan(result, "1MB", 16, source="test")
    assert plan.plan_total_bytes == plan.total_bytes_for("lance") == plan.total_bytes_for("asi")
    again = load_plan(plan.save(tmp_path / "p.json"))
    assert isinstance(again, Plan) and again.to_dict() == plan.to_dict()
    check_plan(plan, backbone="small-cnn", layers=["block3.conv", "classifier"], batch_size=16, resolution=32)
    with pytest.raises(PlanError) as err:
        check_plan(plan, backbone="x", layers=["a"], batch_size=3, resolution=64)
    for needle in ("this run trains 'x'", "this run trains a", "--batch-size 3", "64 px"):
        assert needle in str(err.value)


def test_app_budget_engine_side_calibrates_like_the_cli_and_its_plan_trains(calibration_file, tmp_path):
    """lance_app.calib: `lance calibrate`'s defaults; solve_plan → save_plan → plan_finetune_args trains it."""
    from engine.cli import build_parser
    from lance_app import calib

    defaults = build_parser().parse_args(["calibrate", "--backbone", "b", "--dataset", "d", "--out", "o"])
    assert (calib.DEFAULT_CALIBRATION_BATCHES, calib.DEFAULT_CALIBRATION_BATCH_SIZE) == \
        (defaults.batches, defaults.batch_size)
    assert defaults.eps is None and tuple(calib.DEFAULT_EPS_GRID) == tuple(DEFAULT_EPS_GRID)
    data = json.loads(calibration_file.read_text())
    budget = _budget_between(calibration_file, BATCH)
    plan = calib.solve_plan(data, budget, BATCH)
    path = calib.save_plan(plan)
    assert path.parent.name == "plans" and path.is_file()
    store = RunStore()
    assert main(["finetune", *RUN, "--method", "asi,lance", *calib.plan_finetune_args(path),
                 "--json", str(tmp_path / "out.json")]) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["asi", "lance"]
    for entry in runs:
        _assert_trained_plan(store, entry["run_id"], plan.to_dict(), budget)
    assert calib.budget_finetune_args("64KiB", ["vanilla", "lance"]) == ["--budget", "64KiB"]
    assert calib.budget_finetune_args("64KiB", ["vanilla"]) == [] == calib.budget_finetune_args(" ", ["asi"])


def test_a_plan_with_uncompressed_layers_trains_exactly(calibration_file, tmp_path):
    """A budget of vanilla's bytes: the exact "uncompressed" option (perplexity 0) wins where it fits; the
    run stores the raw activation there and still measures exactly plan_total_bytes."""
    data = json.loads(calibration_file.read_text())
    vanilla = sum(BATCH * math.prod(layer["input_shape"][1:]) * 4 for layer in data["layers"] if layer["finetuned"])
    plan, budget = _make_plan(calibration_file, tmp_path, budget=vanilla)
    raw = [layer for layer in plan["per_layer"] if layer["stored"] == "raw"]
    assert raw and all(layer["ranks"]["asi"] == layer["input_shape"] and layer["eps"] is None for layer in raw)
    assert all(layer["bytes"]["asi"] == layer["full_bytes"] for layer in raw)
    store = RunStore()
    assert main(["finetune", *RUN, "--method", "asi,lance", "--batch-size", str(BATCH),
                 "--ranks", str(tmp_path / "plan.json"), "--json", str(tmp_path / "out.json")]) == 0
    for entry in json.loads((tmp_path / "out.json").read_text())["runs"]:
        _assert_trained_plan(store, entry["run_id"], plan, budget)
