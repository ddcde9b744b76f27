"""``lance continual``: task-incremental learning with LANCE, GPM or plain fine-tuning, into the run store."""
from __future__ import annotations

import sys

import torch

from engine.cli._output import fail
from engine.cli._output import write_json as _write_json
from engine.cli.validate import check_json_target
from engine.continual import METHODS
from engine.continual.learner import ContinualConfig
from engine.continual.session import ContinualRunFailed, SequenceSpec, load_tasks, resume_method, run_method
from engine.data.errors import DatasetMissing
from engine.phases import cli_phase_callback, report, reporting
from engine.store import RunStore, StoreError

BENCHMARKS = ("split-cifar10", "split-cifar100", "split-digits", "5-datasets")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "continual",
        help="continual learning on a task sequence: lance | gpm | finetune",
        description=(
            "Task-incremental continual learning (one head per task, whole backbone trained). "
            "lance: each task's feature subspace is calibrated orthogonal to the protected basis and trained "
            "with the compressed gradient; gpm: full activations, gradient projected off the protected basis; "
            "finetune: no protection. Several methods run one after another on the same tasks, class order, "
            "seed and epochs. After every task the accuracy row, ACC, BWT, forgetting, subspace usage, peak "
            "measured activation bytes and time go into the run store ($LANCE_HOME)."),
        epilog=("Example: lance continual --benchmark split-cifar10 --dataset "
                "imagefolder:../shared/datasets/cifar10-jpeg --backbone alexnet-cl --method lance,gpm,finetune "
                "--epochs 5 --limit-train 1000 --json out.json"),
    )
    p.add_argument("--benchmark", choices=BENCHMARKS, help="task sequence")
    p.add_argument("--dataset", default=None,
                   help="build the split from this dataset (any dataset with the right number of classes, "
                        "e.g. imagefolder:../shared/datasets/cifar10-jpeg)")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (also LANCE_DATA_ROOT)")
    p.add_argument("--backbone", default="alexnet-cl", help="alexnet-cl | resnet18-reduced (default alexnet-cl)")
    p.add_argument("--method", default="lance", help="lance, gpm, finetune (comma-separated: one run each)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per task (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01, GPM's for AlexNet)")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="SGD momentum (default 0). No weight decay and no Adam: they would move weights "
                        "out of the allowed subspace")
    p.add_argument("--eps", type=float, default=0.3,
                   help="LANCE: energy of the residual activations (I - P P^T) A kept by a protected layer's "
                        "feature factor in tasks >= 1 (default 0.3)")
    p.add_argument("--eps-plain", default="0.9",
                   help="LANCE: energy for factors calibrated on raw activations: every layer in task 0 and the "
                        "heads (default 0.9; 'none' = --eps)")
    p.add_argument("--spatial-eps", default="0.5",
                   help="LANCE: energy kept on a conv's output rows/columns in tasks >= 1 (task 0 and heads use "
                        "--eps-plain), or 'none' to store them uncompressed (default 0.5)")
    p.add_argument("--eps-cl", type=float, default=0.97, help="GPM basis energy threshold eps_0 (default 0.97)")
    p.add_argument("--eps-cl-step", type=float, default=0.0,
                   help="threshold increase per task: eps_cl(t) = eps_0 + t*step (Split CIFAR-100: 0.003)")
    p.add_argument("--calibration-batches", type=int, default=4,
                   help="LANCE: batches of each task's training data its factors are calibrated on (default 4)")
    p.add_argument("--calibration-batch-size", type=int, default=64,
                   help="LANCE: images per calibration batch, independent of --batch-size (default 64)")
    p.add_argument("--basis-samples", type=int, default=125,
                   help="training images per task whose activations extend the protected basis (GPM: 125)")
    p.add_argument("--compress-first-task", dest="compress_first_task", action="store_true", default=True,
                   help="LANCE: train task 0 compressed as well (default)")
    p.add_argument("--no-compress-first-task", dest="compress_first_task", action="store_false",
                   help="LANCE: train task 0 with full activations (its peak memory then equals GPM's)")
    p.add_argument("--recalibrate-every", type=int, default=0, metavar="N",
                   help="LANCE: re-fit the factors (still orthogonal to the protected basis) every N epochs of a "
                        "task, on fresh batches, so they follow the weights as they train (default 0: once per "
                        "task, before it)")
    p.add_argument("--no-pack", action="store_true",
                   help="plain autograd for ReLU/dropout/max-pool (no lossless packing): the unpacked region figure")
    p.add_argument("--seed", type=int, default=0, help="seed for class order, init, data order (default 0)")
    p.add_argument("--limit-train", type=int, default=None, help="training images per task (seeded subset)")
    p.add_argument("--limit-test", type=int, default=None, help="test images per task (seeded subset)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, metavar="OUT", help="write {\"runs\": [...]} here (- = stdout)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue RUN at the task after its last checkpoint")
    p.add_argument("--job-id", default=None, help="tag the runs with this job id (the app's job runner)")
    p.add_argument("--quiet", action="store_true", help="no per-task lines")
    p.set_defaults(func=run)


def _methods(text: str) -> list[str]:
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods:
        raise ValueError("--method is empty; give lance, gpm and/or finetune")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return methods


def spec_from_args(args):
    if not args.benchmark:
        raise ValueError(f"--benchmark is required ({' | '.join(BENCHMARKS)})")
    def number_or_none(flag: str, text) -> float | None:
        if str(text).strip().lower() == "none":
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{flag} must be a number in (0, 1] or 'none', got {text!r}") from None

    spatial = number_or_none("--spatial-eps", args.spatial_eps)
    eps_plain = number_or_none("--eps-plain", args.eps_plain)
    training = dict(epochs=args.epochs, lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
                    eps=args.eps, eps_plain=eps_plain, spatial_eps=spatial, eps_cl=args.eps_cl,
                    eps_cl_step=args.eps_cl_step,
                    calibration_batches=args.calibration_batches,
                    calibration_batch_size=args.calibration_batch_size, basis_samples=args.basis_samples,
                    compress_first_task=args.compress_first_task,
                    recalibrate_every=args.recalibrate_every, seed=args.seed, pack=not args.no_pack)
    ContinualConfig(method="lance", **training)  # validates the numbers
    return SequenceSpec(benchmark=args.benchmark, dataset=args.dataset, data_root=args.data_root,
                        backbone=args.backbone, resolution=args.resolution, limit_train=args.limit_train,
                        limit_test=args.limit_test, device=args.device, training=training)


def print_table(runs: list[dict], stream=sys.stdout) -> None:
    print(f"{'method':<10}{'ACC %':>8}{'BWT':>8}{'forget':>8}{'peak layer act':>16}{'peak region act':>17}  run",
          file=stream)
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    for r in runs:
        print(f"{r['method']:<10}{fmt(r['acc']):>8}{fmt(r['bwt']):>8}{fmt(r['forgetting']):>8}"
              f"{r['peak_layer_activation_bytes'] / 1e6:>13.3f} MB{r['peak_region_activation_bytes'] / 1e6:>14.3f} MB"
              f"  {r['run_id']}", file=stream)


def run(args) -> int:

    stream = None if args.quiet else sys.stderr
    try:
        check_json_target(args.json)
        store = RunStore()
    except (ValueError, StoreError) as exc:
        return fail("continual", str(exc))
    on_phase = cli_phase_callback(store, args.job_id, quiet=args.quiet)
    with reporting(on_phase):
        try:
            return _run(args, store, stream)
        finally:
            report("done", on_phase=on_phase)


def _run(args, store, stream) -> int:
    try:
        failures = []
        if args.resume:
            summaries = [resume_method(store, args.resume, stream=stream)]
        else:
            spec = spec_from_args(args)
            methods = _methods(args.method)
            if spec.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"--device {spec.device} asked for, but no CUDA device is available; use --device cpu")
            tasks = load_tasks(spec)
            summaries, failures = [], []
            for m in methods:  # one method failing (nan, linalg, data) does not stop the next one
                try:
                    summaries.append(run_method(store, spec, m, tasks=tasks, job_id=args.job_id, stream=stream))
                except ContinualRunFailed as exc:
                    failures.append(exc)
                    print(f"lance continual: {exc}", file=sys.stderr)
    except ContinualRunFailed as exc:  # --resume of one run
        print(f"lance continual: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lance continual: interrupted; the run is marked interrupted and can be resumed with --resume",
              file=sys.stderr)
        return 130
    except (ValueError, DatasetMissing, StoreError) as exc:
        return fail("continual", str(exc))
    if not args.quiet and summaries:
        print_table(summaries, stream=sys.stderr)
    if args.json:
        _write_json(args.json, {"runs": summaries, "failed": [
            {"run_id": f.run_id, "method": f.method, "status": "failed", "message": f.message} for f in failures]})
    return 1 if failures else 0
