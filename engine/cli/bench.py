"""`lance bench layers`: every method side by side on real backbones' last four layers (JSON + table)."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (JSON): layers")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    layers = sub.add_parser(
        "layers",
        help="time / memory / gradient error of every method on the last 4 layers of MCUNet-in3, MobileNetV2, "
             "ResNet-18",
    )
    layers.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    layers.add_argument("--full-rank", action="store_true", help="every low-rank method at full rank (exactness check)")
    layers.add_argument("--batch-size", type=int, default=128)
    layers.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    layers.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    layers.add_argument("--methods", default="vanilla,gradient_filter,hosvd,asi,lance")
    layers.add_argument("--backbones", default="mcunet-in3,mobilenet_v2,resnet18",
                        help="which rows of the layer table to run")
    layers.set_defaults(func=run_layers)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_layers(args: argparse.Namespace) -> int:
    import torch

    from engine.bench import layers as L

    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be ≥ 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in L.METHOD_ORDER]
    if unknown or "vanilla" not in methods:
        print(f"error: --methods must include vanilla and may hold {', '.join(L.METHOD_ORDER)}; got {args.methods}",
              file=sys.stderr)
        return 2
    backbones = {b.strip() for b in args.backbones.split(",")}
    table = tuple(s for s in L.LAYER_TABLE if s.backbone in backbones)
    if not table or args.batch_size < 1 or args.repeats < 1:
        print("error: choose backbones from mcunet-in3,mobilenet_v2,resnet18; batch size and repeats must be ≥ 1",
              file=sys.stderr)
        return 2
    quiet = args.json == "-"

    def progress(spec, rows):
        if quiet:
            return
        for r in rows:
            print(f"{r['layer'][:44]:44s} {r['method']:15s} step {r['step_ms']:9.1f} ms  fwd {r['fwd_ms']:8.1f}"
                  f"  bwd {r['bwd_ms']:8.1f}  saved {_fmt_bytes(r['saved_bytes']):>10s}  err {r['grad_rel_error']:.2e}"
                  f"  ranks {r['ranks']}", flush=True)

    report = L.run(args.batch_size, args.repeats, args.full_rank, methods, table, progress)
    if not quiet:
        print(f"\nsummary over {len(table)} layers, batch {args.batch_size}, {torch.get_num_threads()} threads:")
        for method, s in report["summary"].items():
            print(f"  {method:15s} step x{s['step_ratio_vs_vanilla']:.3f}  memory x{s['memory_ratio_vs_vanilla']:.5f}"
                  f"  flops x{s['flops_ratio_vs_vanilla']:.3f}  max grad err {s['max_grad_rel_error']:.2e}")
    if args.json:
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 0
