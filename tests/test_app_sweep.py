"""AppTest of the Sweep page on a real sweep in the real store (trials run in-process, without Ray:
``execute_trial`` is the function every Ray task runs), and a real background sweep job started by its form."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.store import RunStore
from engine.store.sweeps import SweepStore
from engine.sweep import SweepSpec, prepare_sweep, sweep_results
from engine.sweep.trial import execute_trial
from lance_app.sweep_view import FRONT_TITLE

PAGE = Path(__file__).resolve().parents[1] / "pages" / "sweep.py"


def make_sweep(store: RunStore) -> str:
    """asi and lance at two budgets, two seeds: eight real fine-tuning runs of the embedded default."""
    spec = SweepSpec(methods=["asi", "lance"], seeds=[0, 1], axes={"budget": ["12kB", "40kB"]},
                     base={"layers": 2, "epochs": 1, "limit_train": 96, "limit_val": 64, "batch_size": 32})
    sweep_id, spec, trials = prepare_sweep(spec, store)
    for trial in trials:
        assert execute_trial(spec.to_dict(), trial.to_dict(), str(store.root), sweep_id)["status"] == "completed"
    SweepStore(store).set_sweep_status(sweep_id, "completed")
    return sweep_id


def front_spec(at: AppTest) -> dict:
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if spec["layout"]["title"]["text"] == FRONT_TITLE:
            return spec
    raise AssertionError("no front chart on the page")


def test_page_draws_the_front_and_opens_a_configurations_runs(one_thread):
    store = RunStore()
    sweep_id = make_sweep(store)
    results = sweep_results(sweep_id, store)
    at = AppTest.from_file(str(PAGE), default_timeout=60)
    at.query_params["sweep"] = sweep_id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    spec = front_spec(at)
    assert spec["layout"]["xaxis"]["type"] == "log"
    points = {t["name"]: t for t in spec["data"] if t["mode"] == "markers"}
    assert sorted(points) == ["asi", "lance"]
    for method, trace in points.items():
        configs = {c["config_key"]: c for c in results["configurations"] if c["method"] == method}
        assert sorted(trace["customdata"]) == sorted(configs)
        for key, x, y, err in zip(trace["customdata"], trace["x"], trace["y"], trace["error_y"]["array"]):
            m = configs[key]["metrics"]
            assert x == pytest.approx(m["peak_layer_activation_bytes"]["mean"])
            assert y == pytest.approx(m["accuracy"]["mean"])
            assert err == pytest.approx(m["accuracy"]["std"] or 0.0)
        assert any("budget=12kB" in h for h in trace["hovertext"])
    assert f"{sweep_id}" in at.markdown[0].value and "8/8 trials completed" in at.markdown[0].value

    chosen = next(c for c in results["configurations"] if c["label"] == "lance budget=40kB")
    at.selectbox(key="sw_config").select(chosen["config_key"]).run()
    assert not at.exception
    assert len(at.dataframe) == 3  # the chosen configuration's runs, configurations, trials
    shown = at.dataframe[0].value
    assert sorted(shown["run"]) == sorted(chosen["run_ids"]) and len(shown) == 2
    trials = at.dataframe[2].value
    assert len(trials) == 8 and set(trials["status"]) == {"completed"}


def test_empty_store_says_how_to_start():
    at = AppTest.from_file(str(PAGE), default_timeout=60).run()
    assert not at.exception
    assert any("No sweep attached" in i.value for i in at.info)


@pytest.mark.slow
def test_form_starts_a_background_sweep_job_that_records_its_sweep():
    at = AppTest.from_file(str(PAGE), default_timeout=60).run()
    at.multiselect(key="sw_methods").set_value(["asi"])
    at.text_input(key="sw_budgets").input("12kB")
    at.text_input(key="sw_seeds").input("0")
    at.number_input(key="sw_limit").set_value(64)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    from lance_app.jobs import JobRunner

    jobs = JobRunner().list(kind="sweep")
    assert len(jobs) == 1 and "--budget" in jobs[0].argv and "12kB" in jobs[0].argv
    JobRunner().wait(jobs[0].job_id, timeout_s=150)
    (sweep,) = SweepStore(RunStore()).list_sweeps(job_id=jobs[0].job_id)
    assert sweep["status"] == "completed", JobRunner().log_tail(jobs[0].job_id)
    results = sweep_results(sweep["id"])
    assert results["sweep"]["completed"] == 1 and results["configurations"][0]["label"] == "asi budget=12kB"
    at.run()
    assert not at.exception
    assert "1/1 trials completed" in at.markdown[0].value
