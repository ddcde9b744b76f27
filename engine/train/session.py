"""Fine-tuning runs end to end: backbone + data + feature cache -> compressed model -> loop -> store.

``run_finetune(config, ...)`` trains every method of ``config.methods`` one after another on the same
data in the same order from the same initial weights (seeded), each as its own run in the store.

The frozen-prefix feature cache: everything before the stage that holds the first trained layer is
frozen and its BatchNorms are in eval mode, so (without augmentation) it gives the same output every
epoch. It runs once per command over the train and validation sets; the methods then train the
remaining stages (``SuffixModel``) from those features. ``feature_cache=False`` runs whole images.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import engine
from engine.data import get_dataset
from engine.data import num_classes as dataset_classes
from engine.memory import StepMeter, peak_due
from engine.models import WeightsMissing, backbone_spec, build_backbone, split_at_stage, stage_of_layer
from engine.store import RunStore
from engine.surgery import compressible_layers
from engine.train import preflight
from engine.train.budget import resolve_plans
from engine.train.checkpoint import load_checkpoint, save_checkpoint
from engine.train.config import ConfigError, FinetuneConfig, validate
from engine.train.data import (
    CALIBRATION_EPOCH,
    DatasetBatches,
    frozen_features,
    seeded_subset,
)
from engine.train.events import RunEnded, emit_all
from engine.train.faults import TrainingDiverged, explain_failure, interrupt_on_sigterm
from engine.train.loop import LoopState, fit
from engine.train.provenance import provenance
from engine.train.sinks import StoreSink

WRAP = "model."
LOW_RANK_METHODS = ("hosvd", "asi", "lance")  # prefix of the full model's names inside SuffixModel


class SuffixModel(nn.Module):
    """Runs stages ``[cut:]`` of ``model``: input = output of stage ``cut - 1`` (images when cut = 0).

    ``model`` is registered as the submodule ``model``, so layer names inside are ``model.<name>``
    and ``state_dict`` holds the whole model.
    """

    def __init__(self, model: nn.Module, cut: int = 0):
        super().__init__()
        self.model = model
        self.cut = int(cut)
        self.refresh()

    def refresh(self) -> None:
        """Re-read ``model.stages()`` (after layers were swapped by compression)."""
        stages = [stage for _, stage in self.model.stages()][self.cut:]
        object.__setattr__(self, "_stages", stages)  # views of self.model, not owned twice

    def forward(self, x):
        for stage in self._stages:
            x = stage(x)
        return x


def compressible_names(model: nn.Module) -> list[str]:
    """Qualified names of every Conv2d / Linear."""
    return list(compressible_layers(model))


@dataclass
class Workbench:
    """What every method of one command shares: pristine backbone, data, the cut, the feature cache."""

    config: FinetuneConfig
    model: nn.Module                  # pristine backbone, head already replaced (seeded)
    resolution: int
    num_classes: int
    class_names: list[str] | None
    layer_names: list[str]            # trained layers, names in the full model
    cut: int                          # first stage that runs during training
    train: Callable                   # epoch -> (x, y) batches
    val: Callable                     # () -> (x, y) batches
    steps_per_epoch: int
    train_samples: int
    val_samples: int
    input_shape: list[int]            # shape of one training input (features or image)
    prepare_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "layer_names": self.layer_names,
                "resolution": self.resolution, "cut_stage": self.cut,
                "input": "features" if self.cut > 0 else "images", "input_shape": self.input_shape,
                "train_samples": self.train_samples, "val_samples": self.val_samples,
                "steps_per_epoch": self.steps_per_epoch, "prepare_s": round(self.prepare_s, 3), **self.info}


def _class_names(dataset) -> list[str] | None:
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return list(names) if names is not None else None


def load_backbone(config: FinetuneConfig):
    """(model, Backbone, trained layer names): the seeded backbone with the dataset's head.

    Fast (no data): run before anything else so missing weights or too many layers fail at once.
    Raises ConfigError (weights missing, --layers too large).
    """
    classes = int(dataset_classes(config.dataset, data_root=config.data_root))
    torch.manual_seed(config.seed)
    try:
        backbone = build_backbone(config.backbone, weights=config.weights, num_classes=classes)
    except WeightsMissing as exc:
        raise ConfigError(str(exc)) from None
    names = compressible_names(backbone.model)
    if config.layers > len(names):
        raise ConfigError(f"--layers {config.layers}: {config.backbone} has only {len(names)} compressible layers")
    return backbone.model, backbone, names[-config.layers:]


def prepare(config: FinetuneConfig, log: Callable[[str], None] = lambda s: None) -> Workbench:
    """Build the backbone (seeded head), load the data, cut the model and cache the prefix features."""
    start = time.perf_counter()
    model, backbone, layer_names = load_backbone(config)
    resolution = _resolution(config) or backbone.resolution
    train_set = get_dataset(config.dataset, split="train", resolution=resolution, mean=backbone.mean,
                            std=backbone.std, data_root=config.data_root, seed=config.seed, augment=False)
    val_set = get_dataset(config.dataset, split=config.val_split, resolution=resolution, mean=backbone.mean,
                          std=backbone.std, data_root=config.data_root, seed=config.seed, augment=False)
    class_names = _class_names(train_set)
    num_classes = backbone.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"{config.dataset}: {len(class_names)} class folders but {num_classes} classes expected")
    train_set = seeded_subset(train_set, config.limit_train, config.seed)
    val_set = seeded_subset(val_set, config.limit_val, config.seed + 1)
    cut = stage_of_layer(model, layer_names[0]) if config.feature_cache else 0
    device = config.device
    info: dict[str, Any] = {"weights_source": backbone.weights}
    if cut > 0:
        prefix, _ = split_at_stage(model, cut)
        prefix = prefix.to(device)
        log(f"frozen-prefix features (stages 0..{cut - 1}) of {len(train_set)} train and {len(val_set)} "
            f"{config.val_split} images: computing once (or reading the feature cache)")
        weights_id = backbone.weights
        subset = {"limit": config.limit_train, "subset_seed": config.seed, "data_root": config.data_root}
        train_data, s_train = frozen_features(prefix, train_set, feature_key(
            config.backbone, weights_id, config.dataset, "train", resolution, cut, **subset), device)
        val_data, s_val = frozen_features(prefix, val_set, feature_key(
            config.backbone, weights_id, config.dataset, config.val_split, resolution, cut,
            limit=config.limit_val, subset_seed=config.seed + 1, data_root=config.data_root), device)
        model.cpu()
        info["feature_cache_s"] = round(s_train + s_val, 3)
        input_shape = list(train_data[0][0].shape)
    else:
        train_data, val_data = train_set, val_set
        input_shape = list(train_set[0][0].shape)
    train = DatasetBatches(train_data, config.batch_size, seed=config.seed)
    val_source = DatasetBatches(val_data, config.batch_size, shuffle=False)
    return Workbench(config=config, model=model, resolution=resolution, num_classes=num_classes,
                     class_names=class_names, layer_names=layer_names, cut=cut, train=train,
                     val=lambda: val_source(0), steps_per_epoch=len(train), train_samples=len(train_set),
                     val_samples=len(val_set), input_shape=input_shape,
                     prepare_s=time.perf_counter() - start, info=info)


def feature_key(backbone, weights, dataset, split, resolution, cut, **extra) -> dict:
    return {"backbone": backbone, "weights": str(weights), "dataset": dataset, "split": split,
            "resolution": int(resolution), "cut": cut, **extra}


def _resolution(config: FinetuneConfig) -> int | None:
    if config.resolution is not None:
        return config.resolution

    return backbone_spec(config.backbone).resolution


# ---------------------------------------------------------------------------- one method
@dataclass
class Trainable:
    wrapper: SuffixModel
    handle: Any
    params: list[nn.Parameter]
    method_info: dict[str, Any]


def _method_options(bench: Workbench, method: str, plans: dict | None = None) -> tuple[dict, dict]:
    """(options for compress_model, info to store: the plan's ranks and source, or eps / patch)."""
    config = bench.config
    if method == "vanilla":
        return {}, {}
    if method == "gradient_filter":
        return {"patch": config.patch}, {"patch": config.patch}
    if method == "hosvd":
        eps = config.eps_for("hosvd")
        return {"eps": eps}, {"eps": eps}
    planned = (plans or {}).get(method)
    if planned is not None:  # ASI or LANCE with --ranks / --budget: exactly the plan's ranks
        return {"ranks": {WRAP + n: tuple(r) for n, r in planned.ranks.items()}}, dict(planned.info)
    if method == "asi":
        return {"ranks": None}, {}
    eps = config.eps_for("lance")
    return {"eps": eps}, {"eps": eps}


def calibration_batches(bench: Workbench, device: str) -> list:
    n = min(bench.config.calibration_batches, bench.steps_per_epoch)
    return [(x.to(device), y.to(device)) for x, y in itertools.islice(bench.train(CALIBRATION_EPOCH), n)]


def build_trainable(bench: Workbench, method: str, plans: dict | None = None) -> Trainable:
    """A fresh copy of the pristine model, cut at ``bench.cut`` and compressed with ``method``
    (ASI/LANCE at the ranks of ``plans[method]`` when given: engine.train.budget.resolve_plans)."""
    config = bench.config
    torch.manual_seed(config.seed)
    model = copy.deepcopy(bench.model).to(config.device)
    wrapper = SuffixModel(model, bench.cut)
    options, info = _method_options(bench, method, plans)
    kwargs: dict[str, Any] = {}
    if method == "lance":
        batches = calibration_batches(bench, config.device)
        kwargs = {"calibration_loader": batches, "calibration_batches": len(batches)}
        info["calibration_batches"] = len(batches)
    handle = engine.compress_model(wrapper, method, layers=[WRAP + n for n in bench.layer_names],
                                   options=options, pack=config.pack, **kwargs)
    wrapper.refresh()
    params = [p for p in wrapper.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad after compression")
    info["trained_parameters"] = sum(p.numel() for p in params)
    info["ranks"] = {name[len(WRAP):] if name.startswith(WRAP) else name: _jsonable(_layer_ranks(layer))
                     for name, layer in handle.layers.items()}
    return Trainable(wrapper=wrapper, handle=handle, params=params, method_info=info)


def _layer_ranks(layer) -> Any:
    """Fixed ranks known before training (ASI, LANCE), else None."""
    method = getattr(layer, "method", None)
    for attr in ("ranks", "fixed_ranks"):
        value = getattr(method, attr, None)
        if value is not None and not callable(value):
            return value
    return None


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class EngineProbe:
    """Per step: saved bytes (measured, both figures), analytic bytes, FLOPs, ranks, captured energy."""

    def __init__(self, trainable: Trainable, device: str = "cpu", steps_done: int = 0):
        self.wrapper = trainable.wrapper
        self.handle = trainable.handle
        self.method = trainable.handle.method
        self.device = device
        self._meter_cls = StepMeter
        self._steps = steps_done  # a resumed run listed its saved tensors at its own step 1

    def measure(self):
        """Saved bytes every step; the measured peak memory on the steps :func:`engine.memory.peak_due` picks;
        the first step also lists saved tensors by op."""
        self._steps += 1
        return self._meter_cls(self.wrapper, self.device, record_ops=self._steps == 1,
                               measure_peak=peak_due(self._steps - 1, self.device))

    def metrics(self, meter) -> dict[str, float]:
        out = {"layer_activation_bytes": float(meter.layer_activation_bytes),
               "region_activation_bytes": float(meter.region_activation_bytes)}
        peak = getattr(meter, "peak_memory_bytes", None)
        if peak is not None:
            out["peak_memory_bytes"] = float(peak)
        for row in getattr(meter, "saved_ops", None) or []:
            out[f"saved_op/{row['op']}"] = float(row["bytes"])
        analytic, flops = 0.0, 0.0
        has_flops = False
        for name, layer in self.handle.layers.items():
            short = name[len(WRAP):] if name.startswith(WRAP) else name
            stats = getattr(layer, "last_stats", None) or {}
            analytic += float(stats.get("analytic_bytes") or 0)
            layer_flops = stats.get("flops")
            if isinstance(layer_flops, dict):
                flops += float(sum(v for v in layer_flops.values() if v is not None))
                has_flops = True
            elif layer_flops is not None:
                flops += float(layer_flops)
                has_flops = True
            ranks = stats.get("ranks")
            if ranks is not None and self.method in LOW_RANK_METHODS:
                for mode, rank in enumerate(_jsonable(ranks)):
                    if rank is not None:
                        out[f"rank/{short}/{mode}"] = float(rank)
            energy = stats.get("captured_energy")
            if energy is not None:
                out[f"captured_energy/{short}"] = float(energy)
        out["analytic_activation_bytes"] = analytic
        if has_flops:
            out["flops"] = flops
        return out


# ---------------------------------------------------------------------------- summaries
def summarize(rows: list[dict]) -> dict[str, Any]:
    """Run summary from its long-format metric rows (store.metrics(run_id)).

    Bytes: peak over steps (and mean); step_ms: median; flops: median per step; accuracies: percent,
    last epoch (``val_acc``) and best epoch (``best_val_acc``).
    """
    steps = [r for r in rows if r["split"] == "train" and r["epoch"] is not None]
    series: dict[str, list[float]] = {}
    last_step_values: dict[str, float] = {}
    last_step = max((r["step"] for r in steps if r["step"] is not None), default=None)
    for r in steps:
        if r["value"] is None:
            continue
        series.setdefault(r["key"], []).append(r["value"])
        if r["step"] == last_step:
            last_step_values[r["key"]] = r["value"]
    val_acc = [r["value"] for r in rows if r["split"] == "val" and r["key"] == "acc"]
    val_loss = [r["value"] for r in rows if r["split"] == "val" and r["key"] == "loss"]
    epoch_ms = series.get("epoch_ms", [])
    summary: dict[str, Any] = {
        "val_acc": val_acc[-1] if val_acc else None,
        "best_val_acc": max(val_acc) if val_acc else None,
        "val_loss": val_loss[-1] if val_loss else None,
        "epochs_done": len(epoch_ms),
        "steps": last_step or 0,
    }
    train_epoch_acc = [r["value"] for r in rows if r["split"] == "train" and r["key"] == "acc"
                       and r["step"] is not None and _is_epoch_row(r, rows)]
    if train_epoch_acc:
        summary["train_acc"] = train_epoch_acc[-1]
    for key in ("layer_activation_bytes", "region_activation_bytes", "analytic_activation_bytes",
                "peak_memory_bytes"):
        values = series.get(key)
        summary[key] = max(values) if values else None
        summary[key + "_mean"] = statistics.fmean(values) if values else None
    summary["step_ms"] = statistics.median(series["step_ms"]) if series.get("step_ms") else None
    summary["flops"] = statistics.median(series["flops"]) if series.get("flops") else None
    summary["epoch_ms"] = statistics.median(epoch_ms) if epoch_ms else None
    summary["loss"] = series["loss"][-1] if series.get("loss") else None
    ranks: dict[str, dict[int, float]] = {}
    ranks_mean: dict[str, dict[int, float]] = {}
    energy: dict[str, float] = {}
    for key, values in series.items():
        if key.startswith("rank/"):
            layer, mode = key[5:].rsplit("/", 1)
            if key in last_step_values:
                ranks.setdefault(layer, {})[int(mode)] = int(last_step_values[key])
            ranks_mean.setdefault(layer, {})[int(mode)] = statistics.fmean(values)
        elif key.startswith("saved_op/"):  # what the region saves, by grad_fn, at the first step
            summary.setdefault("saved_by_op", {})[key[len("saved_op/"):]] = int(values[0])
        elif key.startswith("captured_energy/"):
            energy[key[len("captured_energy/"):]] = statistics.fmean(values[-max(1, len(values) // 4):])
    if ranks:
        summary["ranks"] = {layer: [modes[m] for m in sorted(modes)] for layer, modes in ranks.items()}
        summary["ranks_mean"] = {layer: [round(modes[m], 3) for m in sorted(modes)]
                                 for layer, modes in ranks_mean.items()}
    if energy:
        summary["captured_energy"] = energy
    return summary


def _is_epoch_row(row: dict, rows: list[dict]) -> bool:
    """Epoch-level train rows are those written together with an ``epoch_ms`` row of the same step."""
    return any(r["key"] == "epoch_ms" and r["step"] == row["step"] and r["split"] == "train" for r in rows)


# ---------------------------------------------------------------------------- runs
@dataclass
class RunResult:
    run_id: str
    method: str
    status: str
    message: str | None
    summary: dict[str, Any]
    bad_argument: bool = False  # failed because of an argument only checkable during setup

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "method": self.method, "status": self.status, "message": self.message,
                **self.summary}


def _frozen_config(config: FinetuneConfig, method: str) -> dict[str, Any]:
    data = config.to_dict()
    data["methods_in_command"] = list(config.methods)
    data["methods"] = [method]
    data["method"] = method
    data["method_options"] = config.method_config(method)
    data["provenance"] = provenance(config.device)
    return data


def _finish(store, run_id: str, sinks: list, status: str, message: str | None,
            extra: dict[str, Any] | None = None) -> RunResult:
    summary = summarize(store.metrics(run_id))
    summary.update(extra or {})
    summary["status"] = status
    method = store.get_run(run_id)["method"]
    emit_all(sinks, RunEnded(status=status, message=message, summary=summary, method=method))
    return RunResult(run_id, method, status, message, summary)


def _train_method(bench: Workbench, method: str, run_id: str, store, sinks: list,
                  resume: bool = False, plans: dict | None = None) -> RunResult:
    config = bench.config
    trainable = build_trainable(bench, method, plans)
    store.update_config(run_id, {"method_info": _jsonable(trainable.method_info)})
    optimizer = torch.optim.SGD(trainable.params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    state = LoopState()
    checkpoint_path = store.checkpoint_path(run_id)
    if resume:
        ckpt = load_checkpoint(checkpoint_path)
        trainable.wrapper.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.T_max = config.epochs
        torch.set_rng_state(ckpt["torch_rng"])
        state = LoopState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]))
        store.truncate_metrics(run_id, state.step)

    def on_epoch_end(loop_state: LoopState) -> None:
        plain = copy.deepcopy(trainable.wrapper.model)

        engine.restore_model(plain)
        save_checkpoint(checkpoint_path, {
            "method": method, "epoch": loop_state.epoch, "step": loop_state.step,
            "model": trainable.wrapper.state_dict(), "plain_model": plain.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "layers": bench.layer_names,
            "num_classes": bench.num_classes, "class_names": bench.class_names,
            "backbone": config.backbone, "weights": config.weights,
        })

    handle = trainable.handle
    train_mode = handle.train_mode
    fit(trainable.wrapper, optimizer, bench.train, epochs=config.epochs, steps_per_epoch=bench.steps_per_epoch,
        sinks=sinks, method=method, val_batches=bench.val, scheduler=scheduler, grad_clip=config.grad_clip,
        probe=EngineProbe(trainable, config.device, state.step), train_mode=train_mode, on_epoch_end=on_epoch_end,
        state=state,
        device=config.device, config=config.method_config(method))
    return _finish(store, run_id, sinks, "completed", None, _plan_summary(trainable.method_info))


def _plan_summary(info: dict) -> dict:
    """The run summary's extra keys: ``method_info`` and, for a planned run, ``plan_total_bytes``."""
    out: dict[str, Any] = {"method_info": _jsonable(info)}
    for key in ("plan_total_bytes", "plan_source", "budget_bytes"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


def run_finetune(config: FinetuneConfig, store=None, sinks: list | None = None, job_id: str | None = None,
                 log: Callable[[str], None] = lambda s: None, resume_run: str | None = None,
                 bench: Workbench | None = None) -> list[RunResult]:
    """Train every method of ``config`` (or continue ``resume_run``); returns one result per run.

    Statuses: completed; failed (diverged loss, an error: the message says why); interrupted
    (Ctrl-C / SIGTERM: every metric so far is kept, the remaining methods do not start).
    Raises ConfigError for bad arguments found before any run is created (among them a plan that does
    not match the run and an infeasible budget: ``engine.train.budget.resolve_plans``); one found only
    during a run's setup fails that run (``bad_argument``).
    """
    validate(config)
    store = store or RunStore()
    if bench is None:  # weights present, --layers possible, patch fits, data sane: fail before any run exists
        model, backbone, layer_names = load_backbone(config)
        resolution = _resolution(config) or backbone.resolution
        preflight.check_patch(config, model, layer_names, resolution)
        preflight.check_data(config, resolution, backbone.mean, backbone.std)
    else:
        layer_names, resolution = bench.layer_names, bench.resolution
    # plans (--ranks / --budget): a mismatched plan or an infeasible budget creates no run
    plans = resolve_plans(config, layer_names, resolution, log)
    extra_sinks = list(sinks or [])
    results: list[RunResult] = []
    if resume_run is not None:
        order = [(config.methods[0], resume_run)]
    else:
        order = [(m, None) for m in config.methods]
    for method, existing in order:
        if existing is None:
            run_id = store.create_run(kind="finetune", method=method, config=_frozen_config(config, method),
                                      job_id=job_id)
        else:
            run_id = existing
            store.claim_run(run_id, job_id=job_id)
            if store.get_run(run_id)["config"].get("epochs") != config.epochs:
                store.update_config(run_id, {"epochs": config.epochs})  # the stored config says what ran
        run_sinks = [StoreSink(store, run_id), *extra_sinks]
        log(f"[{method}] run {run_id}")
        try:
            with interrupt_on_sigterm():
                if bench is None:
                    bench = prepare(config, log)
                store.update_config(run_id, bench.describe())
                if method in plans and plans[method].plan is not None:
                    plans[method].plan.save(store.run_dir(run_id) / "plan.json")
                results.append(_train_method(bench, method, run_id, store, run_sinks, resume=existing is not None,
                                             plans=plans))
        except TrainingDiverged as exc:
            results.append(_finish_safely(store, run_id, run_sinks, "failed", str(exc), method, log))
        except KeyboardInterrupt as exc:
            step = store.last_step(run_id)
            reason = str(exc) or "stopped by Ctrl-C"
            where = f"at step {step}" if step else "during setup, before the first step"
            if store.checkpoint_path(run_id).is_file():
                hint = f"`lance finetune --resume {run_id}` continues from the last finished epoch"
            else:
                hint = "no epoch had finished, so there is no checkpoint to resume from"
            message = f"{reason} {where}; every metric so far is kept; {hint}"
            results.append(_finish_safely(store, run_id, run_sinks, "interrupted", message, method, log))
            break
        except ConfigError as exc:  # found only now (e.g. an infeasible budget): this run fails, go on
            result = _finish_safely(store, run_id, run_sinks, "failed", str(exc), method, log)
            result.bad_argument = True
            results.append(result)
        except Exception as exc:  # noqa: BLE001 - a crash fails this run, the next method still runs
            if os.environ.get("LANCE_DEBUG"):
                log(traceback.format_exc())
            message = explain_failure(exc, lr=config.lr, method=method)
            results.append(_finish_safely(store, run_id, run_sinks, "failed", message, method, log))
    return results


def _finish_safely(store, run_id: str, sinks: list, status: str, message: str, method: str,
                   log: Callable[[str], None]) -> RunResult:
    """``_finish``, but a store that cannot be written (disk full, read-only) never hides ``message``:
    the result keeps the run's own cause plus the store's, and both are logged."""
    try:
        return _finish(store, run_id, sinks, status, message)
    except Exception as store_exc:  # noqa: BLE001 - the failure handler must not fail
        full = f"{message}; the run store could not record this: {store_exc}"
        log(f"[{method}] run {run_id} {status}: {full}")
        try:
            summary = summarize(store.metrics(run_id))
        except Exception:  # noqa: BLE001
            summary = {}
        summary["status"] = status
        return RunResult(run_id, method, status, full, summary)


def resume_config(store, run_id: str, epochs: int | None = None) -> FinetuneConfig:
    """The stored config of ``run_id`` (optionally with more epochs), for ``--resume``."""
    run = store.find_run(run_id)
    if run["kind"] != "finetune":
        raise ConfigError(f"run {run['id']} is a {run['kind']} run; --resume continues fine-tuning runs")
    config = FinetuneConfig.from_dict(run["config"])
    config.methods = [run["method"]]
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"--epochs must be a whole number >= 1, got {epochs!r}")
        config.epochs = epochs
    if run["status"] == "running":
        raise ConfigError(f"run {run['id']} is still running (pid {run['pid']}); stop it first")
    if run["status"] == "completed" and (run.get("summary") or {}).get("epochs_done", 0) >= config.epochs:
        raise ConfigError(f"run {run['id']} already completed its {config.epochs} epochs; "
                          "give --epochs N with a larger N to train it further")
    if not (store.checkpoint_path(run["id"])).is_file():
        raise ConfigError(f"run {run['id']} has no checkpoint (it stopped before its first epoch ended); "
                          "start a new run instead")
    ckpt = load_checkpoint(store.checkpoint_path(run["id"]))  # refuses a foreign or planted file up front
    done = int(ckpt.get("epoch", 0))
    if config.epochs <= done:
        stored = int(run["config"].get("epochs", config.epochs))
        raise ConfigError(f"run {run['id']} has finished {done} of its {stored} epochs; --epochs {config.epochs} "
                          f"would train none. Give --epochs N with N > {done} (or leave it out to finish the "
                          f"stored {stored})")
    return config


def summary_for_json(results: list[RunResult]) -> dict[str, Any]:
    return {"runs": [r.to_json() for r in results]}


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
