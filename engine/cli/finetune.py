"""``lance finetune`` and ``lance evaluate``: fine-tuning runs into the run store, and evaluating them."""
from __future__ import annotations

import os
import sys

from engine.cli._output import fail as _fail
from engine.cli._output import write_json as _write_json
from engine.cli.validate import check_json_target, check_not_empty
from engine.data.decode import SKIP_BAD_IMAGES_ENV
from engine.data.errors import BadImage, DatasetMissing
from engine.phases import cli_phase_callback, report, reporting
from engine.store import RunStore, StoreDamaged, StoreError, StoreReadOnly, StoreUnavailable
from engine.train.config import (
    BUDGET_METHODS,
    DEFAULT_BACKBONE,
    DEFAULT_DATASET,
    EPS_METHODS,
    RANKS_METHODS,
    ConfigError,
    FinetuneConfig,
    per_method,
    split_methods,
    validate,
)
from engine.train.evaluate import evaluate_run
from engine.train.resume import resume_config
from engine.train.session import run_finetune
from engine.train.sinks import ProgressSink
from engine.train.summary import summary_for_json
from engine.units import format_bytes

METHODS_HELP = "vanilla, gradient_filter, hosvd, asi, lance (comma-separated: run one after another)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the last k layers of a backbone with one or several methods",
        description=(
            "Fine-tune the last K compressible layers (head included) of a backbone with the papers' recipe "
            "(SGD lr 0.05, momentum 0, cosine schedule, weight decay 1e-4, gradient clipping 2.0, batch 128, "
            "BatchNorm in eval). Several methods run one after another on identical data order and seed. "
            "Every run goes into the run store ($LANCE_HOME); --json writes a summary."),
        epilog=("Per-method values: --eps 0.8 applies to every method that takes it; --eps hosvd=0.8,lance=0.95 "
                "sets each. Example: lance finetune --backbone mcunet-in3 --dataset "
                "imagefolder:../shared/datasets/cifar10-jpeg --method vanilla,asi,lance --layers 4 "
                "--budget asi=0.2MB --eps lance=0.7 --epochs 3 --limit-train 5000 --json out.json"),
    )
    p.add_argument("--backbone", default=None,
                   help="backbone name, see `lance backbones` (default small-cnn-digits: bundled, pretrained on "
                        "digits 0-4)")
    p.add_argument("--weights", default=None,
                   help="imagenet | bundled | none | PATH (default: the backbone's own: bundled for small-cnn-digits, "
                        "imagenet where it has ImageNet weights, else none)")
    p.add_argument("--dataset", default=None,
                   help="dataset name, see `lance datasets`, or imagefolder:PATH (default digits-5to9: bundled)")
    p.add_argument("--method", default="vanilla", help=METHODS_HELP)
    p.add_argument("--layers", type=int, default=4, help="train the last K compressible layers (default 4)")
    p.add_argument("--budget", default=None,
                   help="activation memory budget of the trained layers for ASI and LANCE, e.g. 0.5MB, 512KiB, "
                        "300000: solved at --batch-size on --calibration CALIB.json, or on one calibration with "
                        "`lance calibrate`'s defaults; asi=X,lance=Y sets each")
    p.add_argument("--calibration", default=None, metavar="CALIB.json",
                   help="with --budget: the `lance calibrate --out` file to solve the budget on")
    p.add_argument("--eps", default=None, help="energy threshold in (0, 1] for hosvd (0.8) and lance (0.95)")
    p.add_argument("--ranks", default=None, metavar="PLAN.json",
                   help="train this plan's ranks with asi and lance (`lance ranks --json PLAN.json` output; "
                        "refused unless its backbone, layers and batch size match the run), or a plain "
                        "{layer: [ranks]} file")
    p.add_argument("--patch", type=int, default=2, help="gradient filter patch size R (default 2)")
    p.add_argument("--calibration-batches", type=int, default=100, help="LANCE calibration batches N (default 100)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10; with --resume: the stored number)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=2.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None, help="use N training images (seeded subset)")
    p.add_argument("--limit-val", type=int, default=None, help="use N validation images (seeded subset)")
    p.add_argument("--val-split", default="val", choices=["val", "test"],
                   help="evaluate after each epoch on the held-out part of train (val) or the test split")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-root", default=None, help="folder holding the datasets (also LANCE_DATA_ROOT)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW everywhere (default: channels_last where it measured faster on CPU: the "
                        "frozen prefix of the feature cache; trained layers stay NCHW; docs/speed.md)")
    p.add_argument("--no-pack", action="store_true",
                   help="plain autograd for the rest of the region (no lossless packing of BatchNorm, "
                        "ReLU/ReLU6 masks, pooling): the unpacked region figure")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="run whole images every step instead of caching the frozen prefix's outputs once")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary {\"runs\": [...]} here (- = stdout)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue RUN from its last finished epoch")
    p.add_argument("--job-id", default=None, help="tag the runs with this job id (the app's job runner)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable (truncated, corrupt) images out, with a count, instead of stopping")
    p.set_defaults(func=run)

    e = subparsers.add_parser(
        "evaluate",
        help="accuracy of a stored fine-tuning run on a dataset with the same classes",
        description="Load RUN's last checkpoint and measure top-1 accuracy (percent) on a dataset split.",
    )
    e.add_argument("--run", required=True, help="run id (or an unambiguous prefix)")
    e.add_argument("--dataset", required=True, help="dataset name or imagefolder:PATH (same classes as the run)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data-root", default=None)
    e.add_argument("--limit", type=int, default=None, help="evaluate N images (seeded subset)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", default=None, metavar="OUT", help="write {run_id, dataset, split, accuracy, ...}")
    e.set_defaults(func=run_evaluate)



def config_from_args(args):
    """FinetuneConfig from parsed arguments (raises ConfigError)."""

    methods = split_methods(args.method)
    return FinetuneConfig(
        backbone=args.backbone or DEFAULT_BACKBONE, dataset=args.dataset or DEFAULT_DATASET, methods=methods,
        weights=args.weights, layers=args.layers,
        eps=per_method(args.eps, methods, EPS_METHODS, "--eps"),
        budget=per_method(args.budget, methods, BUDGET_METHODS, "--budget"),
        ranks=per_method(args.ranks, methods, RANKS_METHODS, "--ranks"),
        calibration=args.calibration,
        patch=args.patch, calibration_batches=args.calibration_batches,
        epochs=10 if args.epochs is None else args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
        limit_train=args.limit_train, limit_val=args.limit_val, val_split=args.val_split, device=args.device,
        data_root=args.data_root, feature_cache=not args.no_feature_cache, resolution=args.resolution,
        pack=not args.no_pack,
        channels_last=not args.no_channels_last,
    )


def print_table(results, stream=None) -> None:
    stream = stream or sys.stdout
    header = (f"{'method':<16}{'status':<12}{'val acc %':>10}{'layer act':>11}{'region act':>12}"
              f"{'analytic':>11}{'step ms':>9}{'MFLOP/step':>12}  run")
    print(header, file=stream)
    for r in results:
        s = r.summary
        acc = f"{s['val_acc']:.2f}" if s.get("val_acc") is not None else "-"
        step = f"{s['step_ms']:.1f}" if s.get("step_ms") is not None else "-"
        flops = f"{s['flops'] / 1e6:.1f}" if s.get("flops") is not None else "-"
        print(f"{r.method:<16}{r.status:<12}{acc:>10}{format_bytes(s.get('layer_activation_bytes')):>11}"
              f"{format_bytes(s.get('region_activation_bytes')):>12}{format_bytes(s.get('analytic_activation_bytes')):>11}"
              f"{step:>9}{flops:>12}  {r.run_id}", file=stream)


def run(args) -> int:

    if getattr(args, "skip_bad_images", False):
        os.environ[SKIP_BAD_IMAGES_ENV] = "1"
    try:
        check_not_empty(args, ("backbone", "dataset", "method", "budget", "eps", "ranks", "weights", "resume"))
        check_json_target(args.json)
        store = RunStore()
        if args.resume:
            config = resume_config(store, args.resume, epochs=args.epochs)
            resume_id = store.find_run(args.resume)["id"]
        else:
            config = config_from_args(args)
            resume_id = None

        validate(config)
    except (StoreDamaged, StoreReadOnly, StoreUnavailable) as exc:  # the store failed, not the input
        return _fail("finetune", str(exc), code=1)
    except (ConfigError, StoreError, DatasetMissing) as exc:
        return _fail("finetune", str(exc))

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    results = []
    on_phase = cli_phase_callback(store, args.job_id, quiet=args.quiet)
    try:
        with reporting(on_phase):
            results = run_finetune(config, store=store, sinks=[ProgressSink(disable=True if args.quiet else None)],
                                   job_id=args.job_id, log=log, resume_run=resume_id)
    except (ConfigError, DatasetMissing, BadImage) as exc:
        code = _fail("finetune", str(exc))
        if args.json:
            _write_json(args.json, {"runs": [], "error": str(exc)})
        return code
    except StoreError as exc:  # the store could not be written (disk full, read-only): a failure, exit 1
        return _fail("finetune", str(exc), code=1)
    finally:
        report("done", on_phase=on_phase)
        if args.json and results:
            _write_json(args.json, summary_for_json(results))
    if results:
        print_table(results)
        for r in results:  # a planned run: what the plan promised beside what was measured
            s = r.summary
            if s.get("plan_total_bytes") is not None:
                print(f"[{r.method}] plan ({s.get('plan_source')}): {s['plan_total_bytes']} layer bytes "
                      f"(budget {s.get('budget_bytes')}), measured peak {s.get('layer_activation_bytes'):.0f}")
    for r in results:
        if r.status != "completed" and r.message:
            print(f"[{r.method}] {r.status}: {r.message}", file=sys.stderr)
    if any(r.status == "interrupted" for r in results):
        return 130
    if any(r.bad_argument for r in results):
        return 2
    if any(r.status == "failed" for r in results):
        return 1
    return 0


def run_evaluate(args) -> int:
    try:
        result = evaluate_run(RunStore(), args.run, args.dataset, split=args.split, data_root=args.data_root,
                              limit=args.limit, batch_size=args.batch_size, device=args.device)
    except (ConfigError, StoreError, DatasetMissing, FileNotFoundError) as exc:
        return _fail("evaluate", str(exc))
    print(f"run {result['run_id']} ({result['method']}) on {result['dataset']} [{result['split']}]: "
          f"accuracy {result['accuracy']:.2f}% over {result['samples']} images, loss {result['loss']:.4f}")
    if args.json:
        _write_json(args.json, result)
    return 0
