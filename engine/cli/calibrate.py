"""``lance calibrate``, ``lance ranks`` and ``lance bench-calibration``.

- ``lance calibrate --backbone B --dataset D [--layers K] [--eps LIST] [--batches N] --out FILE.json``:
  energy spectra of every compressible layer, perplexity curves and bytes of the last K (fine-tuned).
- ``lance ranks --calibration FILE.json --budget X [--batch-size B] [--json PLAN.json]``: the exact rank
  choice under a budget for training batches of B (default: the fine-tune default, 128), written as a plan
  that ``lance finetune --ranks PLAN.json`` trains (engine.calibration.plan); exit status 2 with the least
  feasible total when the budget is too small.
- ``lance bench-calibration solver|calibrate``: timings as JSON (solver 64 layers × 12 ε; calibration).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.calibration import (
    DEFAULT_EPS_GRID,
    BudgetError,
    CalibrationResult,
    InfeasibleBudget,
    brute_force_multiple_choice_knapsack,
    calibrate,
    solve_multiple_choice_knapsack,
)
from engine.calibration.plan import solve_plan
from engine.cli._output import fail as _fail
from engine.data.errors import DatasetMissing
from engine.models.weights import WeightsMissing
from engine.units import format_bytes

DEFAULT_TRAIN_BATCH_SIZE = 128  # FinetuneConfig.batch_size, the fine-tune default (tested equal)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="energy spectra of every compressible layer and perplexity curves of the fine-tuned ones",
        description="Calibrate a backbone on a dataset: per-mode energy spectra of every compressible layer's "
                    "input, and for the last K layers the weight-gradient error (perplexity) and bytes at each ε. "
                    "Results are cached under $LANCE_HOME/cache/calibration.",
    )
    p.add_argument("--backbone", required=True, help="e.g. mcunet-in3 (see `lance backbones`)")
    p.add_argument("--dataset", required=True, help="e.g. cifar10, digits, imagefolder:PATH (see `lance datasets`)")
    p.add_argument("--weights", default=None, help="imagenet | none | PATH (default: the backbone's default)")
    p.add_argument("--layers", default="4",
                   help="fine-tuned layers measured for perplexity: the last K compressible layers, "
                        "or 'all' (default 4)")
    p.add_argument("--eps", default=None,
                   help="comma-separated energy grid, e.g. 0.5,0.7,0.9 (default 0.40,0.45,…,0.95)")
    p.add_argument("--batches", type=int, default=2, help="calibration batches for the spectra (default 2)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="calibration batch size; bytes are for this size (default 64)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="folder holding the datasets (also LANCE_DATA_ROOT)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="draw the batches from the first N training images of each class (quick; decodes fewer images)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; 1 is often fastest on a busy shared CPU)")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    p.add_argument("--out", required=True, help="write the calibration JSON here")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=run_calibrate)

    r = subparsers.add_parser(
        "ranks",
        help="exact rank choice (one ε per fine-tuned layer) under a memory budget",
        description="Pick one ε per fine-tuned layer of a calibration minimising the summed gradient error with "
                    "the bytes stored for backward at the training batch size within the budget (exact "
                    "multiple-choice knapsack, bytes rounded up). The result is a plan for ASI and LANCE: "
                    "`lance finetune --ranks PLAN.json` trains exactly it. "
                    "Budgets: 300000 (bytes), 0.5MB (MB = 10^6 bytes), 512KiB (KiB = 2^10 bytes). "
                    "Exit status 2 when the budget is below the least total that fits.",
    )
    r.add_argument("--calibration", required=True, help="a JSON file written by `lance calibrate --out`")
    r.add_argument("--budget", required=True, help="e.g. 0.5MB, 512KiB or 300000")
    r.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN_BATCH_SIZE,
                   help=f"training batch size the plan is for (bytes are for it; default {DEFAULT_TRAIN_BATCH_SIZE}, "
                        "the fine-tune default)")
    r.add_argument("--json", default=None, help="also write the plan as JSON to this file ('-' for stdout)")
    r.set_defaults(func=run_ranks)

    b = subparsers.add_parser("bench-calibration", help="time the rank solver or a calibration; prints JSON")
    bsub = b.add_subparsers(dest="bench_what", metavar="WHAT", required=True)
    s = bsub.add_parser("solver", help="exact solver on random rank-selection-like instances")
    s.add_argument("--layers", type=int, default=64)
    s.add_argument("--eps", type=int, default=12, help="number of ε per layer")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=run_bench_solver)
    c = bsub.add_parser("calibrate", help="calibrate a backbone (no cache) and report the timings")
    c.add_argument("--backbone", default="mcunet-in3")
    c.add_argument("--dataset", default="cifar10")
    c.add_argument("--weights", default=None)
    c.add_argument("--layers", default="all")
    c.add_argument("--batches", type=int, default=2)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--resolution", type=int, default=None)
    c.add_argument("--data-root", default=None)
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    c.set_defaults(func=run_bench_calibrate)



def _parse_eps(text: str | None):
    if text is None:
        return list(DEFAULT_EPS_GRID)
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--eps must be comma-separated numbers in (0, 1], e.g. 0.5,0.7,0.9; got {text!r}") from None


def _parse_layers(text: str):
    text = str(text).strip()
    if text.lower() == "all":
        return "all"
    if text.isdigit():
        return int(text)
    raise ValueError(f"--layers must be a number K (the last K compressible layers) or 'all', got {text!r}")


def _print_calibration(result, stream) -> None:
    t = result.timing
    src = "cache" if result.from_cache else f"{t.get('total_s', t.get('spectra_s', 0)):.1f} s"
    print(f"{result.config.get('backbone')} on {result.config.get('dataset')}: {len(result.layers)} compressible "
          f"layers, {len(result.finetuned_layers)} fine-tuned, {t.get('batches')} batch(es) of "
          f"{result.batch_size} ({src})", file=stream)
    grid = result.eps_grid
    w = max([len("layer")] + [len(layer["name"]) for layer in result.layers]) + 2
    print(f"{'layer':<{w}}{'input':>20}{'ranks @ ε=' + str(grid[len(grid) // 2]):>22}"
          f"{'rel. error':>12}{'bytes':>11}", file=stream)
    j = len(grid) // 2
    for layer in result.layers:
        shape = "x".join(str(d) for d in layer["input_shape"])
        ranks = str(tuple(layer["ranks"][j]))
        rel = f"{layer['relative_perplexity'][j]:.3f}" if layer.get("relative_perplexity") else "-"
        nbytes = format_bytes(layer["bytes"][j]) if layer.get("bytes") else "-"
        print(f"{layer['name']:<{w}}{shape:>20}{ranks:>22}{rel:>12}{nbytes:>11}", file=stream)


def run_calibrate(args) -> int:
    try:
        eps_grid = _parse_eps(args.eps)
        layers = _parse_layers(args.layers)
    except ValueError as exc:
        return _fail("calibrate", str(exc))


    if args.threads:
        torch.set_num_threads(args.threads)

    def progress(stage: str, done: int, total: int) -> None:
        if not args.quiet and stage == "perplexity":
            print(f"\rperplexity {done}/{total} layers", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        result = calibrate(args.backbone, weights=args.weights, dataset=args.dataset, layers_k=layers,
                           eps_grid=eps_grid, batches=args.batches, batch_size=args.batch_size,
                           resolution=args.resolution, seed=args.seed, data_root=args.data_root,
                           use_cache=not args.no_cache, device=args.device, progress=progress,
                           max_per_class=args.max_per_class)
    except (DatasetMissing, WeightsMissing, ValueError, KeyError) as exc:
        return _fail("calibrate", str(exc).strip("'\""))
    out = Path(args.out)
    try:
        result.save(out)
    except OSError as exc:
        return _fail("calibrate", f"cannot write {out}: {exc}")
    if not args.quiet:
        _print_calibration(result, sys.stdout)
        print(f"wrote {out}", file=sys.stdout)
    return 0


def run_ranks(args) -> int:
    if args.batch_size is None or args.batch_size < 1:
        return _fail("ranks", f"--batch-size must be a whole number >= 1, got {args.batch_size}")
    try:
        calibration = CalibrationResult.load(args.calibration)
        plan = solve_plan(calibration, args.budget, args.batch_size, source="lance ranks",
                          calibration_path=args.calibration)
    except InfeasibleBudget as exc:
        if args.json:
            _write_json(args.json, {"error": str(exc), "budget_bytes": exc.budget,
                                    "min_total_bytes": exc.min_total_cost, "batch_size": args.batch_size})
        return _fail("ranks", f"{exc} (for training batches of {args.batch_size})")
    except (BudgetError, FileNotFoundError, ValueError) as exc:
        return _fail("ranks", str(exc))
    if args.json != "-":
        print(f"budget {format_bytes(plan.budget_bytes)} ({plan.budget_bytes} bytes), plan total "
              f"{plan.plan_total_bytes} bytes for training batches of {plan.batch_size} (calibrated on "
              f"batches of {calibration.batch_size}); ASI and LANCE train these ranks")
        w = max([len("total")] + [len(layer.name) for layer in plan.per_layer]) + 2
        print(f"{'layer':<{w}}{'ε':>6}{'ranks':>22}{'bytes':>12}{'perplexity':>13}{'relative':>10}")
        for layer in plan.per_layer:
            rel = f"{layer.relative_perplexity:.4f}" if layer.relative_perplexity is not None else "-"
            eps = f"{layer.eps:>6.2f}" if layer.eps is not None else f"{'-':>6}"
            print(f"{layer.name:<{w}}{eps}{str(tuple(layer.ranks['asi'])):>22}{layer.bytes['asi']:>12}"
                  f"{layer.perplexity:>13.4g}{rel:>10}")
        total_perplexity = sum(layer.perplexity or 0.0 for layer in plan.per_layer)
        print(f"{'total':<{w}}{'':>6}{'':>22}{plan.plan_total_bytes:>12}{total_perplexity:>13.4g}")
        if plan.cost_unit_bytes > 1:
            print(f"note: a hard instance; optimal for bytes rounded up to {plan.cost_unit_bytes}-byte units")
    if args.json:
        _write_json(args.json, plan.to_dict())
        if args.json != "-":
            print(f"wrote {args.json}: `lance finetune --ranks {args.json} --batch-size {plan.batch_size} …` trains it")
    return 0


def _write_json(target: str, data: dict) -> None:
    text = json.dumps(data, indent=2)
    if target == "-":
        print(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def run_bench_solver(args) -> int:


    rng = np.random.default_rng(args.seed)
    timings, fronts = [], []
    for repeat in range(args.repeats):
        costs, values = [], []
        for _ in range(args.layers):
            full = int(rng.integers(10_000, 3_000_000))
            costs.append((4 * np.ceil(np.sort(rng.random(args.eps)) * full / 4)).astype(int).tolist())
            values.append((np.sort(rng.random(args.eps))[::-1] * rng.random() * 10).tolist())
        least, most = sum(min(c) for c in costs), sum(max(c) for c in costs)
        budget = least + (repeat + 1) / (args.repeats + 1) * (most - least)
        start = time.perf_counter()
        solution = solve_multiple_choice_knapsack(costs, values, budget)
        timings.append(time.perf_counter() - start)
        fronts.append(max(solution.front_sizes))
        assert solution.total_cost <= budget
    # brute force on a small instance, for scale
    small_costs, small_values = costs[:6], values[:6]
    small_min = sum(min(c) for c in small_costs)
    small_budget = small_min + 0.5 * (sum(max(c) for c in small_costs) - small_min)
    start = time.perf_counter()
    brute = brute_force_multiple_choice_knapsack([c[:6] for c in small_costs], [v[:6] for v in small_values],
                                                 small_budget)
    brute_s = time.perf_counter() - start
    exact = solve_multiple_choice_knapsack([c[:6] for c in small_costs], [v[:6] for v in small_values], small_budget)
    print(json.dumps({
        "benchmark": "solver", "layers": args.layers, "eps": args.eps, "repeats": args.repeats,
        "seconds_median": float(np.median(timings)), "seconds_max": float(np.max(timings)),
        "max_front_size": int(max(fronts)),
        "brute_force_6x6_seconds": brute_s,
        "brute_force_6x6_matches": abs(brute.total_value - exact.total_value) < 1e-9,
    }, indent=2))
    return 0


def run_bench_calibrate(args) -> int:


    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        layers = _parse_layers(args.layers)
        result = calibrate(args.backbone, weights=args.weights, dataset=args.dataset, layers_k=layers,
                           batches=args.batches, batch_size=args.batch_size, resolution=args.resolution,
                           data_root=args.data_root, use_cache=False)
    except (DatasetMissing, WeightsMissing, ValueError) as exc:
        return _fail("bench-calibration", str(exc))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({
        "benchmark": "calibrate", "backbone": args.backbone, "dataset": args.dataset,
        "batches": args.batches, "batch_size": args.batch_size, "resolution": result.config.get("resolution"),
        "compressible_layers": len(result.layers), "finetuned_layers": len(result.finetuned_layers),
        "eps_grid_size": len(result.eps_grid), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average_1min": load, **{k: v for k, v in result.timing.items()},
    }, indent=2))
    return 0
