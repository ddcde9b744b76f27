"""Sinks: where the loop's events go. The store sink writes rows, the progress sink draws a bar."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

from engine.store import StoreError
from engine.train.events import EPOCH_SPLITS, STEP_SPLIT, EpochEnded, Event, RunEnded, RunStarted, StepEnded
from engine.units import format_bytes


class RecordingSink:
    """Keeps every event in ``self.events`` (tests, the CLI's JSON summary)."""

    def __init__(self):
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def steps(self) -> list[StepEnded]:
        return [e for e in self.events if isinstance(e, StepEnded)]

    def epochs(self) -> list[EpochEnded]:
        return [e for e in self.events if isinstance(e, EpochEnded)]


class StoreSink:
    """Writes every step and epoch as long-format rows of ``run_id``; closes the run on ``RunEnded``.

    Step rows have split ``"train"``; epoch rows ``"train_epoch"`` (mean train loss/acc, ``epoch_ms``) and
    ``"val"`` (``EPOCH_SPLITS``), both with the epoch's last step number.

    Rows are written as they come (one transaction per event), so a killed process leaves every
    finished step in the store.
    """

    def __init__(self, store, run_id: str):
        self.store = store
        self.run_id = run_id

    def emit(self, event: Event) -> None:
        if isinstance(event, StepEnded):
            self.store.log_metrics(self.run_id, [
                {"step": event.step, "epoch": event.epoch, "split": STEP_SPLIT, "key": key, "value": value}
                for key, value in event.metrics.items()
            ])
        elif isinstance(event, EpochEnded):
            self.store.log_metrics(self.run_id, [
                {"step": event.step, "epoch": event.epoch, "split": EPOCH_SPLITS.get(split, split),
                 "key": key, "value": value}
                for split, values in event.metrics.items()
                for key, value in values.items()
            ])
        elif isinstance(event, RunEnded):
            self.store.set_summary(self.run_id, event.summary)
            self.store.set_status(self.run_id, event.status, event.message)
            try:
                self.store.write_metrics_csv(self.run_id)
            except (OSError, StoreError):
                pass  # the CSV copy is a convenience; the rows are in the store and metrics.jsonl



class ProgressSink:
    """A tqdm progress bar per run on ``stream`` (stderr), plus one line per epoch."""

    def __init__(self, stream=None, disable: bool | None = None):
        self._stream = stream
        self.disable = disable
        self.bar = None
        self.method = ""
        self.epochs = 0

    @property
    def stream(self):
        return self._stream or sys.stderr

    def emit(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.method, self.epochs = event.method, event.epochs
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, desc=event.method,
                            file=self.stream, dynamic_ncols=True, leave=True, unit="step",
                            disable=self.disable)
        elif isinstance(event, StepEnded) and self.bar is not None:
            m = event.metrics
            self.bar.update(1)
            self.bar.set_postfix_str(
                f"ep {event.epoch + 1}/{self.epochs} loss {m.get('loss', float('nan')):.3f} "
                f"acc {m.get('acc', float('nan')):.1f}% act {format_bytes(m.get('layer_activation_bytes'))}",
                refresh=False,
            )
        elif isinstance(event, EpochEnded):
            train, val = event.metrics.get("train", {}), event.metrics.get("val", {})
            line = (f"[{self.method}] epoch {event.epoch + 1}/{self.epochs}: "
                    f"train loss {train.get('loss', float('nan')):.4f} acc {train.get('acc', float('nan')):.2f}%"
                    f" | val loss {val.get('loss', float('nan')):.4f} acc {val.get('acc', float('nan')):.2f}%"
                    f" | {train.get('epoch_ms', 0) / 1000:.1f} s")
            self._write(line)
        elif isinstance(event, RunEnded):
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            s: dict[str, Any] = event.summary
            line = f"[{event.method or self.method}] {event.status}"
            if s.get("val_acc") is not None:
                line += (f": val acc {s['val_acc']:.2f}%, activations {format_bytes(s.get('layer_activation_bytes'))}"
                         f" (layers) / {format_bytes(s.get('region_activation_bytes'))} (region),"
                         f" step {s.get('step_ms', 0):.1f} ms")
            if event.message:
                line += f" — {event.message}"
            self._write(line)

    def _write(self, line: str) -> None:
        if self.disable:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
