"""A sweep's grid: methods × option axes × seeds, expanded into trials (one run each).

``SweepSpec(kind, methods, seeds, axes, base)``:

- ``kind``: ``finetune`` (``lance finetune`` options) or ``continual`` (``lance continual`` options);
- ``base``: fixed options (field names of ``FinetuneConfig`` / ``SequenceSpec`` + ``ContinualConfig``);
- ``axes``: ``{name: [values]}``; ``name`` is a field (``budget``, ``eps``, ``lr``, ``eps_cl``...) applied
  to every method that takes it, or ``method.field`` (``hosvd.eps``) for one method only, overriding the
  plain axis of the same field for that method.

Which methods take which field (the others ignore the axis, so vanilla runs once per seed):
finetune ``budget``/``ranks`` → asi, lance; ``eps`` → hosvd, lance (lance only when it has no budget or
ranks axis); ``patch`` → gradient_filter; ``calibration_batches`` → lance. Continual ``eps``,
``eps_plain``, ``spatial_eps``, ``calibration_*``, ``compress_first_task``, ``recalibrate_every`` → lance;
``eps_cl``, ``eps_cl_step``, ``basis_samples`` → lance, gpm. Every other field applies to every method.

A trial's ``key`` is a hash of (kind, method, params with the seed): the same grid gives the same keys, which
is how a resumed sweep recognises the trials that finished.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from engine.continual import METHODS as CONTINUAL_METHODS
from engine.continual.learner import ContinualConfig
from engine.continual.session import SequenceSpec
from engine.train.config import METHODS as FINETUNE_METHODS
from engine.train.config import FinetuneConfig

KINDS = ("finetune", "continual")
DEFAULT_BACKBONE = "small-cnn"   # the embedded default (the app's): no network, no ../shared
DEFAULT_DATASET = "digits"

FINETUNE_APPLIES = {"budget": ("asi", "lance"), "ranks": ("asi", "lance"), "eps": ("hosvd", "lance"),
                    "patch": ("gradient_filter",), "calibration_batches": ("lance",)}
CONTINUAL_APPLIES = {**{k: ("lance",) for k in ("eps", "eps_plain", "spatial_eps", "calibration_batches",
                                                  "calibration_batch_size", "compress_first_task",
                                                  "recalibrate_every")},
                     **{k: ("lance", "gpm") for k in ("eps_cl", "eps_cl_step", "basis_samples")}}
_FINETUNE_PER_METHOD = ("budget", "ranks", "eps")   # FinetuneConfig holds these as {method: value}
_NOT_AXES = ("methods", "method", "seed")


class SweepError(ValueError):
    """A bad sweep definition; the message says what to write instead."""


def _finetune_fields() -> dict[str, Any]:
    return {f.name: f for f in fields(FinetuneConfig)}


def _continual_fields() -> tuple[dict[str, Any], dict[str, Any]]:
    return ({f.name: f for f in fields(SequenceSpec) if f.name != "training"},
            {f.name: f for f in fields(ContinualConfig)})


def known_fields(kind: str) -> set[str]:
    if kind == "finetune":
        return set(_finetune_fields()) - set(_NOT_AXES)
    seq, train = _continual_fields()
    return (set(seq) | set(train)) - set(_NOT_AXES)


def methods_for(kind: str) -> tuple[str, ...]:
    return tuple(FINETUNE_METHODS if kind == "finetune" else CONTINUAL_METHODS)


def parse_value(text: Any) -> Any:
    """``"3"`` → 3, ``"0.05"`` → 0.05, ``"true"`` → True, ``"none"``/``"null"`` → None, else the string."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


@dataclass
class Trial:
    key: str
    method: str
    seed: int
    params: dict[str, Any]     # the axis values of this trial (without the seed)
    label: str                 # "asi budget=20kB" (the configuration, seeds apart)

    @property
    def config_key(self) -> str:
        """Identifies the configuration: trials differing only in the seed share it."""
        return config_key(self.method, self.params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def config_key(method: str, params: dict) -> str:
    return method + "|" + json.dumps(params, sort_keys=True, default=str)


def trial_key(kind: str, method: str, params: dict, seed: int) -> str:
    text = json.dumps({"kind": kind, "method": method, "params": params, "seed": int(seed)}, sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass
class SweepSpec:
    kind: str = "finetune"
    methods: list[str] = field(default_factory=lambda: ["vanilla"])
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        return cls(**{k: data[k] for k in ("kind", "methods", "seeds", "axes", "base") if k in data})

    # ---------------------------------------------------------------------------------- checks
    def validate(self) -> SweepSpec:
        if self.kind not in KINDS:
            raise SweepError(f"unknown sweep kind {self.kind!r}; use finetune or continual")
        allowed = methods_for(self.kind)
        if not self.methods:
            raise SweepError(f"--method is empty; give one or more of {', '.join(allowed)}")
        unknown = [m for m in self.methods if m not in allowed]
        if unknown:
            raise SweepError(f"unknown {self.kind} method(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
        if len(set(self.methods)) != len(self.methods):
            raise SweepError(f"--method lists a method twice: {','.join(self.methods)}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise SweepError(f"--seeds must be whole numbers >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"--seeds lists a seed twice: {self.seeds}")
        names = known_fields(self.kind)
        for name in self.base:
            if name not in names:
                raise SweepError(f"--set {name}: not a {self.kind} option; known: {', '.join(sorted(names))}")
        for name, values in self.axes.items():
            method, _, fld = name.rpartition(".")
            if method and method not in self.methods:
                raise SweepError(f"--grid {name}: {method!r} is not in --method {','.join(self.methods)}")
            if fld not in names:
                raise SweepError(f"--grid {name}: {fld!r} is not a {self.kind} option; "
                                 f"known: {', '.join(sorted(names))}")
            if not isinstance(values, list) or not values:
                raise SweepError(f"--grid {name}: give one or more values, comma-separated")
            if len({json.dumps(v, default=str) for v in values}) != len(values):
                raise SweepError(f"--grid {name} lists a value twice: {values}")
            if method and not self._applies(fld, method):
                raise SweepError(f"--grid {name}: {method} does not take {fld}")
        if not self.trials():
            raise SweepError("the grid is empty")
        return self

    # ---------------------------------------------------------------------------------- grid
    def _applies(self, fld: str, method: str) -> bool:
        table = FINETUNE_APPLIES if self.kind == "finetune" else CONTINUAL_APPLIES
        return method in table.get(fld, (method,))

    def method_axes(self, method: str) -> dict[str, list[Any]]:
        """The axes this method runs over: ``{field: values}`` (method-specific ones win)."""
        out: dict[str, list[Any]] = {}
        for name, values in self.axes.items():
            if "." not in name and self._applies(name, method):
                out[name] = list(values)
        for name, values in self.axes.items():
            m, _, fld = name.rpartition(".")
            if m == method:
                out[fld] = list(values)
        if self.kind == "finetune" and method == "lance" and ("budget" in out or "ranks" in out) \
                and "lance.eps" not in self.axes:
            out.pop("eps", None)   # lance takes a budget (or ranks) or an eps, not both
        return out

    def trials(self) -> list[Trial]:
        """Every trial in grid order: method, then the axes' values, then the seed."""
        out = []
        for method in self.methods:
            axes = self.method_axes(method)
            names = sorted(axes)
            for combo in itertools.product(*(axes[n] for n in names)):
                params = dict(zip(names, combo))
                label = method + "".join(f" {n}={v}" for n, v in params.items())
                for seed in self.seeds:
                    out.append(Trial(key=trial_key(self.kind, method, params, seed), method=method, seed=int(seed),
                                     params=params, label=label))
        return out

    # ---------------------------------------------------------------------------------- one run
    def finetune_config(self, trial: Trial):
        """The ``FinetuneConfig`` of one trial (validated by the caller)."""
        known = _finetune_fields()
        data: dict[str, Any] = {"backbone": DEFAULT_BACKBONE, "dataset": DEFAULT_DATASET}
        values = {**self.base, **trial.params}
        for name, value in values.items():
            if name in _FINETUNE_PER_METHOD:
                if value is not None and self._applies(name, trial.method):
                    data[name] = {trial.method: value}
            else:
                data[name] = _coerce(known[name], value)
        data["methods"] = [trial.method]
        data["seed"] = trial.seed
        return FinetuneConfig(**data)

    def sequence_spec(self, trial: Trial):
        """The ``SequenceSpec`` of one trial (its ``training`` validated by ``ContinualConfig``)."""
        seq_fields, train_fields = _continual_fields()
        seq: dict[str, Any] = {"benchmark": "split-digits"}
        training: dict[str, Any] = {}
        for name, value in {**self.base, **trial.params}.items():
            if name in seq_fields:
                seq[name] = _coerce(seq_fields[name], value)
            elif self._applies(name, trial.method):
                training[name] = _coerce(train_fields[name], value)
        training["seed"] = trial.seed
        return SequenceSpec(**seq, training=training)


def _coerce(fld, value):
    """Ints where the field's default is a float become floats; the rest stays as parsed."""
    default = fld.default
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
