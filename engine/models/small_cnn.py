"""``small-cnn``: a tiny randomly initialised CNN, native 32 px, the app's default with ``digits``.

block1: conv3x3(3→16) BN ReLU (32 px) · block2: conv3x3(16→32, stride 2) BN ReLU (16 px) ·
block3: conv3x3(32→64, stride 2) BN ReLU (8 px) · average pool to 4x4 · flatten ·
classifier Linear(1024→classes). About 34 k parameters; ~97 % test accuracy on ``digits`` after 4 epochs
(Adam, lr 1e-2, batch 64), a few seconds on one CPU core. (A global average pool instead of the 4x4
pool loses the digits' layout: ~65 % after 6 epochs.)
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.nn import functional as F

from .registry import BackboneEntry, register
from .stages import Stage, flatten


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                                     bn=nn.BatchNorm2d(c_out), relu=nn.ReLU()))


def pool4(x):
    """(B, C, H, W) -> (B, C, 4, 4) by adaptive average pooling."""
    return F.adaptive_avg_pool2d(x, 4)


class SmallCNN(nn.Module):
    """(B, 3, 32, 32) -> (B, classes); any resolution divisible by 4 works."""

    head_path = "classifier"

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.block1 = _block(3, widths[0], 1)
        self.block2 = _block(widths[0], widths[1], 2)
        self.block3 = _block(widths[1], widths[2], 2)
        self.classifier = nn.Linear(widths[2] * 16, num_classes)

    def forward(self, x):
        return self.classifier(flatten(pool4(self.block3(self.block2(self.block1(x))))))

    def stages(self):
        return [("block1", Stage(self, ["block1"])), ("block2", Stage(self, ["block2"])),
                ("block3", Stage(self, ["block3"])), ("head", Stage(self, [pool4, flatten, "classifier"]))]


register(BackboneEntry(
    name="small-cnn", family="small", builder=lambda _folder: SmallCNN(num_classes=10), resolution=32,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_params=33_946, default_classes=10,
    description="tiny CNN (3 conv+BN+ReLU, linear head), random init, 32 px"))
register(BackboneEntry(
    name="small-cnn-digits", family="small", builder=lambda _folder: SmallCNN(num_classes=5), resolution=32,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_params=28_821, default_classes=5,
    description="small-cnn pretrained on digits 0-4 (bundled weights, 123 kB; `python -m "
                "engine.models.pretrain_default`), fresh head when fine-tuned: the default with digits-5to9",
    meta={"weights_file": "small-cnn-digits.pt", "fresh_head": True}))
