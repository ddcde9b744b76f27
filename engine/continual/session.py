"""Continual-learning runs in the run store: one run per method, task-level rows, checkpoints, resume.

``run_method(store, spec, method)`` trains one method on the benchmark's task sequence and writes, after
every task, the rows ``split="task", task=t``: ``acc/<j>``, ``ACC``, ``BWT``, ``forgetting``,
``usage/<layer>``, ``peak_layer_activation_bytes``, ``peak_region_activation_bytes``, ``task_ms``
(plus ``rank/<layer>/<mode>`` for LANCE), then saves ``checkpoint.pt`` (model with protected bases and
every head, accuracy matrix, task records) so that ``resume_method(store, run_id)`` continues at the next
task. Ctrl-C marks the run ``interrupted``.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from engine.data.continual import task_splits
from engine.memory import StepMeter
from engine.models import build_multihead
from engine.train.checkpoint import CheckpointRefused, load_tensors_only
from engine.train.faults import explain_failure, interrupt_on_signals

from .learner import ContinualConfig, ContinualLearner
from .runner import SampledStepMeters, TaskRecord, peak_over, run_sequence, task_rows

CHECKPOINT_VERSION = 3  # 2: tensors and plain data only (weights_only=True); 3: engine CompressedLayer state
CHECKPOINT_FORMAT = "lance-continual"


class ContinualRunFailed(RuntimeError):
    """One method's run failed (marked ``failed`` in the store where it could be); the message says why."""

    def __init__(self, run_id: str, method: str, message: str):
        self.run_id, self.method, self.message = run_id, method, message
        super().__init__(f"[{method}] run {run_id} failed: {message}")


@dataclass
class SequenceSpec:
    """What defines a task sequence and its training (shared by every method of one comparison)."""

    benchmark: str = "split-digits"
    dataset: str | None = None
    data_root: str | None = None
    backbone: str = "alexnet-cl"
    resolution: int = 32
    limit_train: int | None = None     # training images per task (seeded subset)
    limit_test: int | None = None      # test images per task (seeded subset)
    device: str = "cpu"
    training: dict = field(default_factory=dict)  # ContinualConfig fields except method

    def config_for(self, method: str) -> ContinualConfig:
        return ContinualConfig(method=method, **self.training)

    def to_dict(self, method: str) -> dict:
        out = asdict(self)
        out["training"] = self.config_for(method).to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> tuple["SequenceSpec", str]:
        data = dict(data)
        training = dict(data.pop("training"))
        method = training.pop("method")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known, training=training), method


def _subset(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"a limit on images per task must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randperm(len(dataset), generator=gen)[:n].tolist()
    if hasattr(dataset, "subset"):
        return dataset.subset(positions)
    return torch.utils.data.Subset(dataset, positions)


def load_tasks(spec: SequenceSpec) -> list:
    """The benchmark's tasks (``engine.data.continual.task_splits``), limited to the requested sizes."""
    seed = int(spec.training.get("seed", 0))
    tasks = task_splits(spec.benchmark, dataset=spec.dataset, data_root=spec.data_root,
                        resolution=spec.resolution, seed=seed)
    for t, task in enumerate(tasks):
        task.train = _subset(task.train, spec.limit_train, seed * 7919 + t)
        task.test = _subset(task.test, spec.limit_test, seed * 7919 + 1000 + t)
    return tasks


def build_model(spec: SequenceSpec, tasks: list):
    classes = [len(task.classes) for task in tasks]
    return build_multihead(spec.backbone, classes, resolution=spec.resolution,
                           seed=int(spec.training.get("seed", 0)))


def run_summary(run_id: str, method: str, records: list[TaskRecord], config: ContinualConfig) -> dict:
    """The JSON entry of one run (accuracies in points)."""
    last = records[-1] if records else None
    return {
        "run_id": run_id,
        "method": method,
        "acc": None if last is None else last.ACC,
        "bwt": None if last is None else last.BWT,
        "forgetting": None if last is None else last.forgetting,
        "acc_matrix": [r.acc for r in records],
        "peak_layer_activation_bytes": peak_over(records, "peak_layer_activation_bytes"),
        "peak_region_activation_bytes": peak_over(records, "peak_region_activation_bytes"),
        "peak_memory_bytes": peak_over(records, "peak_memory_bytes"),
        "subspace_usage": {} if last is None else last.usage,
        "tasks_done": len(records),
        "compress_first_task": config.compress_first_task if method == "lance" else None,
        "task_ms": [r.task_ms for r in records],
        "per_task_peak_layer_activation_bytes": [r.peak_layer_activation_bytes for r in records],
        "per_task_peak_region_activation_bytes": [r.peak_region_activation_bytes for r in records],
        "per_task_peak_memory_bytes": [r.peak_memory_bytes for r in records],
        "ranks": [r.ranks for r in records],
    }


def _print_task(method: str, record: TaskRecord, stream) -> None:
    row = " ".join(f"{a:5.1f}" for a in record.acc)
    print(f"[{method}] task {record.task}: acc [{row}]  ACC {record.ACC:5.2f}  BWT {record.BWT:+6.2f}  "
          f"layer act {record.peak_layer_activation_bytes / 1e6:7.3f} MB  "
          f"region act {record.peak_region_activation_bytes / 1e6:7.3f} MB  "
          + (f"peak mem {record.peak_memory_bytes / 1e6:7.3f} MB  " if record.peak_memory_bytes is not None else "")
          + f"{record.task_ms / 1000:6.1f} s",
          file=stream, flush=True)


def _execute(store, run_id: str, spec: SequenceSpec, method: str, tasks: list, learner: ContinualLearner,
             start_task: int, records: list[TaskRecord], stream, meter_factory) -> dict:
    meter_factory = SampledStepMeters() if meter_factory is None else meter_factory  # peak sampled per run
    config = learner.config
    acc_matrix = [r.acc for r in records]
    checkpoint = store.checkpoint_path(run_id)

    def on_task_end(record: TaskRecord, lrn: ContinualLearner) -> None:
        records.append(record)
        store.log_metrics(run_id, task_rows(record))
        torch.save({"version": CHECKPOINT_VERSION, "format": CHECKPOINT_FORMAT, "model": lrn.model.state_dict(),
                    "next_task": record.task + 1,
                    "records": [r.to_dict() for r in records], "spec": spec.to_dict(method)}, checkpoint)
        store.set_summary(run_id, run_summary(run_id, method, records, config))
        if stream is not None:
            _print_task(method, record, stream)

    def on_epoch_end(task: int, epoch: int, values: dict) -> None:
        store.log_metrics(run_id, [{"step": task, "epoch": epoch, "split": "train", "task": task, "key": k,
                                    "value": v} for k, v in values.items()])

    try:
        with interrupt_on_signals():
            run_sequence(learner.model, tasks, config, device=spec.device, start_task=start_task,
                         acc_matrix=acc_matrix, on_task_end=on_task_end, on_epoch_end=on_epoch_end,
                         learner=learner, meter_factory=meter_factory)
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted",
                         f"stopped after {len(records)} of {len(tasks)} tasks; "
                         f"continue with: lance continual --resume {run_id}")
        raise
    except Exception as exc:
        message = explain_failure(exc, lr=config.lr)  # continual has no --budget: lr advice only
        try:
            store.set_status(run_id, "failed", message)
        except Exception as store_exc:  # the store itself failed (disk full, read-only): keep both causes
            message += f"; the run store could not record this failure: {store_exc}"
        raise ContinualRunFailed(run_id, method, message) from exc
    store.set_status(run_id, "completed")
    summary = run_summary(run_id, method, records, config)
    store.set_summary(run_id, summary)
    return summary


def default_meter(model):
    """A meter measuring the peak on every step; runs use a fresh :class:`SampledStepMeters` instead."""
    return StepMeter(model)


def run_method(store, spec: SequenceSpec, method: str, tasks: list | None = None, job_id: str | None = None,
               stream=sys.stdout, meter_factory: Callable | None = None) -> dict:
    """Create a run for ``method`` and train the whole sequence; returns its JSON summary."""
    tasks = load_tasks(spec) if tasks is None else tasks
    config = spec.config_for(method)
    model = build_model(spec, tasks)
    learner = ContinualLearner(model, config, device=spec.device)
    run_config = spec.to_dict(method)
    run_config["task_names"] = [getattr(t, "name", str(i)) for i, t in enumerate(tasks)]
    run_id = store.create_run(kind="continual", method=method, config=run_config, job_id=job_id)
    if stream is not None:
        print(f"[{method}] run {run_id}: {spec.benchmark} ({spec.dataset or 'default data'}), "
              f"{len(tasks)} tasks, backbone {spec.backbone}", file=stream, flush=True)
    return _execute(store, run_id, spec, method, tasks, learner, 0, [], stream, meter_factory)


def resume_method(store, run_ref: str, stream=sys.stdout, meter_factory: Callable | None = None) -> dict:
    """Continue a stored continual run at the task after its last checkpoint."""
    run = store.find_run(run_ref)
    if run["kind"] != "continual":
        raise ValueError(f"run {run['id']} is a {run['kind']} run, not a continual one; "
                         f"use lance {run['kind']} --resume")
    path = store.checkpoint_path(run["id"])
    if not path.is_file():
        raise ValueError(f"run {run['id']} has no checkpoint at {path} (it stopped before finishing its first "
                         "task); start a new run instead")

    try:
        state = load_tensors_only(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    except CheckpointRefused as exc:
        raise ValueError(str(exc)) from None
    spec, method = SequenceSpec.from_dict(state["spec"])
    records = [TaskRecord(**r) for r in state["records"]]
    tasks = load_tasks(spec)
    if state["next_task"] >= len(tasks):
        store.set_status(run["id"], "completed")
        return run_summary(run["id"], method, records, spec.config_for(method))
    learner = ContinualLearner(build_model(spec, tasks), spec.config_for(method), device=spec.device)
    learner.model.load_state_dict(state["model"])
    store.claim_run(run["id"])
    store.truncate_metrics(run["id"], after_step=int(state["next_task"]) - 1)  # rows of the unfinished task
    if stream is not None:
        print(f"[{method}] resuming run {run['id']} at task {state['next_task']} of {len(tasks)}", file=stream,
              flush=True)
    return _execute(store, run["id"], spec, method, tasks, learner, int(state["next_task"]), records, stream,
                    meter_factory)
