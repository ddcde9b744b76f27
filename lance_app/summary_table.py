"""The end-of-job comparison table: one row per fine-tuning run, what `lance finetune` prints at the end,
with each method's measured bytes as a factor of vanilla's. No Streamlit here.

Values come from each run's stored summary (``engine.train.session.summarize``): ``val_acc`` (last
epoch), ``best_val_acc``, ``layer_activation_bytes`` / ``region_activation_bytes`` (peak over steps,
measured), ``step_ms`` (median), ``flops`` (median per step).

The vanilla reference (for "× vs vanilla"): the job's own vanilla run, else the newest completed vanilla
run in the store trained on the same setup (:data:`SAME_SETUP` keys of the config equal), else none
(the × columns stay empty and :func:`vanilla_reference` returns None).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from lance_app.figures import format_bytes

# config keys that fix the measured activation bytes of a fine-tuning run
SAME_SETUP = ("backbone", "weights", "dataset", "layers", "batch_size", "resolution")
COLUMNS = ["method", "status", "final acc %", "best acc %", "layer bytes", "× vs vanilla (layer)",
           "region bytes", "× vs vanilla (region)", "median step ms", "MFLOP/step", "epochs", "run"]


def _same_setup(a: Mapping, b: Mapping) -> bool:
    return all((a.get(k) or None) == (b.get(k) or None) for k in SAME_SETUP)


def vanilla_reference(runs: Sequence[Mapping], stored: Iterable[Mapping] = ()) -> Mapping | None:
    """The run whose bytes the others are compared with: the job's vanilla run (completed or not, as
    long as it measured bytes), else the newest completed vanilla run of ``stored`` on the same setup as
    the job's first run."""
    for run in runs:
        if run.get("method") == "vanilla" and (run.get("summary") or {}).get("layer_activation_bytes"):
            return run
    if not runs:
        return None
    config = runs[0].get("config") or {}
    same = [r for r in stored if r.get("method") == "vanilla" and r.get("status") == "completed"
            and (r.get("summary") or {}).get("layer_activation_bytes") and _same_setup(r.get("config") or {}, config)]
    return max(same, key=lambda r: str(r.get("created_at", ""))) if same else None


def _ratio(reference: float | None, value: float | None) -> float | None:
    if not reference or not value:
        return None
    return round(float(reference) / float(value), 1)


def summary_rows(runs: Sequence[Mapping], reference: Mapping | None = None) -> list[dict]:
    """One dict per run that has a summary (keys: :data:`COLUMNS`; bytes as text, the rest numbers)."""
    ref = (reference or {}).get("summary") or {}
    rows = []
    for run in runs:
        s = run.get("summary") or {}
        if not s:
            continue
        layer, region = s.get("layer_activation_bytes"), s.get("region_activation_bytes")
        rows.append({
            "method": run.get("method"), "status": run.get("status"),
            "final acc %": _round(s.get("val_acc"), 2), "best acc %": _round(s.get("best_val_acc"), 2),
            "layer bytes": format_bytes(layer),
            "× vs vanilla (layer)": _ratio(ref.get("layer_activation_bytes"), layer),
            "region bytes": format_bytes(region),
            "× vs vanilla (region)": _ratio(ref.get("region_activation_bytes"), region),
            "median step ms": _round(s.get("step_ms"), 1),
            "MFLOP/step": _round(None if s.get("flops") is None else s["flops"] / 1e6, 1),
            "epochs": s.get("epochs_done"), "run": run.get("id"),
        })
    return rows


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


def summary_frame(runs: Sequence[Mapping], stored: Iterable[Mapping] = ()) -> tuple[pd.DataFrame, Mapping | None]:
    """(the table, the vanilla run it compares with) for a job's ``runs``; ``stored``: other runs to find a
    vanilla reference in when the job has none."""
    reference = vanilla_reference(runs, stored)
    return pd.DataFrame(summary_rows(runs, reference), columns=COLUMNS), reference
