"""``lance continual --job-id`` reports its phases to the store in order: per task calibrating (LANCE),
training (global steps of the method's sequence), evaluating (tasks learned / tasks), then done."""
from __future__ import annotations

import itertools

import pytest

from engine.cli import main
from engine.store import RunStore

SMALL = ["continual", "--benchmark", "split-digits", "--backbone", "alexnet-cl", "--epochs", "1",
         "--limit-train", "24", "--limit-test", "30", "--basis-samples", "16", "--calibration-batches", "1",
         "--batch-size", "12", "--lr", "0.01", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_continual_job_reports_calibrating_training_evaluating_per_task_in_order(monkeypatch, capsys):
    written = []
    real_set_phase = RunStore.set_phase

    def recording_set_phase(self, job_id, phase, done=None, total=None):
        written.append((job_id, phase, done, total))
        return real_set_phase(self, job_id, phase, done, total)  # the real store write, recorded on the way

    monkeypatch.setattr(RunStore, "set_phase", recording_set_phase)
    assert main([*SMALL, "--method", "lance,finetune", "--job-id", "job-ph-cl"]) == 0, capsys.readouterr().err
    assert {job for job, *_ in written} == {"job-ph-cl"}
    calls = [(phase, done, total) for _, phase, done, total in written if phase not in ("decoding", "caching")]
    groups = [(phase, [(d, t) for _, d, t in g]) for phase, g in itertools.groupby(calls, key=lambda c: c[0])]
    order = [phase for phase, _ in groups]
    n_tasks, steps_per_task = 5, 2  # split-digits: 5 tasks; 24 images / batch 12, one epoch
    per_lance_task = ["calibrating", "training", "evaluating"]
    per_finetune_task = ["training", "evaluating"]
    assert order == per_lance_task * n_tasks + per_finetune_task * n_tasks + ["done"]
    assert RunStore().phase("job-ph-cl")["phase"] == "done"

    calibrating = [counts for phase, counts in groups if phase == "calibrating"]
    assert calibrating == [[(0, 1), (1, 1)]] * n_tasks  # one calibration batch, started and finished
    evaluating = [counts for phase, counts in groups if phase == "evaluating"]
    assert evaluating == [[(t, n_tasks)] for t in range(1, n_tasks + 1)] * 2
    training = [counts for phase, counts in groups if phase == "training"]
    total_steps = n_tasks * steps_per_task
    for method_training in (training[:n_tasks], training[n_tasks:]):  # steps restart with each method
        assert all(t == total_steps for counts in method_training for _, t in counts)
        firsts = [counts[0][0] for counts in method_training]
        assert firsts == [1 + steps_per_task * t for t in range(n_tasks)]  # a task's first step passes the throttle
        dones = [d for counts in method_training for d, _ in counts]
        assert dones == sorted(dones) and dones[-1] == total_steps
