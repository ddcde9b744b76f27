"""Continual-learning networks of the GPM/LANCE benchmarks, with one head per task.

``alexnet-cl``: GPM's 5-layer AlexNet for 32 px inputs: conv4x4(3→64) conv3x3(64→128) conv2x2(128→256),
each BN (batch statistics, ``track_running_stats=False`` as in GPM) → ReLU → dropout → maxpool 2,
then fc(1024→2048) BN ReLU dropout, fc(2048→2048) BN ReLU dropout; heads Linear(2048→k_t, no bias).
``resnet18-reduced``: GPM's reduced ResNet-18 (nf = 20, BasicBlocks [2, 2, 2, 2], widths 20-40-80-160,
BN with batch statistics), avg-pool 2 then heads Linear(160·(R/16)²→k_t, no bias); 640 features at 32 px.

:class:`MultiHeadNet` holds a shared ``features`` trunk (B, 3, R, R) -> (B, F) and ``heads``;
``forward(x, task=None)`` uses ``task`` or else ``model.active_task`` (``set_task``), so code that
calls ``model(x)`` (calibration, the feature cache) works on the current task's head.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.batchnorm import FastBatchNorm2d
from engine.dropout import FastDropout

from .registry import CIFAR_MEAN, CIFAR_STD, BackboneEntry, register
from .stages import Stage, flatten


class AlexNetTrunk(nn.Module):
    """(B, 3, 32, 32) -> (B, 2048)."""

    def __init__(self, resolution: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 4, bias=False)
        self.bn1 = FastBatchNorm2d(64, track_running_stats=False)
        self.conv2 = nn.Conv2d(64, 128, 3, bias=False)
        self.bn2 = FastBatchNorm2d(128, track_running_stats=False)
        self.conv3 = nn.Conv2d(128, 256, 2, bias=False)
        self.bn3 = FastBatchNorm2d(256, track_running_stats=False)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.drop1 = FastDropout(0.2)  # nn.Dropout with a 4-5× faster CPU mask draw (engine.dropout)
        self.drop2 = FastDropout(0.5)
        side = ((((resolution - 3) // 2 - 2) // 2) - 1) // 2
        if side < 1:
            raise ValueError(f"alexnet-cl needs inputs of at least 32 px, got {resolution}")
        self.fc1 = nn.Linear(256 * side * side, 2048, bias=False)
        self.bn4 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.fc2 = nn.Linear(2048, 2048, bias=False)
        self.bn5 = nn.BatchNorm1d(2048, track_running_stats=False)
        self.out_features = 2048

    def stage_steps(self) -> list[tuple[str, list]]:
        """Stage name -> steps (paths relative to this trunk)."""
        return [
            ("conv1", ["conv1", "bn1", "relu", "drop1", "maxpool"]),
            ("conv2", ["conv2", "bn2", "relu", "drop1", "maxpool"]),
            ("conv3", ["conv3", "bn3", "relu", "drop2", "maxpool", flatten]),
            ("fc1", ["fc1", "bn4", "relu", "drop2"]),
            ("fc2", ["fc2", "bn5", "relu", "drop2"]),
        ]

    def forward(self, x):
        return _run_steps(self, self.stage_steps(), x)


class BasicBlock(nn.Module):
    """GPM's reduced-ResNet block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = FastBatchNorm2d(c_out, track_running_stats=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = FastBatchNorm2d(c_out, track_running_stats=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          FastBatchNorm2d(c_out, track_running_stats=False))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _avg_pool2(x):
    return F.avg_pool2d(x, 2)


class ReducedResNet18Trunk(nn.Module):
    """(B, 3, R, R) -> (B, 8·nf·(R/16)²); nf = 20 gives 640 features at 32 px."""

    def __init__(self, nf: int = 20, resolution: int = 32):
        super().__init__()
        if resolution % 16:
            raise ValueError(f"resnet18-reduced needs a resolution divisible by 16, got {resolution}")
        self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=False)
        self.bn1 = FastBatchNorm2d(nf, track_running_stats=False)
        self.relu = nn.ReLU()
        widths, c_in = [nf, 2 * nf, 4 * nf, 8 * nf], nf
        for index, (width, stride) in enumerate(zip(widths, [1, 2, 2, 2]), start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width, 1)))
            c_in = width
        self.out_features = 8 * nf * (resolution // 16) ** 2

    def stage_steps(self):
        out = [("stem", ["conv1", "bn1", "relu"])]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            out += [(f"{layer}.{i}", [f"{layer}.{i}"]) for i in range(2)]
        out[-1] = ("layer4.1", ["layer4.1", _avg_pool2, flatten])
        return out

    def forward(self, x):
        return _run_steps(self, self.stage_steps(), x)


def _run_steps(root: nn.Module, stage_steps, x):
    """Run each stage's steps in order. A module with ``fuse_next(following, x)`` (a packed ReLU before a packed
    dropout, and the max-pool after it) may run itself and the modules after it in its stage as one op: it returns
    ``(output, how many of following it ran)``, or ``None`` where it does not."""
    for _, steps in stage_steps:
        i = 0
        while i < len(steps):
            step = steps[i]
            if not isinstance(step, str):
                x, i = step(x), i + 1
                continue
            module = root.get_submodule(step)
            fuse = getattr(module, "fuse_next", None)
            if fuse is not None:
                following = []
                for nxt in steps[i + 1:i + 3]:
                    if not isinstance(nxt, str):
                        break
                    following.append(root.get_submodule(nxt))
                fused = fuse(following, x) if following else None
                if fused is not None:
                    x, ran = fused
                    i += 1 + ran
                    continue
            x, i = module(x), i + 1
    return x


class MultiHeadNet(nn.Module):
    """Shared trunk ``features`` and one bias-free linear head per task.

    forward(x: (B, 3, R, R), task: int | None) -> (B, k_task) logits of that task's head.
    """

    def __init__(self, features: nn.Module, task_classes: list[int], resolution: int = 32):
        super().__init__()
        if not task_classes or any(int(k) < 1 for k in task_classes):
            raise ValueError(f"task_classes must be a non-empty list of positive ints, got {task_classes}")
        self.features = features
        self.resolution = resolution
        self.task_classes = [int(k) for k in task_classes]
        self.heads = nn.ModuleList([nn.Linear(features.out_features, k, bias=False) for k in self.task_classes])
        self.active_task = 0

    @property
    def head_path(self) -> str:
        return f"heads.{self.active_task}"

    def set_task(self, task: int) -> "MultiHeadNet":
        if not 0 <= task < len(self.heads):
            raise ValueError(f"task {task} out of range: this model has {len(self.heads)} heads")
        self.active_task = int(task)
        return self

    def forward(self, x, task: int | None = None):
        task = self.active_task if task is None else task
        return self.heads[task](self.features(x))

    def stages(self, task: int | None = None):
        task = self.active_task if task is None else task
        out = [(name, Stage(self, [s if not isinstance(s, str) else f"features.{s}" for s in steps]))
               for name, steps in self.features.stage_steps()]
        out.append(("head", Stage(self, [f"heads.{task}"])))
        return out


def build_trunk(name: str, resolution: int = 32) -> nn.Module:
    if name == "alexnet-cl":
        return AlexNetTrunk(resolution)
    if name == "resnet18-reduced":
        return ReducedResNet18Trunk(20, resolution)
    raise ValueError(f"unknown continual-learning network {name!r}; choose alexnet-cl or resnet18-reduced")


def build_multihead(name: str, task_classes: list[int], resolution: int = 32, seed: int | None = None) -> MultiHeadNet:
    """A multi-head network for task-incremental learning: ``forward(x, task)``, shared ``features``."""
    if seed is None:
        return MultiHeadNet(build_trunk(name, resolution), task_classes, resolution)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return MultiHeadNet(build_trunk(name, resolution), task_classes, resolution)


register(BackboneEntry(
    name="alexnet-cl", family="continual", builder=lambda _folder: build_multihead("alexnet-cl", [10], 32),
    resolution=32, mean=CIFAR_MEAN, std=CIFAR_STD, num_params=6_528_896, default_classes=10,
    description="GPM's 5-layer AlexNet (conv 64-128-256, fc 2048-2048), one head per task"))
register(BackboneEntry(
    name="resnet18-reduced", family="continual",
    builder=lambda _folder: build_multihead("resnet18-reduced", [10], 32), resolution=32, mean=CIFAR_MEAN,
    std=CIFAR_STD, num_params=1_099_540, default_classes=10,
    description="GPM's reduced ResNet-18 (nf = 20), one head per task"))
