"""Events the fine-tuning loop emits. Sinks (store, progress bar, app) consume them; the loop knows none.

Metric dicts map metric keys (docs/CONTRACTS.md "Run store") to floats. Steps are counted from 1
across epochs; epochs from 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

STEP_SPLIT = "train"                                   # the split of per-step rows in the run store
EPOCH_SPLITS = {"train": "train_epoch", "val": "val"}  # EpochEnded.metrics key -> the split of its rows


@dataclass
class RunStarted:
    method: str
    epochs: int                 # total epochs of the run
    steps_per_epoch: int
    start_epoch: int = 0        # > 0 when resuming
    start_step: int = 0         # global steps already done (resume)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class StepEnded:
    step: int                   # global step, from 1
    epoch: int                  # from 0
    metrics: dict[str, float]   # loss, acc (percent), layer_activation_bytes, ..., rank/<layer>/<mode>


@dataclass
class EpochEnded:
    epoch: int
    step: int                   # global step at the end of the epoch
    metrics: dict[str, dict[str, float]]  # "train" / "val" -> {acc, loss, epoch_ms}; stored: EPOCH_SPLITS


@dataclass
class RunEnded:
    status: str                 # completed | failed | interrupted
    message: str | None
    summary: dict[str, Any]
    method: str = ""


Event = RunStarted | StepEnded | EpochEnded | RunEnded


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


def emit_all(sinks, event: Event) -> None:
    """Send ``event`` to every sink, in order."""
    for sink in sinks:
        sink.emit(event)
