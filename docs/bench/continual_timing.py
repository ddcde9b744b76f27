"""Add per-epoch timing from the run store to a `lance continual --json` result.

    python3 docs/bench/continual_timing.py OUT.json --wall-clock-s 1102 --threads 1 \
        --load-before "$(cat before)" --load-after "$(cat after)" --note "…" --json docs/bench/NAME.json

Reads each run's ``epoch_ms`` rows (logged by ``engine.continual.session`` at every epoch end) and its
``task_ms``; writes ``timing[method] = {epoch_ms, task_ms, median_epoch_ms, median_epoch_ratio_vs_finetune}``.
"""
from __future__ import annotations

import json
import statistics

from engine.bench.output import bench_parser, emit_json
from engine.store import RunStore


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("result")
    parser.add_argument("--command", default="OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 lance continual --benchmark "
                        "split-cifar10 --dataset imagefolder:../shared/datasets/cifar10-jpeg --method "
                        "lance,gpm,finetune --epochs 3 --json OUT")
    parser.add_argument("--wall-clock-s", type=float, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--date", default=None)
    parser.add_argument("--load-before", default="")
    parser.add_argument("--load-after", default="")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    store = RunStore()
    timing = {}
    for run in result["runs"]:
        epochs = [row["value"] for row in store.metrics(run["run_id"], key="epoch_ms", split="train")]
        timing[run["method"]] = {"epoch_ms": [round(v, 1) for v in epochs],
                                 "task_ms": [round(v, 1) for v in run["task_ms"]],
                                 "median_epoch_ms": round(statistics.median(epochs), 1)}
    base = timing.get("finetune", {}).get("median_epoch_ms")
    for entry in timing.values():
        if base:
            entry["median_epoch_ratio_vs_finetune"] = round(entry["median_epoch_ms"] / base, 3)
    out = {"command": args.command, "date": args.date, "wall_clock_s": args.wall_clock_s, "threads": args.threads,
           "load_before": args.load_before, "load_after": args.load_after, "note": args.note, "timing": timing,
           **result}
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
