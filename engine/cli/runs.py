"""``lance runs list|show|export|delete|repair``: the run store from the terminal."""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.cli._output import fail
from engine.home import lance_home
from engine.store import RunStore, StoreError
from engine.store.procinfo import is_alive
from engine.store.repair import repair_store
from engine.units import format_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list, show, export, delete or repair stored runs",
                              description="The run store ($LANCE_HOME, default: the user data dir).")
    sub = p.add_subparsers(dest="runs_command", metavar="ACTION")

    ls = sub.add_parser("list", help="table of runs (oldest first)")
    ls.add_argument("--kind", choices=["finetune", "continual"])
    ls.add_argument("--status", choices=["running", "completed", "failed", "interrupted"])
    ls.add_argument("--job-id")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=run_list)

    show = sub.add_parser("show", help="a run's config, status, summary and last metrics")
    show.add_argument("run", help="run id or unambiguous prefix")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    ex = sub.add_parser("export", help="write runs with their metric rows to CSV or JSON")
    ex.add_argument("runs", nargs="+", help="run ids (or prefixes)")
    ex.add_argument("--out", required=True, help="output file (.csv or .json)")
    ex.add_argument("--format", choices=["csv", "json"], default=None, help="default: from --out's suffix")
    ex.add_argument("--force", action="store_true", help="replace --out if it exists (never a file of the store)")
    ex.set_defaults(func=run_export)

    rm = sub.add_parser("delete", help="delete runs (rows, config, checkpoint)")
    rm.add_argument("runs", nargs="+", help="run ids (or prefixes)")
    rm.add_argument("--force", action="store_true", help="also delete runs whose process is still running")
    rm.set_defaults(func=run_delete)

    rep = sub.add_parser("repair", help="rebuild the run index from the run folders (damaged or emptied database)",
                         description="Rebuild runs.sqlite from the run folders (run.json, config.json, summary.json, "
                                     "metrics.jsonl / metrics.csv). A damaged database is kept beside it as "
                                     "runs.sqlite.damaged-<time>; no run folder is changed.")
    rep.add_argument("--json", action="store_true", help="print the repair report as JSON")
    rep.set_defaults(func=run_repair)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _fail(message: str, code: int = 2) -> int:
    return fail("runs", message, code)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def _brief(run: dict) -> dict:
    s = run.get("summary") or {}
    return {"id": run["id"], "kind": run["kind"], "method": run["method"], "status": run["status"],
            "dataset": run["config"].get("dataset"), "backbone": run["config"].get("backbone"),
            "val_acc": s.get("val_acc", s.get("acc")), "layer_activation_bytes": s.get("layer_activation_bytes"),
            "created_at": run["created_at"], "job_id": run["job_id"], "message": run["message"]}


def run_list(args) -> int:
    runs = RunStore().list_runs(kind=args.kind, status=args.status, job_id=args.job_id)
    if args.json:
        print(json.dumps([_brief(r) for r in runs], indent=2, default=str))
        return 0
    if not runs:
        print("no runs stored yet (lance finetune ... creates one)")
        return 0
    print(f"{'run':<24}{'kind':<10}{'method':<16}{'status':<12}{'acc %':>7}{'layer act':>11}  "
          f"{'backbone':<14}{'dataset':<22}created (UTC)")
    for r in runs:
        b = _brief(r)
        acc = f"{b['val_acc']:.2f}" if isinstance(b["val_acc"], (int, float)) else "-"
        dataset = str(b["dataset"] or "-")
        dataset = dataset if len(dataset) <= 21 else "…" + dataset[-20:]
        print(f"{b['id']:<24}{b['kind']:<10}{str(b['method']):<16}{b['status']:<12}{acc:>7}"
              f"{format_bytes(b['layer_activation_bytes']):>11}  {str(b['backbone'] or '-'):<14}{dataset:<22}"
              f"{_when(b['created_at'])}")
    return 0


def run_show(args) -> int:
    store = RunStore()
    try:
        run = store.find_run(args.run)
    except StoreError as exc:
        return _fail(str(exc))
    rows = store.metrics(run["id"])
    if args.json:
        print(json.dumps({**run, "metric_rows": len(rows), "metric_keys": store.metric_keys(run["id"]),
                          "run_dir": str(store.run_dir(run["id"]))}, indent=2, default=str))
        return 0
    print(f"run      {run['id']}  ({run['kind']}, {run['method']})")
    print(f"status   {run['status']}" + (f": {run['message']}" if run["message"] else ""))
    print(f"created  {_when(run['created_at'])} UTC, updated {_when(run['updated_at'])} UTC, pid {run['pid']}"
          + (f", job {run['job_id']}" if run["job_id"] else ""))
    print(f"folder   {store.run_dir(run['id'])}")
    cfg = run["config"]
    keys = ("backbone", "weights", "dataset", "layers", "epochs", "batch_size", "lr", "seed", "limit_train",
            "method_options", "layer_names")
    print("config   " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg))
    git = (cfg.get("provenance") or {}).get("git") or {}
    if git.get("commit"):
        print(f"git      {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}")
    if run["summary"]:
        print("summary")
        for k, v in run["summary"].items():
            if isinstance(v, float):
                v = f"{v:.6g}"
            print(f"  {k:<32}{v}")
    epochs = [r for r in rows if r["split"] == "val" and r["key"] == "acc"]
    for r in epochs[-5:]:
        print(f"  epoch {r['epoch'] + 1 if r['epoch'] is not None else '-'}: val acc {r['value']:.2f}%")
    print(f"metrics  {len(rows)} rows, keys: {', '.join(store.metric_keys(run['id'])[:12])}"
          + (" …" if len(store.metric_keys(run["id"])) > 12 else ""))
    return 0


def run_export(args) -> int:
    store = RunStore()
    out = Path(args.out)
    fmt = (args.format or out.suffix.lstrip(".")).lower()
    if fmt not in ("csv", "json"):
        return _fail(f"cannot tell the format of {out}: use a .csv or .json file or --format csv|json")
    try:
        runs = [store.find_run(ref) for ref in args.runs]
        store.export_runs([r["id"] for r in runs], out, fmt, force=args.force, single_record=len(runs) == 1)
    except StoreError as exc:
        return _fail(str(exc))
    print(f"wrote {len(runs)} run(s) to {out}")
    return 0


def run_delete(args) -> int:
    store = RunStore()
    try:
        runs = [store.find_run(ref) for ref in args.runs]
        for run in runs:
            store.run_dir(run["id"])  # a tampered id is refused before anything is deleted
    except StoreError as exc:
        return _fail(str(exc))
    for run in runs:
        if run["status"] == "running" and is_alive(run["pid"], run.get("pid_start")) and not args.force:
            return _fail(f"run {run['id']} is still running (pid {run['pid']}); stop it first or pass --force")
    for run in runs:
        store.delete_run(run["id"])
        print(f"deleted {run['id']}")
    return 0


def run_repair(args) -> int:
    report = repair_store(lance_home())
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(report["summary"])
    for line in report["skipped"]:
        print(f"  skipped: {line}")
    return 0
