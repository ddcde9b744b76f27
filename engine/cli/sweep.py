"""``lance sweep``: a grid of fine-tuning or continual runs on Ray, mean ± std over seeds, Pareto fronts."""
from __future__ import annotations

import sys
from pathlib import Path

from engine.cli._output import fail
from engine.cli._output import write_json as _write_json
from engine.store import RunStore, StoreError
from engine.store.sweeps import SweepStore
from engine.sweep import SweepError, SweepSpec, configurations_csv, log_trial, parse_value, run_sweep, sweep_results
from engine.sweep.results import print_table

EXAMPLE = ("lance sweep --kind finetune --backbone small-cnn --dataset digits --method asi,lance "
           "--budget 20kB,40kB --seeds 0,1 --layers 2 --epochs 1 --set limit_train=256 --workers 2 --json out.json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="a grid of finetune/continual runs (methods x budgets/eps/options x seeds) on Ray; fronts",
        description=(
            "Run every combination of methods, option values and seeds as normal runs in the run store, on Ray "
            "(a local instance by default; --address joins a cluster). Failed trials are recorded and the sweep "
            "goes on; --resume SWEEP_ID reruns only the trials that did not complete. Prints mean ± std over "
            "seeds per configuration and marks each method's accuracy-memory Pareto front."),
        epilog=("Axes apply to the methods that take them (finetune: budget/ranks -> asi, lance; eps -> hosvd, "
                "lance without a budget; patch -> gradient_filter; continual: eps_cl -> lance, gpm; eps -> lance); "
                "METHOD.FIELD=... sets one method's axis. Example: " + EXAMPLE),
    )
    p.add_argument("--kind", choices=["finetune", "continual"], default="finetune")
    p.add_argument("--method", default=None, help="methods, comma-separated (finetune default: vanilla; "
                                                   "continual default: lance)")
    p.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    p.add_argument("--budget", default=None, help="budget axis for asi/lance, e.g. 20kB,40kB,0.1MB")
    p.add_argument("--eps", default=None, help="eps axis (finetune: hosvd, and lance without --budget; "
                                               "continual: lance), e.g. 0.6,0.8")
    p.add_argument("--eps-cl", default=None, help="continual: eps_cl axis for lance and gpm, e.g. 0.95,0.97,0.99")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="any option as an axis (repeatable): lr=0.01,0.05, hosvd.eps=0.6,0.9, patch=2,4")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=V",
                   help="any option fixed for every trial (repeatable): limit_train=512, val_split=test")
    p.add_argument("--backbone", default=None, help="finetune default: small-cnn; continual: alexnet-cl")
    p.add_argument("--dataset", default=None, help="finetune default: digits (continual: builds the split)")
    p.add_argument("--benchmark", default=None, help="continual benchmark (default split-digits)")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (also LANCE_DATA_ROOT)")
    for name in ("layers", "epochs", "batch-size", "limit-train"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"shorthand for --set {name.replace('-', '_')}=N")
    p.add_argument("--workers", type=int, default=1, help="trials at once (default 1)")
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="torch/OpenMP threads (and Ray CPUs) per trial (default 1)")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, ray://host:10001) "
                                                   "instead of starting a local one")
    p.add_argument("--resume", default=None, metavar="SWEEP_ID",
                   help="run the trials of SWEEP_ID that did not complete")
    p.add_argument("--show", default=None, metavar="SWEEP_ID", help="print a stored sweep's results (no training)")
    p.add_argument("--list", action="store_true", help="list the stored sweeps")
    p.add_argument("--front-bytes", default="peak_layer_activation_bytes",
                   help="bytes the front is drawn against: peak_layer_activation_bytes (default), "
                        "peak_region_activation_bytes, peak_memory_bytes, plan_total_bytes")
    p.add_argument("--json", default=None, metavar="OUT", help="write trials, configurations and fronts (- = stdout)")
    p.add_argument("--csv", default=None, metavar="OUT", help="write one row per configuration (- = stdout)")
    p.add_argument("--job-id", default=None, help="tag the sweep with this job id (the app's job runner)")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=run)


def _values(text: str) -> list:
    return [parse_value(v) for v in str(text).split(",") if v.strip()]


def _pair(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"{option} {text!r}: write FIELD=VALUE")
    return name.strip().replace("-", "_"), value


def spec_from_args(args):
    methods = [m.strip() for m in (args.method or ("vanilla" if args.kind == "finetune" else "lance")).split(",")
               if m.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: give whole numbers, comma-separated") from None
    axes: dict = {}
    for option, name in (("budget", "budget"), ("eps", "eps"), ("eps_cl", "eps_cl")):
        value = getattr(args, option)
        if value:
            axes[name] = _values(value) if name != "budget" else [v.strip() for v in value.split(",") if v.strip()]
    for text in args.grid:
        name, value = _pair(text, "--grid")
        axes[name] = [v.strip() for v in value.split(",") if v.strip()] if name.endswith("budget") \
            else _values(value)
    base: dict = {}
    for option in ("backbone", "dataset", "benchmark", "data_root", "layers", "epochs", "batch_size", "limit_train"):
        value = getattr(args, option)
        if value is not None:
            base[option] = value
    for text in args.set:
        name, value = _pair(text, "--set")
        base[name] = value.strip() if name.endswith("budget") else parse_value(value)
    return SweepSpec(kind=args.kind, methods=methods, seeds=seeds, axes=axes, base=base)


def run(args) -> int:
    try:
        store = RunStore()
        if args.list:
            for s in SweepStore(store).list_sweeps():
                counts = {}
                for t in SweepStore(store).trials(s["id"]):
                    counts[t["status"]] = counts.get(t["status"], 0) + 1
                print(f"{s['id']}  {s['kind']:<10}{s['status']:<12}{sum(counts.values()):>4} trials  "
                      + " ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            return 0
        if args.show:
            sweep_id = SweepStore(store).get_sweep(args.show)["id"]
        else:
            spec = None if args.resume else spec_from_args(args)

            def started(sweep_id: str, n: int) -> None:
                if not args.quiet:
                    print(f"sweep {sweep_id}: {n} trial(s) to run on Ray "
                          f"({args.workers} worker(s) x {args.threads_per_worker} thread(s))", file=sys.stderr,
                          flush=True)

            sweep_id = run_sweep(spec, store, resume=args.resume, address=args.address, workers=args.workers,
                                 threads_per_worker=args.threads_per_worker, job_id=args.job_id,
                                 on_trial=None if args.quiet else log_trial(), on_start=started)
        results = sweep_results(sweep_id, store, x_metric=args.front_bytes)
    except KeyboardInterrupt:
        print("lance sweep: interrupted; `lance sweep --list` shows the sweep, --resume SWEEP_ID finishes it",
              file=sys.stderr)
        return 130
    except (SweepError, StoreError, ValueError) as exc:
        return fail("sweep", str(exc))
    print_table(results, sys.stderr if args.json == "-" or args.csv == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, results)
    if args.csv:
        text = configurations_csv(results)
        if args.csv == "-":
            sys.stdout.write(text)
        else:

            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            Path(args.csv).write_text(text)
    s = results["sweep"]
    return 0 if s["completed"] == s["trials"] else 1
