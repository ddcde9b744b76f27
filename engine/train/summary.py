"""A fine-tuning run's summary from its metric rows, and the result a run hands back.

Rows (docs/CONTRACTS.md "Run store"): per step ``split="train"``; per epoch ``split="train_epoch"`` (the
epoch's mean train loss/acc and ``epoch_ms``) and ``split="val"``. A row's split says which it is, so
the summary is one pass over the rows.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from engine.train.events import EPOCH_SPLITS, STEP_SPLIT
from engine.train.trainable import jsonable

TRAIN_EPOCH = EPOCH_SPLITS["train"]
BYTES_KEYS = ("layer_activation_bytes", "region_activation_bytes", "analytic_activation_bytes", "peak_memory_bytes")


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Run summary from its long-format metric rows (``store.metrics(run_id)``, ordered by id).

    Bytes: peak over steps (and mean); step_ms: median; flops: median per step; accuracies: percent,
    last epoch (``val_acc``, ``train_acc``) and best epoch (``best_val_acc``); ``loss``: the last finished
    epoch's mean train loss (the last step's before any epoch finished); ``epochs_done``: epochs finished;
    ``steps``: the last step; ``ranks``: each layer's ranks at the last step (``ranks_mean`` over steps);
    ``captured_energy``: per layer, mean over the last quarter of the steps; ``saved_by_op``: step 1's.
    """
    series: dict[str, list[float]] = {}      # per-step values by key
    epoch: dict[str, list[float]] = {}       # (split, key) -> per-epoch values, split "train_epoch" / "val"
    epoch_ms: list[float] = []
    last_step = None
    for r in rows:
        split, key, value = r["split"], r["key"], r["value"]
        if key == "epoch_ms" and split in (STEP_SPLIT, TRAIN_EPOCH):  # STEP_SPLIT: rows written before v2
            epoch_ms.append(value)
        elif split == STEP_SPLIT and r["epoch"] is not None:
            if r["step"] is not None and (last_step is None or r["step"] > last_step):
                last_step = r["step"]
            if value is not None:
                series.setdefault(key, []).append(value)
        elif split in (TRAIN_EPOCH, "val") and value is not None:
            epoch.setdefault(f"{split}/{key}", []).append(value)
    val_acc = epoch.get("val/acc", [])
    train_loss = epoch.get(f"{TRAIN_EPOCH}/loss") or series.get("loss")
    summary: dict[str, Any] = {
        "val_acc": val_acc[-1] if val_acc else None,
        "best_val_acc": max(val_acc) if val_acc else None,
        "val_loss": _last(epoch.get("val/loss")),
        "epochs_done": len(epoch_ms),
        "steps": last_step or 0,
    }
    if epoch.get(f"{TRAIN_EPOCH}/acc"):
        summary["train_acc"] = epoch[f"{TRAIN_EPOCH}/acc"][-1]
    for key in BYTES_KEYS:
        values = series.get(key)
        summary[key] = max(values) if values else None
        summary[key + "_mean"] = statistics.fmean(values) if values else None
    summary["step_ms"] = _median(series.get("step_ms"))
    summary["flops"] = _median(series.get("flops"))
    summary["epoch_ms"] = _median(epoch_ms)
    summary["loss"] = _last(train_loss)
    summary.update(_layer_summary(series))
    return summary


def _last(values: list[float] | None) -> float | None:
    return values[-1] if values else None


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _layer_summary(series: dict[str, list[float]]) -> dict[str, Any]:
    """``ranks`` (last step), ``ranks_mean``, ``saved_by_op``, ``captured_energy`` from the per-step series."""
    out: dict[str, Any] = {}
    ranks: dict[str, dict[int, float]] = {}
    ranks_mean: dict[str, dict[int, float]] = {}
    energy: dict[str, float] = {}
    for key, values in series.items():
        if key.startswith("rank/"):
            layer, mode = key[5:].rsplit("/", 1)
            ranks.setdefault(layer, {})[int(mode)] = int(values[-1])
            ranks_mean.setdefault(layer, {})[int(mode)] = statistics.fmean(values)
        elif key.startswith("saved_op/"):  # what the region saves, by grad_fn, at the first step
            out.setdefault("saved_by_op", {})[key[len("saved_op/"):]] = int(values[0])
        elif key.startswith("captured_energy/"):
            energy[key[len("captured_energy/"):]] = statistics.fmean(values[-max(1, len(values) // 4):])
    if ranks:
        out["ranks"] = {layer: [modes[m] for m in sorted(modes)] for layer, modes in ranks.items()}
        out["ranks_mean"] = {layer: [round(modes[m], 3) for m in sorted(modes)]
                             for layer, modes in ranks_mean.items()}
    if energy:
        out["captured_energy"] = energy
    return out


def plan_summary(info: dict) -> dict:
    """The run summary's extra keys: ``method_info`` and, for a planned run, ``plan_total_bytes``."""
    out: dict[str, Any] = {"method_info": jsonable(info)}
    for key in ("plan_total_bytes", "plan_source", "budget_bytes"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


@dataclass
class RunResult:
    run_id: str
    method: str
    status: str
    message: str | None
    summary: dict[str, Any]
    bad_argument: bool = False  # failed because of an argument only checkable during setup

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "method": self.method, "status": self.status, "message": self.message,
                **self.summary}


def summary_for_json(results: list[RunResult]) -> dict[str, Any]:
    """``lance finetune --json``: ``{"runs": [...]}``, one entry per run."""
    return {"runs": [r.to_json() for r in results]}
