"""The fine-tuning loop: epochs of SGD steps, validation after each epoch, events out.

The loop knows no store, no terminal and no model zoo: it gets a model, batch sources, an
optimizer and a ``probe`` that measures each step (saved bytes, ranks, FLOPs), and emits events.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.phases import report
from engine.train.events import EpochEnded, RunStarted, StepEnded, emit_all
from engine.train.faults import TrainingDiverged, raise_if_interrupted

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (x: (B, ...), y: (B,) int64)


class StepProbe(Protocol):
    """Measures one training step: ``with probe.measure() as m: forward+backward``; then ``metrics(m)``.

    A measurement with an ``observe_loss(loss)`` method is handed the loss before backward.
    """

    def measure(self) -> ContextManager: ...

    def metrics(self, measurement) -> dict[str, float]: ...


class NullProbe:
    def measure(self) -> ContextManager:
        return contextlib.nullcontext()

    def metrics(self, measurement) -> dict[str, float]:
        return {}


@dataclass
class LoopState:
    """Where the loop stands: ``epoch`` is the next epoch to run, ``step`` the global steps done."""

    epoch: int = 0
    step: int = 0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (percent) of ``model`` over ``batches`` (eval mode).

    Returns ``{"loss", "acc", "samples"}``; the model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += y.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "samples": 0}
    return {"loss": loss_sum / seen, "acc": 100.0 * correct / seen, "samples": seen}


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: Callable[[int], Batches],
    *,
    epochs: int,
    steps_per_epoch: int,
    sinks: list,
    method: str = "",
    val_batches: Callable[[], Batches] | None = None,
    scheduler=None,
    grad_clip: float | None = None,
    probe: StepProbe | None = None,
    train_mode: Callable[[], None] | None = None,
    on_epoch_end: Callable[[LoopState], None] | None = None,
    state: LoopState | None = None,
    device: torch.device | str = "cpu",
    config: dict | None = None,
) -> LoopState:
    """Train ``model`` with cross-entropy from ``state.epoch`` to ``epochs``; emit events to ``sinks``.

    Args:
        train_batches: ``epoch -> iterable of (x, y)``; the same epoch must give the same order
            (that is what makes runs repeatable and resumable).
        val_batches: ``() -> iterable of (x, y)``, evaluated after every epoch.
        scheduler: stepped once per epoch (the papers' cosine schedule is per epoch).
        grad_clip: max global gradient norm (None or 0: no clipping).
        train_mode: puts the model in training mode (e.g. BN kept in eval); default ``model.train()``.
        on_epoch_end: called after each epoch's events (checkpointing).
    Reports ``("training", global step, total steps)`` after every step and ``("evaluating", epoch
    + 1, epochs)`` before each validation to the installed ``engine.phases`` callback.
    Raises:
        TrainingDiverged: the loss became NaN/Inf (the step's rows are not emitted).
        KeyboardInterrupt: passes through untouched; the steps emitted so far stay emitted.
    """
    probe = probe or NullProbe()
    state = state or LoopState()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total_steps = epochs * steps_per_epoch
    report("training", state.step, max(total_steps, state.step))
    emit_all(sinks, RunStarted(method=method, epochs=epochs, steps_per_epoch=steps_per_epoch,
                               start_epoch=state.epoch, start_step=state.step, config=config or {}))
    for epoch in range(state.epoch, epochs):
        (train_mode or model.train)()
        epoch_start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train_batches(epoch):
            raise_if_interrupted()  # a stop signal whose exception a finalizer swallowed
            x, y = x.to(device), y.to(device)
            lr = optimizer.param_groups[0]["lr"]
            with probe.measure() as measurement:
                start = time.perf_counter()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                observe = getattr(measurement, "observe_loss", None)
                if observe is not None:  # e.g. list what the graph saves, by op, before backward frees it
                    observe(loss)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(state.step + 1, epoch, loss_value, lr=lr, method=method)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            step_ms = (time.perf_counter() - start) * 1000.0
            state.step += 1
            batch_correct = (logits.detach().argmax(dim=1) == y).sum().item()
            loss_sum += loss_value * y.numel()
            correct += batch_correct
            seen += y.numel()
            metrics = {"loss": loss_value, "acc": 100.0 * batch_correct / y.numel(), "step_ms": step_ms, "lr": lr}
            metrics.update(probe.metrics(measurement))
            emit_all(sinks, StepEnded(step=state.step, epoch=epoch, metrics=metrics))
            report("training", state.step, max(total_steps, state.step))
        if scheduler is not None:
            scheduler.step()
        epoch_ms = (time.perf_counter() - epoch_start) * 1000.0
        split_metrics = {"train": {"loss": loss_sum / max(seen, 1), "acc": 100.0 * correct / max(seen, 1),
                                   "epoch_ms": epoch_ms}}
        if val_batches is not None:
            report("evaluating", epoch + 1, epochs)
            val = evaluate(model, val_batches(), device)
            split_metrics["val"] = {"loss": val["loss"], "acc": val["acc"]}
        state.epoch = epoch + 1
        emit_all(sinks, EpochEnded(epoch=epoch, step=state.step, metrics=split_metrics))
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state
