"""Tables for the Runs page: runs as rows, configs side by side, export bytes. No Streamlit calls."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence

import pandas as pd

from lance_app.figures import run_label

SUMMARY_COLUMNS = ["val_acc", "acc", "bwt", "layer_activation_bytes", "region_activation_bytes",
                   "peak_memory_bytes", "plan_total_bytes", "peak_layer_activation_bytes",
                   "peak_region_activation_bytes", "analytic_activation_bytes", "step_ms", "flops"]


def _when(value) -> str | None:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS' (local time; sorts like the time); strings pass through."""
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    return value


def runs_frame(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run: id, label, kind, method, status, created_at, job_id, headline summary values."""
    rows = []
    for run in runs:
        summary = run.get("summary") or {}
        row = {"id": run.get("id"), "label": run_label(run), "kind": run.get("kind"),
               "method": run.get("method"), "status": run.get("status"),
               "created_at": _when(run.get("created_at")), "job_id": run.get("job_id"),
               "message": run.get("message") or ""}
        for col in SUMMARY_COLUMNS:
            value = summary.get(col) if isinstance(summary, Mapping) else None
            row[col] = value if isinstance(value, (int, float)) else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=["id", "label", "kind", "method", "status", "created_at", "job_id",
                                     "message", *SUMMARY_COLUMNS])
    empty_summaries = [c for c in SUMMARY_COLUMNS if df[c].isna().all()]
    return df.drop(columns=empty_summaries)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def config_side_by_side(runs: Sequence[Mapping], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Rows = flattened config keys, columns = runs; keys whose values differ come first."""
    cols = {}
    for run in runs:
        name = (labels or {}).get(run["id"], run_label(run))
        cols[name] = _flatten(dict(run.get("config") or {}))
    df = pd.DataFrame(cols)
    if df.empty:
        return df
    df = df.astype(str)
    differs = df.nunique(axis=1) > 1
    return pd.concat([df[differs], df[~differs]])


def metrics_export(df: pd.DataFrame, runs: Sequence[Mapping]) -> tuple[bytes, bytes]:
    """(CSV of the metric rows, JSON of {runs: [run + metrics]}) for the download buttons."""
    csv_bytes = df.to_csv(index=False).encode()
    payload = {"runs": []}
    for run in runs:
        part = df[df["run_id"] == run["id"]] if not df.empty else df
        payload["runs"].append({**{k: v for k, v in run.items()},
                                "metrics": json.loads(part.drop(columns=["label"], errors="ignore")
                                                      .to_json(orient="records"))})
    return csv_bytes, json.dumps(payload, indent=1, default=str).encode()
