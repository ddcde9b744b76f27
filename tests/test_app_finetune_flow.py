"""AppTest of the Fine-tune page's flow on the real engine and real jobs (no stand-ins): the form as it
was left after a browser reload, resuming a really interrupted run, and the phase line of a running job.

Jobs are real `lance finetune` subprocesses started through the page (or through JobRunner, like
another session would) on the embedded default setup (digits-5to9 + small-cnn-digits), writing to the
per-test LANCE_HOME of conftest.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine.phases import PHASES
from engine.store import RunStore
from lance_app import finetune_form
from lance_app.form_store import form_path, load_form
from lance_app.jobs import JobRunner
from lance_app.live import PHASE_LABELS, steps_per_run
from lance_app.state import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[1]
PAGES = REPO / "pages"
WIDGETS = {"ft_epochs": "number_input", "ft_batch": "number_input", "ft_lr": "number_input",
           "ft_limit": "number_input", "ft_limit_val": "number_input", "ft_eps_hosvd": "number_input",
           "ft_eps_lance": "number_input", "ft_budget": "text_input", "ft_methods": "multiselect"}


def _page(name: str, timeout: float = 120) -> AppTest:
    return AppTest.from_file(str(PAGES / f"{name}.py"), default_timeout=timeout)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _job_param(at: AppTest) -> str | None:
    job = at.query_params.get("job")
    return job[0] if isinstance(job, list) else job


def _wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"not reached in {timeout_s:.0f} s: {what}")


def _widget_values(at: AppTest) -> dict:
    return {key: getattr(at, kind)(key=key).value for key, kind in WIDGETS.items()}


def _store() -> RunStore:
    return RunStore(mark_orphans=False)  # never mark anything itself: statuses below come from the jobs


def _train_steps(store: RunStore, run_id: str) -> list[int]:
    return [int(r["step"]) for r in store.metrics(run_id, key="loss", split="train")]


def _start_from_page(at: AppTest, **values) -> str:
    """Fill the form, click Start; the id of the real job the page started (now in the URL)."""
    for key, value in values.items():
        getattr(at, WIDGETS[key])(key=key).set_value(value)
    at.button(key="ft_start").click().run()
    no_exception(at)
    assert not at.error, [e.value for e in at.error]
    job_id = _job_param(at)
    assert job_id and JobRunner().get(job_id) is not None, at.query_params
    return job_id


def _only_run(store: RunStore, job_id: str, timeout_s: float = 90) -> str:
    runs = _wait_for(lambda: store.list_runs(job_id=job_id), timeout_s, f"job {job_id} creates its run")
    assert len(runs) == 1, runs
    return runs[0]["id"]


def _stop(job_id: str, timeout_s: float = 60) -> None:
    runner = JobRunner()
    runner.stop(job_id)
    runner.wait(job_id, timeout_s=timeout_s)


def _run_until_finished(at: AppTest, job_id: str, timeout_s: float = 60) -> None:
    """Rerun the page until it says the job finished: a process whose main thread ended (what a second
    JobRunner sees through /proc) can take a moment to be reaped by the page's runner, its parent."""
    def finished():
        at.run()
        no_exception(at)
        return any(f"Job `{job_id}`" in m.value and "finished" in m.value for m in at.markdown)

    _wait_for(finished, timeout_s, f"the page sees job {job_id} finished", poll_s=0.2)


@pytest.fixture(autouse=True)
def _kill_leftover_jobs():
    """A test that fails half-way leaves no training process behind (only the jobs this test started)."""
    yield
    runner = JobRunner(os.environ["LANCE_HOME"])
    for job in runner.list(active_only=True):
        runner.stop(job.job_id, signal.SIGKILL)


# -- the form as it was left -----------------------------------------------------------------------
def test_form_values_survive_a_new_session():
    at = _page("finetune").run()
    no_exception(at)
    assert _widget_values(at) == finetune_form.DEFAULTS  # nothing saved yet: the defaults
    at.number_input(key="ft_epochs").set_value(7)
    at.number_input(key="ft_limit").set_value(128)
    at.multiselect(key="ft_methods").set_value(["hosvd"])
    at.number_input(key="ft_eps_hosvd").set_value(0.65)
    at.run()
    no_exception(at)
    typed = {**finetune_form.DEFAULTS, "ft_epochs": 7, "ft_limit": 128, "ft_methods": ["hosvd"],
             "ft_eps_hosvd": 0.65}
    assert load_form("finetune") == {**typed, "plan": None}  # what the page saved

    reload = _page("finetune").run()  # a browser reload: a new Streamlit session, empty session state
    no_exception(reload)
    shown = _widget_values(reload)
    assert shown == typed, shown
    assert isinstance(shown["ft_epochs"], int) and isinstance(shown["ft_limit"], int)
    assert "No job attached" in reload.info[0].value  # only the form came back, no job was started

    path = form_path("finetune")
    for broken in ['{"ft_epochs": "lots"}', '{"ft_epochs": 2.5, "ft_methods": "hosvd", "ft_eps_hosvd": null}',
                   '{"ft_epochs": 7, "ft_limit": 12', '[7, 128]', '']:
        path.write_text(broken)
        fresh = _page("finetune").run()
        no_exception(fresh)
        assert _widget_values(fresh) == finetune_form.DEFAULTS, broken
        assert not fresh.error, (broken, [e.value for e in fresh.error])
        assert json.loads(path.read_text()) == {**finetune_form.DEFAULTS, "plan": None}  # rewritten readable
    path.write_text('{"ft_methods": ["hosvd", "no-such-method", 3], "ft_epochs": 3.0}')  # an old/edited file
    kept = _page("finetune").run()
    no_exception(kept)
    assert _widget_values(kept) == {**finetune_form.DEFAULTS, "ft_methods": ["hosvd"], "ft_epochs": 3}


# -- resume ----------------------------------------------------------------------------------------
def test_resume_button_resumes_a_really_interrupted_run():
    store = _store()
    at = _page("finetune").run()
    no_exception(at)
    job_id = _start_from_page(at, ft_methods=["vanilla"], ft_limit=256, ft_batch=32, ft_epochs=200)
    run_id = _only_run(store, job_id)
    checkpoint = store.checkpoint_path(run_id)
    _wait_for(lambda: checkpoint.is_file() and store.metrics(run_id, split="val"), 120,
              "the first epoch ends (checkpoint + a val row)")
    assert JobRunner().stop(job_id)
    JobRunner().wait(job_id, timeout_s=60)
    run = store.get_run(run_id)
    assert run["status"] == "interrupted", run
    assert f"--resume {run_id}" in run["message"]
    steps_before = _train_steps(store, run_id)
    assert steps_before and max(steps_before) >= 8  # at least one epoch: 256 images / batch 32

    _run_until_finished(at, job_id)
    assert any(run_id in w.value and "interrupted" in w.value for w in at.warning), [w.value for w in at.warning]
    label = f"Resume vanilla (run {run_id[-6:]})"
    assert [b.label for b in at.button if b.label.startswith("Resume")] == [label]
    assert not [c.value for c in at.caption if "nothing to resume from" in c.value]
    at.button(key=f"ft_resume_{run_id}").click().run()
    no_exception(at)
    new_job = _job_param(at)
    assert new_job and new_job != job_id
    argv = JobRunner().get(new_job).argv
    assert argv[argv.index("--resume") + 1] == run_id and "--method" not in argv  # the stored config
    assert argv[argv.index("--job-id") + 1] == new_job
    assert JobRunner().get(new_job).extra["resumed"] == run_id

    # `--resume` continues the SAME run (claim_run: running again, now owned by the new job), no new run
    _wait_for(lambda: store.get_run(run_id)["job_id"] == new_job, 90, "the resumed job claims the run")
    _wait_for(lambda: max(_train_steps(store, run_id), default=0) > max(steps_before), 90,
              "the resumed run trains past the step it was interrupted at")
    assert [r["id"] for r in store.list_runs(kind="finetune")] == [run_id]
    assert [r["id"] for r in store.list_runs(job_id=new_job)] == [run_id]
    steps = _train_steps(store, run_id)
    counts = {s: steps.count(s) for s in set(steps)}
    # from the checkpoint on, not from step 1 (a restart would log steps 1.. a second/third time);
    # each step once, plus the epoch's summary row at the epoch's last step
    assert max(counts.values()) <= 2 and sorted(counts) == list(range(1, max(steps) + 1)), counts
    at.run()
    no_exception(at)
    assert not [b.label for b in at.button if b.label.startswith("Resume")]  # the job runs: nothing to resume
    assert any(f"Job `{new_job}`" in m.value and "running" in m.value for m in at.markdown)
    _stop(new_job)
    assert store.get_run(run_id)["status"] == "interrupted"

    # a run stopped before its first epoch ended has no checkpoint: a caption, no button
    job_id = _start_from_page(at, ft_methods=["vanilla"], ft_limit=0, ft_batch=1, ft_epochs=1)
    early = _only_run(store, job_id)
    _wait_for(lambda: _train_steps(store, early), 90, "the first train rows")
    _stop(job_id)
    assert store.get_run(early)["status"] == "interrupted"
    assert not store.checkpoint_path(early).is_file() and not store.metrics(early, split="val")
    _run_until_finished(at, job_id)
    assert _job_param(at) == job_id
    captions = [c.value for c in at.caption if "nothing to resume from" in c.value]
    assert len(captions) == 1 and early in captions[0], captions
    assert not [b.label for b in at.button if b.label.startswith("Resume")]


# -- the phase line --------------------------------------------------------------------------------
PHASE_TEXT = re.compile(r"^Phase: (?P<label>[^·]+?) · (?P<done>[\d,]+)/(?P<total>[\d,]+) \((?P<pct>\d+)%\)"
                        r" · updated \d+ s ago$")


def _phase_bars(at: AppTest) -> list:
    return [p for p in at.progress if p.text.startswith("Phase:")]


def test_phase_line_shows_what_a_running_job_does():
    values = {**finetune_form.DEFAULTS, "ft_methods": ["vanilla"], "ft_limit": 256, "ft_batch": 32,
              "ft_epochs": 200}
    args = finetune_form.finetune_args(DEFAULT_CONFIG, finetune_form.check_form(values).values)
    job = JobRunner().start("finetune", args, label="vanilla on digits-5to9",  # as another session would
                            extra={"methods": ["vanilla"], "epochs": 200, "steps_per_run": steps_per_run(256, 32, 200)})
    at = _page("finetune")
    at.query_params["job"] = job.job_id
    store = _store()
    seen = []

    def training_line():
        at.run()
        no_exception(at)
        bars = _phase_bars(at)
        assert len(bars) == 1, [p.text for p in at.progress]  # one phase slot while the job runs
        seen.append(bars[0].text)
        match = PHASE_TEXT.match(bars[0].text)
        return (bars[0], match) if match and match["label"] == "Training" else None

    bar, match = _wait_for(training_line, 120, "the page shows the training phase", poll_s=0.2)
    labels = {PHASE_LABELS[p] for p in PHASES}
    for text in seen:  # before training: "starting" or a real phase of the engine, never anything else
        parsed = PHASE_TEXT.match(text)
        assert text == "Phase: starting (no phase reported yet)" or (parsed and parsed["label"] in labels), text
    done, total = int(match["done"].replace(",", "")), int(match["total"].replace(",", ""))
    run = store.list_runs(job_id=job.job_id)[0]
    assert run["config"]["steps_per_epoch"] == 8
    assert total == 8 * 200 and 0 <= done <= total  # global steps of the run: 256 / 32 per epoch × 200 epochs
    assert abs(bar.value - 100 * done / total) <= 1 and abs(int(match["pct"]) - 100 * done / total) <= 1
    assert store.phase(job.job_id)["phase"] in PHASES
    assert any(f"Job `{job.job_id}`" in m.value and "running" in m.value for m in at.markdown)

    _stop(job.job_id)
    _run_until_finished(at, job.job_id)
    assert not _phase_bars(at), [p.text for p in at.progress]
    assert [p.text for p in at.progress][-1].endswith("1/1 run(s) started")  # the job's own bar stays
