"""A sweep's results, read back from the run store: per trial, per configuration (mean ± std over seeds),
and the accuracy–memory Pareto front of each method.

Per trial the figures come from its run's summary:

- finetune: ``accuracy`` = last-epoch validation accuracy (%), ``peak_layer_activation_bytes`` /
  ``peak_region_activation_bytes`` = the largest measured saved bytes of any step (the summary's
  ``layer_activation_bytes`` / ``region_activation_bytes``), ``plan_total_bytes`` (analytic),
  ``peak_memory_bytes`` when the run measured it, ``step_ms`` (median), ``flops`` (median per step);
- continual: ``accuracy`` = ACC after the last task, ``bwt``, ``forgetting``, the peak bytes over the
  run, ``task_ms`` (mean per task).

Std is the sample standard deviation over the completed seeds (None with one seed). The front of a
method: its configurations that no other configuration of the same method beats on both mean accuracy
(higher) and mean measured bytes (lower; ``x_metric``, default ``peak_layer_activation_bytes``).
"""
from __future__ import annotations

import csv
import io
import statistics
from typing import Any

from engine.store import RunStore, StoreError
from engine.store.sweeps import SweepStore
from engine.sweep.spec import config_key

FINETUNE_METRICS = ("accuracy", "best_accuracy", "peak_layer_activation_bytes", "peak_region_activation_bytes",
                    "peak_memory_bytes", "plan_total_bytes", "step_ms", "flops")
CONTINUAL_METRICS = ("accuracy", "bwt", "forgetting", "peak_layer_activation_bytes",
                     "peak_region_activation_bytes", "peak_memory_bytes", "task_ms")


def trial_metrics(kind: str, summary: dict | None) -> dict[str, float | None]:
    """The figures of one trial from its run's summary (None where the run has none)."""
    s = summary or {}
    if kind == "finetune":
        out = {"accuracy": s.get("val_acc"), "best_accuracy": s.get("best_val_acc"),
               "peak_layer_activation_bytes": s.get("peak_layer_activation_bytes", s.get("layer_activation_bytes")),
               "peak_region_activation_bytes": s.get("peak_region_activation_bytes",
                                                     s.get("region_activation_bytes")),
               "peak_memory_bytes": s.get("peak_memory_bytes"),
               "plan_total_bytes": s.get("plan_total_bytes", s.get("analytic_activation_bytes")),
               "step_ms": s.get("step_ms"), "flops": s.get("flops")}
    else:
        task_ms = s.get("task_ms") or []
        out = {"accuracy": s.get("acc"), "bwt": s.get("bwt"), "forgetting": s.get("forgetting"),
               "peak_layer_activation_bytes": s.get("peak_layer_activation_bytes"),
               "peak_region_activation_bytes": s.get("peak_region_activation_bytes"),
               "peak_memory_bytes": s.get("peak_memory_bytes"),
               "task_ms": statistics.fmean(task_ms) if task_ms else None}
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def _mean_std(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Keys of the non-dominated points ``(key, bytes, accuracy)``: fewer bytes or more accuracy than every
    other; sorted by bytes. A point equal to another on both is kept once (the first)."""
    front = []
    for key, x, y in points:
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for k2, x2, y2 in points if k2 != key)
        duplicate = any(x2 == x and y2 == y and k2 in front for k2, x2, y2 in points if k2 != key)
        if not dominated and not duplicate:
            front.append(key)
    order = {k: x for k, x, _ in points}
    return sorted(front, key=lambda k: order[k])


def sweep_results(sweep_id: str, store: RunStore | None = None,
                  x_metric: str = "peak_layer_activation_bytes") -> dict[str, Any]:
    """``{sweep, trials, configurations, front}`` (see the module docstring)."""
    store = store or RunStore()
    sweeps = SweepStore(store)
    sweep = sweeps.get_sweep(sweep_id)
    kind = sweep["kind"]
    names = FINETUNE_METRICS if kind == "finetune" else CONTINUAL_METRICS
    if x_metric not in names:
        raise StoreError(f"--front-bytes {x_metric!r}: choose one of "
                         f"{', '.join(n for n in names if n.endswith('bytes'))}")
    trials = []
    for t in sweeps.trials(sweep["id"]):
        run = None
        if t["run_id"]:
            try:
                run = store.get_run(t["run_id"])
            except StoreError:
                run = None
        metrics = trial_metrics(kind, run["summary"] if run and t["status"] == "completed" else None)
        trials.append({"key": t["key"], "method": t["method"], "seed": t["seed"], "params": t["params"],
                       "label": t["label"], "status": t["status"], "run_id": t["run_id"], "message": t["message"],
                       "attempts": t["attempts"], **metrics})
    groups: dict[str, dict[str, Any]] = {}
    for t in trials:
        ck = config_key(t["method"], t["params"])
        g = groups.setdefault(ck, {"config_key": ck, "method": t["method"], "params": t["params"],
                                   "label": t["label"], "trials": 0, "completed": 0, "failed": 0,
                                   "seeds": [], "run_ids": [], "_values": {n: [] for n in names}})
        g["trials"] += 1
        if t["status"] == "completed":
            g["completed"] += 1
            g["seeds"].append(t["seed"])
            g["run_ids"].append(t["run_id"])
            for n in names:
                if t[n] is not None:
                    g["_values"][n].append(t[n])
        elif t["status"] in ("failed", "interrupted"):
            g["failed"] += 1
    configurations = []
    for g in groups.values():
        values = g.pop("_values")
        g["metrics"] = {n: {**_mean_std(v), "values": v} for n, v in values.items()}
        configurations.append(g)
    front: dict[str, list[str]] = {}
    for method in dict.fromkeys(c["method"] for c in configurations):
        points = [(c["config_key"], c["metrics"][x_metric]["mean"], c["metrics"]["accuracy"]["mean"])
                  for c in configurations if c["method"] == method
                  and c["metrics"][x_metric]["mean"] is not None and c["metrics"]["accuracy"]["mean"] is not None]
        front[method] = pareto_front(points)
    on_front = {k for keys in front.values() for k in keys}
    for c in configurations:
        c["on_front"] = c["config_key"] in on_front
    counts = {s: sum(1 for t in trials if t["status"] == s)
              for s in ("pending", "running", "completed", "failed", "interrupted")}
    head = {k: sweep[k] for k in ("id", "kind", "status", "message", "created_at", "updated_at", "job_id")}
    return {"sweep": {**head, "spec": sweep["spec"], "trials": len(trials), **counts, "x_metric": x_metric},
            "trials": trials, "configurations": configurations, "front": front}


def configurations_csv(results: dict[str, Any]) -> str:
    """One row per configuration: method, label, the axis values, counts, every metric's mean and std."""
    configs = results["configurations"]
    axis_names = sorted({k for c in configs for k in c["params"]})
    metric_names = list(configs[0]["metrics"]) if configs else []
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "label", *axis_names, "trials", "completed", "failed", "on_front",
                     *[f"{n}_{s}" for n in metric_names for s in ("mean", "std")], "run_ids"])
    for c in configs:
        writer.writerow([c["method"], c["label"], *[c["params"].get(a, "") for a in axis_names], c["trials"],
                         c["completed"], c["failed"], int(c["on_front"]),
                         *[_cell(c["metrics"][n][s]) for n in metric_names for s in ("mean", "std")],
                         " ".join(c["run_ids"])])
    return buf.getvalue()


def _cell(value) -> str:
    return "" if value is None else repr(round(value, 6))


def print_table(results: dict[str, Any], stream) -> None:
    """Mean ± std per configuration, front marked with *."""
    s = results["sweep"]
    print(f"sweep {s['id']} ({s['kind']}): {s['status']}; {s['completed']}/{s['trials']} trials completed, "
          f"{s['failed']} failed, {s['interrupted']} interrupted, {s['pending'] + s['running']} not run", file=stream)
    x = s["x_metric"]
    print(f"{'configuration':<36}{'seeds':>6}{'accuracy %':>18}{x.replace('_activation', ''):>32}"
          f"{'step/task ms':>14}  front", file=stream)
    for c in results["configurations"]:
        m = c["metrics"]
        acc, xs = m["accuracy"], m[x]
        t = m.get("step_ms") or m.get("task_ms")
        print(f"{c['label'][:35]:<36}{c['completed']:>6}{_pm(acc, '.2f'):>18}{_pm(xs, ',.0f'):>32}"
              f"{_pm(t, '.1f', std=False):>14}  {'*' if c['on_front'] else ''}", file=stream)


def _pm(stat: dict, fmt: str, std: bool = True) -> str:
    if stat["mean"] is None:
        return "-"
    text = format(stat["mean"], fmt)
    if std and stat["std"] is not None:
        text += " ± " + format(stat["std"], fmt)
    return text
