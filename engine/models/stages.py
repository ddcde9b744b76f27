"""Stages: a model cut into consecutive pieces whose composition equals ``model(x)``.

Every backbone exposes ``model.stages() -> list[(name, nn.Module)]``. A stage is a :class:`Stage`
that runs a list of *steps* on the model it came from. A step is either a dotted submodule path
(resolved on the model **at call time**, so layers swapped in later by ``compress_model`` are used)
or a plain callable such as ``torch.flatten``. The stage also registers the submodules it covers, so
``stage.parameters()`` lists the same Parameter objects as the model.

``split_at_stage(model, i)`` returns ``(prefix, suffix)``: stages ``[0, i)`` and ``[i, n)``.
The prefix is what the feature cache runs once; the suffix is what is trained.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

Step = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` that also accepts integer indices of Sequential/ModuleList."""
    return root.get_submodule(path) if path else root


class Stage(nn.Module):
    """A piece of ``root``'s forward: ``steps`` applied in order (paths resolved at call time)."""

    def __init__(self, root: nn.Module, steps: Sequence[Step], covers: Sequence[str] = ()):
        """``covers``: extra submodule or parameter paths used by callable steps (for ``parameters()``)."""
        super().__init__()
        object.__setattr__(self, "_root", root)  # not registered: the stage is a view, not an owner
        self._steps = list(steps)
        self.covered = nn.ModuleDict()
        self.covered_parameters = nn.ParameterDict()
        for path in [s for s in self._steps if isinstance(s, str)] + list(covers):
            key = path.replace(".", "__")
            try:
                self.covered[key] = get_submodule(root, path)
            except AttributeError:
                self.covered_parameters[key] = root.get_parameter(path)

    @property
    def paths(self) -> list[str]:
        """Qualified names (in the root model) of the submodules/parameters this stage runs."""
        return [k.replace("__", ".") for k in list(self.covered.keys()) + list(self.covered_parameters.keys())]

    def forward(self, x):
        for step in self._steps:
            x = get_submodule(self._root, step)(x) if isinstance(step, str) else step(x)
        return x

    def extra_repr(self) -> str:
        return "steps=" + ", ".join(s if isinstance(s, str) else getattr(s, "__name__", repr(s)) for s in self._steps)


class StageSequence(nn.Module):
    """Consecutive stages run in order; ``names`` are the stage names (e.g. ``blocks.15``)."""

    def __init__(self, stages: Sequence[tuple[str, nn.Module]]):
        super().__init__()
        self.names = [name for name, _ in stages]
        self.stages = nn.ModuleList([module for _, module in stages])

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x

    def __len__(self) -> int:
        return len(self.stages)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, prod(...))."""
    return torch.flatten(x, 1)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C), the mean over H and W."""
    return x.mean(dim=(2, 3))


def split_at_stage(model: nn.Module, stage_index: int) -> tuple[StageSequence, StageSequence]:
    """Cut ``model`` before stage ``stage_index``: ``suffix(prefix(x)) == model(x)``.

    ``stage_index`` may be negative (``-1``: only the last stage is in the suffix). The prefix may be
    empty (index 0: identity); the suffix must hold at least the head (index < number of stages).
    """
    stages = model.stages()
    n = len(stages)
    index = stage_index + n if stage_index < 0 else stage_index
    if not 0 <= index < n:
        raise ValueError(f"stage_index {stage_index} out of range for a model with {n} stages "
                         f"({', '.join(name for name, _ in stages)})")
    return StageSequence(stages[:index]), StageSequence(stages[index:])


def stage_of_layer(model: nn.Module, layer_name: str) -> int:
    """Index of the stage that contains the module ``layer_name`` (a qualified name in ``model``)."""
    for index, (_, stage) in enumerate(model.stages()):
        for path in stage.paths:
            if layer_name == path or layer_name.startswith(path + "."):
                return index
    raise ValueError(f"layer {layer_name!r} is in no stage of this model")


def first_trainable_stage(model: nn.Module) -> int:
    """Index of the first stage holding a parameter with ``requires_grad``; the cut for the cache.

    Everything before it is frozen, so its output is the same every epoch (when BN is in eval mode).
    """
    for index, (_, stage) in enumerate(model.stages()):
        if any(p.requires_grad for p in stage.parameters()):
            return index
    raise ValueError("no parameter of this model requires grad: nothing to train")
