"""Page faults and kernel time per alexnet-cl training step (batch 64, 1 thread), with and without
:func:`engine.malloc.tune_malloc`, in alternating child processes (the setting is process-wide).

    python3 docs/bench/malloc_faults.py [--rounds 3] [--steps 10] [--json docs/bench/malloc_faults.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KINDS = ("finetune", "lance", "gpm")


def child(kind: str, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from alexnet_cl_step import build

    from engine.malloc import tune_malloc

    tuned = tune_malloc()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 2, (64,))
    model, task = build(kind, x, y)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, task), y).backward()

    for _ in range(3):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"kind": kind, "malloc_tuned": tuned,
                      "minor_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps, 1),
                      "sys_ms_per_step": round((after.ru_stime - before.ru_stime) / steps * 1e3, 2),
                      "user_ms_per_step": round((after.ru_utime - before.ru_utime) / steps * 1e3, 2),
                      "step_ms": round(wall / steps * 1e3, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    from engine.bench.output import emit_json

    rows = []
    for _ in range(args.rounds):
        for kind in KINDS:
            for tuning in ("0", "1"):
                env = dict(os.environ, LANCE_MALLOC_TUNING=tuning, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", str(args.steps)],
                                     env=env, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for kind in KINDS:
        for tuned in (False, True):
            sel = [r for r in rows if r["kind"] == kind and r["malloc_tuned"] == tuned]
            summary[f"{kind}/{'tuned' if tuned else 'glibc default'}"] = {
                key: statistics.median(r[key] for r in sel)
                for key in ("minor_faults_per_step", "sys_ms_per_step", "user_ms_per_step", "step_ms")}
    emit_json({"batch": 64, "threads": 1, "rounds": args.rounds, "steps": args.steps, "summary": summary,
               "rows": rows}, args.json)


if __name__ == "__main__":
    main()
