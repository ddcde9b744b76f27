"""Fine-tuning configuration: the papers' recipe as defaults, and validation before any work.

Recipe (ASI / HOSVD_ε papers, classification): SGD, lr 0.05, momentum 0, weight decay 1e-4,
cosine schedule over the epochs (stepped per epoch), gradient clipping at norm 2.0, batch 128,
BatchNorm in eval mode, the last k compressible layers (the head included) trained.

Per-method settings (``--eps``, ``--budget``, ``--ranks``) are either one value for every method that
takes it, or ``method=value`` pairs separated by commas: ``--eps hosvd=0.8,lance=0.95``. ``--budget`` and
``--ranks`` give ASI and LANCE a plan (engine.calibration.plan; resolved by engine.train.budget);
``--calibration CALIB.json`` names the calibration a ``--budget`` is solved on.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.calibration.budget import BudgetError, parse_budget
from engine.calibration.plan import Plan, PlanError
from engine.data import DatasetMissing, available_datasets, locate
from engine.models import available_backbones, bundled_weights

METHODS = ("vanilla", "gradient_filter", "hosvd", "asi", "lance")
# LANCE 0.95 (was 0.7): on the default (small-cnn-digits -> digits-5to9) ε 0.7 keeps ~1 direction per mode
# and lands 16 points below vanilla, ε 0.9 5.6 below, ε 0.95 1.1 below at 52x fewer layer bytes (docs/finetune.md)
DEFAULT_EPS = {"hosvd": 0.8, "lance": 0.95}
DEFAULT_BACKBONE = "small-cnn-digits"   # bundled weights: pretrained on digits 0-4 (engine.models.pretrain_default)
DEFAULT_DATASET = "digits-5to9"         # bundled: the five digits the default backbone never saw
EPS_METHODS = ("hosvd", "lance")
BUDGET_METHODS = ("asi", "lance")
RANKS_METHODS = ("asi", "lance")


class ConfigError(ValueError):
    """A bad fine-tuning argument; the message says what is wrong and what to do."""


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (stored frozen in the run's config.json)."""

    backbone: str
    dataset: str
    methods: list[str]
    weights: str | None = None           # imagenet | none | PATH; None: the backbone's default
    layers: int = 4                       # last k compressible layers trained (head included)
    eps: dict[str, float] = field(default_factory=dict)        # method -> energy threshold
    budget: dict[str, str] = field(default_factory=dict)       # method -> budget string ("0.5MB")
    ranks: dict[str, str] = field(default_factory=dict)        # method -> plan (or ranks mapping) JSON file
    calibration: str | None = None        # --budget: solve on this `lance calibrate` file (None: calibrate once)
    patch: int = 2                        # gradient filter patch size R
    calibration_batches: int = 100        # LANCE: N calibration batches (paper: 100)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    seed: int = 0
    limit_train: int | None = None
    limit_val: int | None = None
    val_split: str = "val"
    device: str = "cpu"
    data_root: str | None = None
    feature_cache: bool = True
    resolution: int | None = None         # None: the backbone's native resolution
    pack: bool = True                     # lossless packing of the region's BN/ReLU/pool saves (engine.packing)
    channels_last: bool = True            # channels_last where it is faster (CPU: the feature cache's prefix)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def eps_for(self, method: str) -> float | None:
        if method not in EPS_METHODS:
            return None
        return float(self.eps.get(method, DEFAULT_EPS[method]))

    def method_config(self, method: str) -> dict[str, Any]:
        """The settings of one method as stored with its run."""
        out: dict[str, Any] = {"method": method}
        if method == "gradient_filter":
            out["patch"] = self.patch
        if method in ("hosvd",):
            out["eps"] = self.eps_for(method)
        if method in ("asi", "lance"):
            if method in self.ranks:
                out["ranks_file"] = self.ranks[method]
            elif method in self.budget:
                out["budget"] = self.budget[method]
                out["calibration_file"] = self.calibration
            elif method == "lance":
                out["eps"] = self.eps_for(method)
        if method == "lance":
            out["calibration_batches"] = self.calibration_batches
        return out


def split_methods(text: str) -> list[str]:
    return [m.strip() for m in str(text).split(",") if m.strip()]


def per_method(text: str | None, methods: list[str], applies_to: tuple[str, ...], option: str) -> dict[str, str]:
    """``"0.8"`` -> that value for every method in ``methods ∩ applies_to``;
    ``"hosvd=0.8,lance=0.7"`` -> per method. Raises ConfigError on a method that does not take it."""
    if text is None or str(text).strip() == "":
        return {}
    text = str(text)
    takers = [m for m in methods if m in applies_to]
    if "=" not in text:
        if not takers:
            raise ConfigError(f"{option} applies to {', '.join(applies_to)}, none of which runs here "
                              f"(--method {','.join(methods)})")
        return {m: text.strip() for m in takers}
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"{option} {text!r}: write one value, or method=value pairs like "
                              f"{applies_to[0]}=...,{applies_to[-1]}=...")
        method, value = (s.strip() for s in part.split("=", 1))
        if method not in applies_to:
            raise ConfigError(f"{option} does not apply to {method!r}; it applies to {', '.join(applies_to)}")
        if method not in methods:
            raise ConfigError(f"{option} gives a value for {method!r}, which is not in --method {','.join(methods)}")
        out[method] = value
    return out


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def validate(config: FinetuneConfig, *, check_data: bool = True) -> FinetuneConfig:
    """Check every setting before any work; raise ``ConfigError`` with the reason. Returns ``config``.

    Checks: known methods (no duplicates), backbone and dataset names, weights path, eps in (0, 1],
    budgets readable, ranks files readable, counts >= 1, rates > 0, device available.
    """
    if not config.methods:
        raise ConfigError("--method is empty; give one or more of " + ", ".join(METHODS))
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if len(set(config.methods)) != len(config.methods):
        raise ConfigError(f"--method lists a method twice: {','.join(config.methods)}")

    _check_positive_int("--layers", config.layers)
    _check_positive_int("--epochs", config.epochs)
    _check_positive_int("--batch-size", config.batch_size)
    _check_positive_int("--limit-train", config.limit_train, allow_none=True)
    _check_positive_int("--limit-val", config.limit_val, allow_none=True)
    _check_positive_int("--patch", config.patch)
    _check_positive_int("--calibration-batches", config.calibration_batches)
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f"--seed must be a whole number >= 0, got {config.seed!r}")
    if not (config.lr > 0 and config.lr < float("inf")):
        raise ConfigError(f"--lr must be > 0, got {config.lr}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.grad_clip is not None and config.grad_clip < 0:
        raise ConfigError(f"--grad-clip must be >= 0 (0: no clipping), got {config.grad_clip}")
    if config.resolution is not None:
        _check_positive_int("--resolution", config.resolution)
    if config.val_split not in ("val", "test"):
        raise ConfigError(f"--val-split must be val or test, got {config.val_split!r}")

    for method, value in config.eps.items():
        if method not in EPS_METHODS:
            raise ConfigError(f"--eps does not apply to {method}; it sets {', '.join(EPS_METHODS)}")
        try:
            eps = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--eps for {method} must be a number in (0, 1], got {value!r}") from None
        if not 0 < eps <= 1:
            raise ConfigError(f"--eps for {method} must be in (0, 1], got {eps}")
        config.eps[method] = eps

    for method, value in config.budget.items():
        if method not in BUDGET_METHODS:
            raise ConfigError(f"--budget does not apply to {method}; it sets the ranks of {', '.join(BUDGET_METHODS)}")

        try:
            if parse_budget(value) <= 0:
                raise ConfigError(f"--budget for {method} must be more than 0 bytes, got {value!r}")
        except BudgetError as exc:
            raise ConfigError(f"--budget for {method}: {exc}") from None
    for method in config.ranks:
        if method not in RANKS_METHODS:
            raise ConfigError(f"--ranks does not apply to {method}; it sets {', '.join(RANKS_METHODS)}")
        if method in config.budget:
            raise ConfigError(f"give either --budget or --ranks for {method}, not both")
        load_ranks_file(config.ranks[method])
    if "lance" in config.budget and "lance" in config.eps:
        raise ConfigError("give either --budget or --eps for lance, not both")
    if "lance" in config.ranks and "lance" in config.eps:
        raise ConfigError("give either --ranks or --eps for lance, not both")
    if config.calibration is not None:
        if not config.budget:
            raise ConfigError("--calibration names the calibration a --budget is solved on; give --budget too "
                              "(or use --ranks PLAN.json for a plan made by `lance ranks`)")
        if not Path(config.calibration).expanduser().is_file():
            raise ConfigError(f"--calibration file {config.calibration} does not exist; make it with "
                              f"`lance calibrate --backbone {config.backbone} --dataset {config.dataset} "
                              f"--layers {config.layers} --out {config.calibration}`")

    if config.device not in ("cpu", "cuda") and not str(config.device).startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {config.device!r}")
    if str(config.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")

    _validate_backbone(config)
    if check_data:
        _validate_dataset(config)
    return config


def _validate_backbone(config: FinetuneConfig) -> None:
    names = list(available_backbones())
    if config.backbone not in names:
        raise ConfigError(f"unknown backbone {config.backbone!r}; available: {', '.join(names)}")
    weights = config.weights
    if weights == "bundled":
        if bundled_weights(config.backbone) is None:
            raise ConfigError(f"--weights bundled: {config.backbone} has no bundled weights; use imagenet, none "
                              "or a file (small-cnn-digits has bundled weights)")
    elif weights is not None and weights not in ("imagenet", "none") and not Path(weights).expanduser().exists():
        raise ConfigError(f"--weights {weights!r}: use imagenet, bundled, none, or the path of a weights file "
                          "(no file exists at that path)")


def _validate_dataset(config: FinetuneConfig) -> None:
    """Known name and present here (cheap: no image is decoded)."""
    name = config.dataset
    if not name.startswith("imagefolder:"):
        names = list(available_datasets())
        if name not in names:
            raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(names)}, or imagefolder:PATH")
    try:
        locate(name, config.data_root)
    except DatasetMissing as exc:
        raise ConfigError(str(exc)) from None


def load_ranks_file(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Read fixed ranks: a plan (``lance ranks --json`` output, ``"format": "lance-plan"``: the ranks of
    its first method; engine.train.budget reads plans fully) or a plain ``{layer_name: [r1, r2, ...]}``
    mapping. Layer names are those of the full model."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--ranks file {p} does not exist; make one with `lance ranks --json FILE`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--ranks file {p} is not readable JSON: {exc}") from None
    if isinstance(data, dict) and data.get("format") == "lance-plan":
        try:
            plan = Plan.from_dict(data)
        except PlanError as exc:
            raise ConfigError(f"--ranks file {p}: {exc}") from None
        return plan.ranks_for(plan.methods[0])
    if isinstance(data, dict) and isinstance(data.get("layers"), list):
        raise ConfigError(f"--ranks file {p} is a rank choice from an older `lance ranks` (made for the "
                          "calibration's batch size, not the training one); make a plan with "
                          "`lance ranks --calibration CALIB.json --budget X --batch-size B --json PLAN.json`")
    if isinstance(data, dict):
        items = list(data.items())
    else:
        raise ConfigError(f"--ranks file {p}: expected an object, got {type(data).__name__}")
    out = {}
    for name, ranks in items:
        if not isinstance(name, str) or not isinstance(ranks, (list, tuple)) or not ranks or \
                not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise ConfigError(f"--ranks file {p}: entry {name!r}: {ranks!r} is not a list of ranks >= 1")
        out[name] = tuple(ranks)
    if not out:
        raise ConfigError(f"--ranks file {p} lists no layers")
    return out
