"""AppTest for every page: widgets, messages, and the data inside the figures they draw.

Pages run in-process on the real engine (digits + small-cnn, the embedded default) and the real run
store under the per-test LANCE_HOME; runs shown on the Fine-tune / Continual / Runs pages are
written into that store by the test itself, so the expected chart values are known exactly.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.store import RunStore
from lance_app.axes import METHOD_COLOURS

REPO = Path(__file__).resolve().parents[1]
PAGES = REPO / "pages"


def _page(name: str, timeout: float = 120) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=timeout)


def charts(at: AppTest) -> dict[str, dict]:
    """Plotly figures on the page by title text."""
    out = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec["layout"].get("title", {})
        out[title.get("text", "") if isinstance(title, dict) else str(title)] = spec
    return out


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _log(store, run, key, values, split="train", x="step", task=None):
    store.log_metrics(run, [{x: i, "epoch": 0 if x == "step" else i, "split": split, "task": task,
                             "key": key, "value": v} for i, v in enumerate(values)])


# -- frame -----------------------------------------------------------------------------------------
def test_entrypoint_navigates_every_page():
    at = AppTest.from_file(str(REPO / "lance_app" / "main.py"), default_timeout=120).run()
    no_exception(at)
    assert at.title[0].value == "Setup"
    for page, title in [("runs", "Runs"), ("finetune", "Fine-tune"), ("continual", "Continual learning")]:
        at.switch_page(f"../pages/{page}.py").run()
        no_exception(at)
        assert at.title[0].value == title


def test_startup_marks_orphaned_runs_interrupted():
    import subprocess

    store = RunStore()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = store.create_run(kind="finetune", method="vanilla", config={}, pid=dead.pid)
    at = AppTest.from_file(str(REPO / "lance_app" / "main.py"), default_timeout=120).run()
    no_exception(at)
    assert RunStore(mark_orphans=False).get_run(run)["status"] == "interrupted"


# -- setup -----------------------------------------------------------------------------------------
def test_setup_defaults_to_the_bundled_default_and_lists_layers():
    at = _page("setup").run()
    no_exception(at)
    assert at.selectbox(key="setup_backbone").value == "small-cnn-digits"
    # the backbone's registry entry: 28,821 parameters, 32 px
    assert any("0.03 M parameters · native 32 px" in c.value for c in at.caption)
    assert at.selectbox(key="setup_dataset").value.value == "digits-5to9"
    assert at.radio(key="setup_weights").value.value == "bundled"
    layers = at.dataframe[0].value
    assert len(layers) == 4 and layers["trained"].tolist() == ["yes", "yes", "yes", "yes"]
    at.slider(key="setup_layers").set_value(3).run()
    assert at.dataframe[0].value["trained"].tolist().count("yes") == 3
    here = at.dataframe[1].value
    assert here.loc[here["name"] == "digits-5to9", "available"].item() == "yes"
    missing = here[here["available"] == "missing"]
    assert len(missing) > 0 and missing["where / how to get it"].str.contains("Looked in|not found").all()
    assert "last 3 layers" in at.success[0].value


# -- spectra and budget ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated_home(tmp_path_factory):
    """One LANCE_HOME for the spectra/budget tests so the engine's calibration cache is reused."""
    return tmp_path_factory.mktemp("calib_home")


def test_spectra_page_draws_energy_heatmap_and_perplexity(calibrated_home, monkeypatch):
    monkeypatch.setenv("LANCE_HOME", str(calibrated_home))
    at = _page("spectra").run()
    no_exception(at)
    assert not at.error
    figs = charts(at)
    assert at.selectbox(key="spectra_layer").value == "block1.conv"  # the first fine-tuned layer
    energy = next(v for k, v in figs.items() if "input" in k)
    assert [t["name"] for t in energy["data"]] == ["B", "C", "H", "W"]  # a conv input's modes
    for trace in energy["data"]:  # cumulative view: rises to 1
        assert trace["y"][-1] == pytest.approx(1.0, abs=1e-6)
        assert all(b >= a - 1e-12 for a, b in zip(trace["y"], trace["y"][1:]))
    heat = figs["compression factor per layer and ε"]["data"][0]
    from engine.calibration import DEFAULT_EPS_GRID

    assert len(heat["y"]) == 4 and len(heat["x"]) == len(DEFAULT_EPS_GRID) == 12  # `lance calibrate`'s grid
    assert all(row[0] >= row[-1] for row in heat["z"])  # more energy kept -> less compression
    perp = figs["perplexity of the fine-tuned layers"]["data"]
    assert len(perp) == 4
    for trace in perp:  # the gradient error falls as ε rises (flat where one direction dominates)
        assert trace["y"][-1] <= trace["y"][0]
    assert any(trace["y"][-1] < 0.5 * trace["y"][0] for trace in perp)
    at.toggle(key="spectra_cumulative").set_value(False).run()
    energy = next(v for k, v in charts(at).items() if "input" in k)
    assert sum(energy["data"][0]["y"]) == pytest.approx(1.0, abs=1e-6)
    ranks = at.dataframe[0].value
    assert list(ranks.columns) == ["B", "C", "H", "W", "bytes"] and len(ranks) == len(DEFAULT_EPS_GRID)


def test_budget_page_exact_choice_and_readable_errors(calibrated_home, monkeypatch):
    monkeypatch.setenv("LANCE_HOME", str(calibrated_home))
    at = _page("budget").run()
    no_exception(at)
    assert not at.error
    table = at.dataframe[0].value
    assert len(table) == 4
    from engine.calibration import parse_budget

    budget = parse_budget(at.text_input(key="budget_text").value)
    assert 0 < table["bytes"].sum() <= budget
    bars = charts(at)["activation bytes per fine-tuned layer"]["data"]
    # each bar spans base -> base + y = the layer's bytes (a log axis from a stated baseline)
    assert [bars[0]["base"] + y for y in bars[0]["y"]] == [float(b) for b in table["bytes"]]
    assert [bars[1]["base"] + y for y in bars[1]["y"]] == [float(b) for b in table["vanilla bytes"]]
    at.button(key="budget_predict").click().run()
    no_exception(at)
    flops = {m.label: float(m.value.split()[0].replace(",", "")) for m in at.metric if "FLOP" in m.value}
    assert set(flops) == {"ASI at these ranks", "Vanilla"} and all(v > 0 for v in flops.values())
    assert flops["ASI at these ranks"] != flops["Vanilla"]
    at.text_input(key="budget_text").set_value("10").run()
    assert "least total that fits is" in at.error[0].value
    assert not at.exception
    at.text_input(key="budget_text").set_value("lots").run()
    assert "cannot read the budget" in at.error[0].value


# -- fine-tune -------------------------------------------------------------------------------------
def test_finetune_page_without_a_job_and_without_methods():
    at = _page("finetune").run()
    no_exception(at)
    assert "No job attached" in at.info[0].value
    at.multiselect(key="ft_methods").set_value([])
    at.button[0].click().run()  # the form's submit button
    assert at.error[0].value == "Not started. Methods: choose at least one method."
    at.multiselect(key="ft_methods").set_value(["asi"])
    at.text_input(key="ft_budget").set_value("a lot")
    at.button[0].click().run()
    assert "ASI + LANCE budget: cannot read the budget 'a lot'" in at.error[0].value
    assert "job" not in at.query_params  # nothing was started


def test_finetune_page_draws_the_rows_of_a_job_from_the_url():
    store = RunStore()
    run = store.create_run(kind="finetune", method="hosvd", config={"epochs": 1}, job_id="job-from-url")
    _log(store, run, "loss", [2.3, 1.9, 1.2])
    _log(store, run, "acc", [10.0, 30.0, 55.0])
    _log(store, run, "layer_activation_bytes", [4096, 4096, 4096])
    _log(store, run, "step_ms", [12.0, 9.0, 9.5])
    _log(store, run, "rank/fc/F", [7, 9, 8])
    _log(store, run, "captured_energy/fc", [0.8, 0.85, 0.9])
    store.log_metrics(run, [{"step": 2, "epoch": 0, "split": "val", "key": "acc", "value": 61.0}])
    store.set_status(run, "completed")
    at = _page("finetune")
    at.query_params["job"] = "job-from-url"
    at.run()
    no_exception(at)
    assert "not known on this server" in at.warning[0].value
    assert any("hosvd" in s.value and "completed" in s.value for s in at.success)
    figs = charts(at)
    assert figs["training loss"]["data"][0]["y"] == [2.3, 1.9, 1.2]
    acc = figs["accuracy (train steps, val epochs)"]["data"]
    assert acc[0]["y"] == [10.0, 30.0, 55.0] and acc[1]["y"] == [61.0] and acc[1]["x"] == [2]
    hosvd = METHOD_COLOURS["hosvd"]  # the shared scheme: the val diamond in its method's colour
    assert acc[0]["line"]["color"] == acc[1]["marker"]["color"] == hosvd and acc[1]["marker"]["symbol"] == "diamond"
    ranks = figs["ranks in use"]
    assert [t["name"] for t in ranks["data"]] == ["F"]  # the mode, in the layer's panel ("fc")
    assert ranks["data"][0]["y"] == [7, 9, 8] and ranks["layout"]["annotations"][0]["text"] == "fc"
    assert figs["captured energy of the stored subspace"]["data"][0]["y"] == [0.8, 0.85, 0.9]
    assert figs["step time"]["data"][0]["y"] == [12.0, 9.0, 9.5]


def test_two_sessions_start_real_jobs_at_once_and_each_follows_its_own():
    sessions = {}
    for method in ("vanilla", "hosvd"):  # two browser sessions = two AppTest instances
        at = _page("finetune").run()
        at.multiselect(key="ft_methods").set_value([method])
        at.number_input(key="ft_limit").set_value(128)
        at.number_input(key="ft_batch").set_value(32)
        at.button[0].click().run()
        no_exception(at)
        job = at.query_params["job"]
        sessions[method] = (at, job[0] if isinstance(job, list) else job)
    assert sessions["vanilla"][1] != sessions["hosvd"][1]
    from lance_app.jobs import JobRunner

    runner = JobRunner()
    assert runner.is_alive(sessions["vanilla"][1]) or runner.is_alive(sessions["hosvd"][1])
    for method, (at, job_id) in sessions.items():
        runner.wait(job_id, timeout_s=240)  # (exit status: known to the page's runner, checked below)
        at.run()
        no_exception(at)
        assert not at.error, [e.value for e in at.error]
        assert [s.value.split(" · ")[0] for s in at.success] == [f"**{method}**"]  # only its own run
        loss = charts(at)["training loss"]["data"][0]["y"]
        assert len(loss) == 4  # 128 images / batch 32
        run = RunStore().list_runs(job_id=job_id)[0]
        assert run["method"] == method and run["status"] == "completed"
        per_step = {}
        for r in RunStore().metrics(run["id"], key="loss", split="train"):
            per_step.setdefault(r["step"], r["value"])  # the epoch's summary row repeats the last step
        assert loss == list(per_step.values())
    hosvd_ranks = charts(sessions["hosvd"][0])["ranks in use"]["data"]
    assert hosvd_ranks and all(len(t["y"]) == 4 for t in hosvd_ranks)  # HOSVD's ranks, per step


# -- continual -------------------------------------------------------------------------------------
def test_continual_page_draws_matrix_tiles_and_usage():
    store = RunStore()
    run = store.create_run(kind="continual", method="lance", config={}, job_id="cl-job")
    rows = []
    matrix = [[95.0], [90.0, 93.0]]
    for i, row in enumerate(matrix):
        rows += [{"split": "task", "task": i, "key": f"acc/{j}", "value": v} for j, v in enumerate(row)]
        rows += [{"split": "task", "task": i, "key": "usage/conv1", "value": 0.2 * (i + 1)},
                 {"split": "task", "task": i, "key": "ACC", "value": sum(row) / len(row)},
                 {"split": "task", "task": i, "key": "BWT", "value": 0.0 if i == 0 else -5.0},
                 {"split": "task", "task": i, "key": "forgetting", "value": 0.0 if i == 0 else 5.0},
                 # the per-task peak falls as tasks finish: the run's peak is the first task's
                 {"split": "task", "task": i, "key": "peak_layer_activation_bytes",
                  "value": 62_669.0 if i == 0 else 47_309.0},
                 {"split": "task", "task": i, "key": "peak_region_activation_bytes",
                  "value": 2_048.0 if i == 0 else 3_072.0},
                 {"split": "task", "task": i, "key": "peak_memory_bytes", "value": 1_048_576.0}]
    store.log_metrics(run, rows)
    at = _page("continual")
    at.query_params["job"] = "cl-job"
    at.run()
    no_exception(at)
    assert [m.value for m in at.metric] == ["91.50", "-5.00", "5.00"]
    peak = [c.value for c in at.caption if "measured peaks" in c.value]
    assert len(peak) == 1 and peak[0].endswith("layer 61.2 KiB · region 3.0 KiB · step peak 1.0 MiB"), peak
    figs = charts(at)
    memory = {t["name"].split(" · ")[-1]: t["y"]
              for t in figs["measured memory per task: layer, region, step peak"]["data"]}
    assert memory == {"layer": [62_669.0, 47_309.0], "region": [2_048.0, 3_072.0],
                      "step peak": [1_048_576.0, 1_048_576.0]}, memory
    z = figs["accuracy matrices R[i, j] (%), all methods"]["data"][0]["z"]
    assert z == [[95.0, None], [90.0, 93.0]]
    table = at.dataframe[0].value
    assert table["ACC %"].tolist() == [91.5] and table["peak layer bytes"].tolist() == [62_669.0]
    usage = figs["subspace usage per layer"]["data"][0]
    assert usage["x"] == [0, 1] and usage["y"] == pytest.approx([0.2, 0.4])
    assert at.selectbox(key="cl_benchmark").value == "split-digits"


def test_continual_page_starts_a_real_job_with_its_training_settings():
    at = _page("continual").run()
    no_exception(at)
    at.multiselect(key="cl_methods").set_value(["lance"])
    at.number_input(key="cl_limit").set_value(40)
    at.number_input(key="cl_batch").set_value(16)
    at.number_input(key="cl_lr").set_value(0.02)
    at.number_input(key="cl_momentum").set_value(0.5)
    at.checkbox(key="cl_compress_first").uncheck()
    at.button[0].click().run()
    no_exception(at)
    job = at.query_params["job"]
    job_id = job[0] if isinstance(job, list) else job
    from lance_app.jobs import JobRunner

    runner = JobRunner()
    argv = runner.get(job_id).argv
    assert argv[argv.index("--batch-size") + 1] == "16" and argv[argv.index("--momentum") + 1] == "0.5"
    assert "--no-compress-first-task" in argv
    again = _page("continual").run()  # a reload is a new session: it finds the values last started
    no_exception(again)
    assert again.multiselect(key="cl_methods").value == ["lance"]
    assert (again.number_input(key="cl_batch").value, again.number_input(key="cl_lr").value) == (16, 0.02)
    assert again.checkbox(key="cl_compress_first").value is False
    runner.wait(job_id, timeout_s=240)
    run = RunStore().list_runs(job_id=job_id)[0]
    assert run["status"] == "completed", run
    training = RunStore().get_run(run["id"])["config"]["training"]
    assert (training["batch_size"], training["lr"], training["momentum"]) == (16, 0.02, 0.5)
    assert training["compress_first_task"] is False and training["method"] == "lance"
    # task 0 trained uncompressed: no LANCE ranks logged for it, ranks for task 1 onwards
    assert not RunStore().metrics(run["id"], key_prefix="rank/", split="task", task=0)
    assert RunStore().metrics(run["id"], key_prefix="rank/", split="task", task=1)


# -- runs ------------------------------------------------------------------------------------------
def test_runs_page_table_filter_overlay_config_and_delete():
    store = RunStore()
    a = store.create_run(kind="finetune", method="vanilla", config={"lr": 0.05, "seed": 0})
    _log(store, a, "loss", [2.0, 1.0])
    store.set_summary(a, {"val_acc": 80.0})
    store.set_status(a, "completed")
    time.sleep(0.01)
    b = store.create_run(kind="finetune", method="asi", config={"lr": 0.1, "seed": 0})
    _log(store, b, "loss", [2.5, 1.5, 0.5])
    store.set_status(b, "failed", message="loss became NaN at step 3")
    at = _page("runs").run()
    no_exception(at)
    table = at.dataframe[0].value
    assert set(table["id"]) == {a, b}
    assert table.set_index("id").loc[b, "message"] == "loss became NaN at step 3"
    at.multiselect(key="runs_method").set_value(["asi"]).run()
    assert at.dataframe[0].value["id"].tolist() == [b]
    at.multiselect(key="runs_method").set_value([]).run()
    at.multiselect(key="runs_selected").set_value([a, b]).run()
    overlay = charts(at)["loss (train)"]["data"]
    assert sorted(len(t["y"]) for t in overlay) == [2, 3]
    config = at.dataframe[1].value
    assert config.index[0] == "lr"  # the differing key first
    assert [d.proto.label for d in at.get("download_button")] == ["Download metrics (CSV)",
                                                                  "Download runs + metrics (JSON)"]
    at.multiselect(key="runs_selected").set_value([b]).run()
    at.checkbox(key="runs_confirm").check().run()
    at.button(key="runs_delete").click().run()
    no_exception(at)
    assert [r["id"] for r in RunStore().list_runs()] == [a]
    assert "Deleted 1 run(s)." in at.success[0].value
    assert os.path.isdir(RunStore().run_dir(a)) and not os.path.exists(RunStore().run_dir(b))


# -- jobs seen from another tab, failures ----------------------------------------------------------
def test_a_second_tab_lists_running_jobs_and_attaches(tmp_path):
    from lance_app.jobs import JobRunner

    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    job = JobRunner(os.environ["LANCE_HOME"], command=[sys.executable, str(script)]).start(
        "finetune", [], label="vanilla on digits")
    try:
        at = _page("finetune").run()  # a fresh session: nothing attached yet
        no_exception(at)
        assert any("1 finetune job(s) running" in m.value for m in at.markdown)
        at.button(key=f"attach_finetune_{job.job_id}").click().run()
        no_exception(at)
        attached = at.query_params["job"]
        assert (attached[0] if isinstance(attached, list) else attached) == job.job_id
        assert any(f"Job `{job.job_id}`" in m.value and "running" in m.value for m in at.markdown)
    finally:
        JobRunner(os.environ["LANCE_HOME"]).stop(job.job_id, signal.SIGKILL)


def test_a_job_that_fails_before_its_run_shows_the_cli_message():
    at = _page("finetune")
    at.session_state["lance_config"] = {"backbone": "small-cnn", "weights": "none", "dataset": "cifar100",
                                        "resolution": 0, "layers": 2, "seed": 0}
    at.run()
    at.multiselect(key="ft_methods").set_value(["vanilla"])
    at.button[0].click().run()
    job = at.query_params["job"]
    from lance_app.jobs import JobRunner

    JobRunner().wait(job[0] if isinstance(job, list) else job, timeout_s=120)
    deadline = time.monotonic() + 60  # a process whose main thread ended can take a moment to be reaped
    at.run()
    while not at.error and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    no_exception(at)
    message = at.error[0].value
    assert "without starting a run" in message and "cifar100" in message and "Traceback" not in message


@pytest.mark.shared
def test_with_shared_cifar10_jpeg_and_mcunet_in3_appear_and_load(monkeypatch):
    from conftest import CIFAR10_JPEG, MCUNET_IN3_DIR

    if not (CIFAR10_JPEG / "train").is_dir() or not (MCUNET_IN3_DIR / "mcunet-in3_imagenet.pth").is_file():
        pytest.skip("../shared (cifar10-jpeg, mcunet-in3 weights) not here")
    from lance_app.catalog import apply_shared_defaults

    env = {"LANCE_HOME": os.environ["LANCE_HOME"], "LANCE_SHARED": str(CIFAR10_JPEG.parents[1])}
    for key, value in apply_shared_defaults(env).items():  # what `lance app` does
        monkeypatch.setenv(key, value)
    at = _page("setup").run()
    at.selectbox(key="setup_backbone").set_value("mcunet-in3").run()
    assert any("ImageNet" in str(o) for o in at.radio(key="setup_weights").options)
    at.radio(key="setup_weights").set_value(next(o for o in at.radio(key="setup_weights").options
                                                 if "ImageNet" in str(o))).run()
    at.selectbox(key="setup_dataset").set_value(next(o for o in at.selectbox(key="setup_dataset").options
                                                     if "cifar10-jpeg" in str(o))).run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    layers = at.dataframe[0].value
    assert len(layers) > 40 and layers["trained"].tolist()[-2:] == ["yes", "yes"]
    assert "mcunet-in3" in at.success[0].value and "cifar10-jpeg" in at.success[0].value
