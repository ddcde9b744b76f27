"""Run one task sequence with one method: train, measure, evaluate, extend the bases, log, checkpoint.

``run_sequence`` is storage-agnostic (callbacks); ``run_continual`` adds the run store (task-level
rows after every task, status, summary) and the checkpoint that lets a sequence resume at the next task.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from engine.malloc import tune_malloc
from engine.memory import StepMeter, peak_due
from engine.packing import pack_region
from engine.phases import report
from engine.train.faults import TrainingDiverged, raise_if_interrupted

from .learner import ContinualConfig, ContinualLearner
from .metrics import summarize


@dataclass
class Task:
    """One task: ``train``/``test`` yield ``(x (C, H, W) float, y int)`` with task-local labels ``0..k-1``."""

    name: str
    classes: list
    train: Dataset
    test: Dataset


@dataclass
class TaskRecord:
    """What is known after training task ``task``."""

    task: int
    acc: list[float]                   # accuracy (points) on tasks 0..task, the accuracy-matrix row
    ACC: float
    BWT: float
    forgetting: float
    usage: dict[str, float]            # rank(P) / D per protected layer
    peak_layer_activation_bytes: int
    peak_region_activation_bytes: int
    task_ms: float
    ranks: dict[str, list[int]] = field(default_factory=dict)  # LANCE factor ranks (last calibration of the task)
    peak_memory_bytes: int | None = None  # measured peak of a training step (forward + backward), max over the task
    basis: dict[str, dict] = field(default_factory=dict)       # basis extension info per layer
    train_loss: float = float("nan")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class SampledStepMeters:
    """Meter factory: ``StepMeter(model)`` per step (measured saved bytes), measuring the step's peak
    memory (``peak_memory_bytes``) on the calls :func:`engine.memory.peak_due` picks (counted per factory)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model: nn.Module) -> StepMeter:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        meter = StepMeter(model, measure_peak=peak_due(self.calls, device))
        self.calls += 1
        return meter


def default_meter_factory(model: nn.Module) -> StepMeter:
    """A fresh :class:`SampledStepMeters` per run is what :func:`run_sequence` uses by default; this one
    measures the peak on every call (tests, single steps)."""
    return StepMeter(model)


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def _eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """Test batches in one fixed, seeded shuffle: the same batches for every method and every row.

    The CL networks normalise with batch statistics (GPM's ``track_running_stats=False``), so a test
    image's logits depend on what shares its batch; an image folder lists its test set class by class,
    and unshuffled batches of a single class would be normalised to chance accuracy.
    """
    return _loader(dataset, batch_size, True, 0)


def _first_batches(dataset: Dataset, batch_size: int, n_batches: int, seed: int) -> list:
    out = []
    for i, batch in enumerate(_loader(dataset, batch_size, True, seed)):
        if i >= n_batches:
            break
        out.append(batch)
    return out


def _sample(dataset: Dataset, n: int, seed: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, idx.tolist())


def _task_seed(seed: int, task: int, salt: int) -> int:
    return int(seed) * 1_000_003 + task * 1009 + salt


def _calibrate(learner: ContinualLearner, task: int, batches: list) -> dict[str, tuple[int, ...]]:
    """``learner.calibrate`` with the "calibrating" phase (done/total: batches) where it calibrates.

    The condition is ``ContinualLearner.calibrate``'s own (it returns ``{}`` otherwise): keep the two alike.
    """
    cfg = learner.config
    if cfg.method != "lance" or (task == 0 and not cfg.compress_first_task):
        return learner.calibrate(task, batches)
    report("calibrating", 0, len(batches))
    ranks = learner.calibrate(task, batches)
    report("calibrating", len(batches), len(batches))
    return ranks


def run_sequence(
    model: nn.Module,
    tasks: Sequence[Task],
    config: ContinualConfig,
    *,
    device: str = "cpu",
    meter_factory: Callable[[nn.Module], object] | None = default_meter_factory,
    start_task: int = 0,
    acc_matrix: list[list[float]] | None = None,
    on_task_end: Callable[[TaskRecord, ContinualLearner], None] | None = None,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    learner: ContinualLearner | None = None,
) -> tuple[list[TaskRecord], ContinualLearner]:
    """Train ``tasks[start_task:]`` in order; returns the records and the learner (model + bases).

    ``meter_factory(model)`` must return a context manager with ``layer_activation_bytes`` and
    ``region_activation_bytes`` after exit, optionally ``peak_memory_bytes`` (``None``: no measurement,
    bytes reported as 0); it wraps forward and backward. ``config.pack``: the model's BatchNorm/ReLU/
    dropout/max-pool save their lossless packed forms (:mod:`engine.packing`).
    ``acc_matrix``: rows of tasks already done (resume). Every task re-seeds torch with
    ``(seed, task)`` so a resumed sequence trains exactly like an uninterrupted one.
    """
    tune_malloc()  # a step's activations reuse freed heap memory instead of page-faulting it in (engine.malloc)
    if not tasks:
        raise ValueError("no tasks to learn")
    learner = learner or ContinualLearner(model, config, device=device)
    model = learner.model
    if getattr(config, "pack", True):
        pack_region(model)
    acc_matrix = [list(r) for r in (acc_matrix or [])]
    if len(acc_matrix) != start_task:
        raise ValueError(f"resuming at task {start_task} needs {start_task} accuracy rows, got {len(acc_matrix)}")
    records: list[TaskRecord] = []
    step = 0
    total_steps = sum(config.epochs * -(-len(tasks[t].train) // config.batch_size)
                      for t in range(start_task, len(tasks)))  # the "training" phase's done/total: this call's steps
    for t in range(start_task, len(tasks)):
        task = tasks[t]
        torch.manual_seed(_task_seed(config.seed, t, 0))
        start = time.perf_counter()
        batches = _first_batches(task.train, config.calibration_batch_size, config.calibration_batches,
                                 _task_seed(config.seed, t, 1))
        ranks = _calibrate(learner, t, batches)
        params = learner.configure_task(t)
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        peak_layer = peak_region = 0
        peak_memory: int | None = None
        loss_sum = 0.0
        n_seen = 0
        for epoch in range(config.epochs):
            if epoch and config.recalibrate_every and epoch % config.recalibrate_every == 0:
                # fresh factors (still ⊥ P) fitted to the weights as they are now; momentum already held
                # lies in the old span(U_F), which is ⊥ P as well, so protection is unaffected
                batches = _first_batches(task.train, config.calibration_batch_size, config.calibration_batches,
                                         _task_seed(config.seed, t, 1000 + epoch))
                ranks = _calibrate(learner, t, batches)
            learner.train_mode(t)
            epoch_start = time.perf_counter()
            correct = total = 0
            ep_loss = 0.0
            for x, y in _loader(task.train, config.batch_size, True, _task_seed(config.seed, t, 100 + epoch)):
                raise_if_interrupted()  # a stop signal whose exception a finalizer swallowed
                x, y = x.to(learner.device), y.to(learner.device)
                optimizer.zero_grad(set_to_none=True)
                meter = meter_factory(model) if meter_factory is not None else contextlib.nullcontext()
                with meter:
                    logits = model(x, t)
                    loss = F.cross_entropy(logits, y)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):  # like fine-tuning: stop with advice, never report NULL losses
                        raise TrainingDiverged(step + 1, epoch, loss_value, lr=config.lr, method=config.method,
                                               continual=True)
                    loss.backward()
                if meter_factory is not None:
                    peak_layer = max(peak_layer, int(meter.layer_activation_bytes))
                    peak_region = max(peak_region, int(meter.region_activation_bytes))
                    step_peak = getattr(meter, "peak_memory_bytes", None)
                    if step_peak is not None:
                        peak_memory = max(peak_memory or 0, int(step_peak))
                optimizer.step()
                step += 1
                report("training", step, total_steps)
                ep_loss += loss_value * y.numel()
                correct += int((logits.argmax(1) == y).sum())
                total += int(y.numel())
            if total == 0:
                raise ValueError(f"task {t} ({task.name}) has an empty training set")
            loss_sum, n_seen = ep_loss, total
            if on_epoch_end is not None:
                on_epoch_end(t, epoch, {"loss": ep_loss / total, "acc": 100.0 * correct / total,
                                        "epoch_ms": 1000.0 * (time.perf_counter() - epoch_start)})
        basis_info = learner.extend_bases(t, _first_batches(_sample(task.train, config.basis_samples,
                                                                    _task_seed(config.seed, t, 2)),
                                                            config.batch_size, 10**9, _task_seed(config.seed, t, 3)))
        task_ms = 1000.0 * (time.perf_counter() - start)
        report("evaluating", t + 1, len(tasks))  # done/total: tasks learned so far / tasks
        row = [learner.evaluate(j, _eval_loader(tasks[j].test, config.eval_batch_size)) for j in range(t + 1)]
        acc_matrix.append(row)
        summary = summarize(acc_matrix)
        record = TaskRecord(task=t, acc=row, ACC=summary["ACC"], BWT=summary["BWT"],
                            forgetting=summary["forgetting"], usage=learner.usage(),
                            peak_layer_activation_bytes=peak_layer, peak_region_activation_bytes=peak_region,
                            task_ms=task_ms, peak_memory_bytes=peak_memory,
                            ranks={k: list(v) for k, v in ranks.items()}, basis=basis_info,
                            train_loss=loss_sum / max(n_seen, 1))
        records.append(record)
        if on_task_end is not None:
            on_task_end(record, learner)
    return records, learner


def task_rows(record: TaskRecord) -> list[dict]:
    """Run-store rows (split="task", task=t) for one task record (CONTRACTS.md)."""
    t = record.task
    base = {"step": t, "epoch": None, "split": "task", "task": t}
    rows = [dict(base, key=f"acc/{j}", value=v) for j, v in enumerate(record.acc)]
    for key in ("ACC", "BWT", "forgetting", "peak_layer_activation_bytes", "peak_region_activation_bytes", "task_ms"):
        rows.append(dict(base, key=key, value=getattr(record, key)))
    if record.peak_memory_bytes is not None:
        rows.append(dict(base, key="peak_memory_bytes", value=record.peak_memory_bytes))
    rows += [dict(base, key=f"usage/{name}", value=u) for name, u in record.usage.items()]
    for name, ranks in record.ranks.items():
        rows += [dict(base, key=f"rank/{name}/{m}", value=r) for m, r in enumerate(ranks)]
    return rows


def peak_over(records: Sequence[TaskRecord], key: str) -> int | None:
    """The run's maximum of ``key`` over its task records (``None`` for a figure no task measured)."""
    values = [int(v) for v in (getattr(r, key, None) for r in records) if v is not None]
    if not values:
        return None if key == "peak_memory_bytes" else 0
    return max(values)
