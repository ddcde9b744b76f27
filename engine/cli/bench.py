"""`lance bench layers`: every method side by side on real backbones' last four layers (JSON + table)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from engine.bench import layers as L
from engine.bench import real as R
from engine.units import format_bytes


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
    layers.add_argument("--batch-sizes", default=None, metavar="B1,B2,…",
                        help="several batch sizes (e.g. 1,8,32,64,128); the JSON then holds one report per size")
    layers.add_argument("--real", action="store_true",
                        help="the real MCUNet-in3 last 4 layers with real CIFAR-10 inputs and real output gradients "
                             "(needs ../shared or $LANCE_SHARED; skipped with a message otherwise)")
    layers.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    layers.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median reported)")
    layers.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    layers.add_argument("--methods", default="vanilla,gradient_filter,hosvd,asi,lance")
    layers.add_argument("--backbones", default="mcunet-in3,mobilenet_v2,resnet18",
                        help="which rows of the layer table to run")
    layers.set_defaults(func=run_layers)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])



def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _batch_sizes(args) -> list[int] | None:
    if args.batch_sizes is None:
        return None
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers separated by commas, got {args.batch_sizes!r}")
    return sizes


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def _write(args, report: dict) -> None:
    if args.json:
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)


def _print_summary(report: dict, n_layers: int) -> None:
    cfg = report["config"]
    print(f"\nsummary over {n_layers} layers, batch {cfg['batch_size']}, {cfg['threads']} threads, {cfg['device']}:")
    for method, s in report["summary"].items():
        print(f"  {method:15s} time x{s['step_ratio_vs_vanilla']:.3f}  flops x{s['flops_ratio_vs_vanilla']:.3f}"
              f"  worst layer x{s['max_layer_time_ratio']:.2f}  memory x{s['memory_ratio_vs_vanilla']:.5f}"
              f"  max grad err {s['max_grad_rel_error']:.2e}")


def run_layers(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            return _error("--threads must be ≥ 1")
        torch.set_num_threads(args.threads)
    try:
        sizes = _batch_sizes(args)
        device = _device(args.device)
    except ValueError as exc:
        return _error(str(exc))

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in L.METHOD_ORDER]
    if unknown or "vanilla" not in methods:
        return _error(f"--methods must include vanilla and may hold {', '.join(L.METHOD_ORDER)}; got {args.methods}")
    if args.batch_size < 1 or args.repeats < 1:
        return _error("batch size and repeats must be ≥ 1")
    quiet = args.json == "-"

    inputs_fn = None
    if args.real:
        reason = R.missing_reason()
        if reason:
            print(f"skipped: --real needs the shared folder: {reason} (set LANCE_SHARED, or run without --real)",
                  file=sys.stderr)
            _write(args, {"skipped": reason})
            return 0
        real = R.RealLayers(max(sizes or [args.batch_size]), device)
        table = tuple(real.layers)
        inputs_fn = real.inputs_for
    else:
        backbones = {b.strip() for b in args.backbones.split(",")}
        table = tuple(s for s in L.LAYER_TABLE if s.backbone in backbones)
        if not table:
            return _error("choose backbones from mcunet-in3,mobilenet_v2,resnet18")

    def progress(spec, rows):
        if quiet:
            return
        for r in rows:
            print(f"{r['layer'][:44]:44s} B={r['shape'][0]:<4d} {r['method']:15s} step {r['step_ms']:9.2f} ms"
                  f"  time x{r['time_ratio_vs_vanilla']:6.3f}  flops x{r['flops_ratio_vs_vanilla']:6.3f}"
                  f"  saved {format_bytes(r['saved_bytes'], binary=True):>10s}  err {r['grad_rel_error']:.2e}"
                  f"  ranks {r['ranks']}",
                  flush=True)

    if sizes is None:
        report = L.run(args.batch_size, args.repeats, args.full_rank, methods, table, progress, device, inputs_fn)
        if not quiet:
            _print_summary(report, len(table))
    else:
        report = L.run_batch_sizes(sizes, args.repeats, args.full_rank, methods, table, progress, device, inputs_fn)
        if not quiet:
            for sub in report["by_batch_size"].values():
                _print_summary(sub, len(table))
    _write(args, report)
    return 0
