"""One method's model: a fresh copy of the pristine backbone, cut, compressed, with its optimizer.

``build_trainable(bench, method, plans)`` -> ``Trainable`` (the suffix model, the compression handle,
the trained parameters and what to store about the method); ``make_optimizer`` -> SGD + cosine schedule.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import engine
from engine.train.config import ConfigError, FinetuneConfig
from engine.train.data import CALIBRATION_EPOCH, suffix_channels_last
from engine.train.prepare import Workbench

WRAP = "model."  # prefix of the full model's names inside SuffixModel


class SuffixModel(nn.Module):
    """Runs stages ``[cut:]`` of ``model``: input = output of stage ``cut - 1`` (images when cut = 0).

    ``model`` is registered as the submodule ``model``, so layer names inside are ``model.<name>``
    and ``state_dict`` holds the whole model.
    """

    def __init__(self, model: nn.Module, cut: int = 0, memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.model = model
        self.cut = int(cut)
        self.memory_format = memory_format  # 4-D inputs are laid out so (engine.train.data.suffix_channels_last)
        self.refresh()

    def refresh(self) -> None:
        """Re-read ``model.stages()`` (after layers were swapped by compression)."""
        stages = [stage for _, stage in self.model.stages()][self.cut:]
        object.__setattr__(self, "_stages", stages)  # views of self.model, not owned twice

    def forward(self, x):
        if x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        for stage in self._stages:
            x = stage(x)
        return x


def short_name(name: str) -> str:
    """A layer's name in the full model (``model.x`` inside SuffixModel -> ``x``)."""
    return name[len(WRAP):] if name.startswith(WRAP) else name


def jsonable(value):
    """Tensors, tuples and dicts as plain JSON values (lists, str keys)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


@dataclass
class Trainable:
    wrapper: SuffixModel
    handle: Any
    params: list[nn.Parameter]
    method_info: dict[str, Any]


def method_options(config: FinetuneConfig, method: str, plans: dict | None = None) -> tuple[dict, dict]:
    """(options for compress_model, info to store: the plan's ranks and source, or eps / patch)."""
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
    """LANCE's calibration batches: the first ``--calibration-batches`` of the calibration epoch's order."""
    n = min(bench.config.calibration_batches, bench.steps_per_epoch)
    return [(x.to(device), y.to(device)) for x, y in itertools.islice(bench.train(CALIBRATION_EPOCH), n)]


def _layer_ranks(layer) -> Any:
    """Fixed ranks known before training (ASI, LANCE), else None."""
    value = getattr(getattr(layer, "method", None), "ranks", None)
    return None if value is None or callable(value) else value


def build_trainable(bench: Workbench, method: str, plans: dict | None = None) -> Trainable:
    """A fresh copy of the pristine model, cut at ``bench.cut`` and compressed with ``method``
    (ASI/LANCE at the ranks of ``plans[method]`` when given: engine.train.budget.resolve_plans)."""
    config = bench.config
    torch.manual_seed(config.seed)
    model = copy.deepcopy(bench.model).to(config.device)
    wrapper = SuffixModel(model, bench.cut)
    options, info = method_options(config, method, plans)
    kwargs: dict[str, Any] = {}
    if method == "lance":
        batches = calibration_batches(bench, config.device)
        kwargs = {"calibration_loader": batches, "calibration_batches": len(batches)}
        info["calibration_batches"] = len(batches)
    handle = engine.compress_model(wrapper, method, layers=[WRAP + n for n in bench.layer_names],
                                   options=options, pack=config.pack, **kwargs)
    wrapper.refresh()
    if suffix_channels_last(method, config.device, config.channels_last):
        wrapper.to(memory_format=torch.channels_last)
        wrapper.memory_format = torch.channels_last
    params = [p for p in wrapper.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad after compression")
    info["trained_parameters"] = sum(p.numel() for p in params)
    info["ranks"] = {short_name(name): jsonable(_layer_ranks(layer)) for name, layer in handle.layers.items()}
    return Trainable(wrapper=wrapper, handle=handle, params=params, method_info=info)


def make_optimizer(trainable: Trainable, config: FinetuneConfig):
    """(SGD with momentum and weight decay, cosine schedule over ``config.epochs``)."""
    optimizer = torch.optim.SGD(trainable.params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
