"""torchvision backbones (MobileNetV2, ResNet-18/34, Swin-T) with ``stages()``.

Subclasses of torchvision's own classes, so module names (and weight files) are torchvision's.
Stages are per block (``layer4.0``, ``features.17``, ``features.7.1``…) so that the frozen prefix of a
last-k fine-tuning is as long as possible. Swin-T's linear layers see 4-D inputs (B, H, W, F).
"""
from __future__ import annotations

import os

from torch import nn
from torchvision import models
from torchvision.models import mobilenetv2, resnet, swin_transformer

from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneEntry, Weights, register
from .stages import Stage, flatten


class ResNetStaged(resnet.ResNet):
    """torchvision ResNet; stages: stem, layer1.0 … layer4.1, head (avgpool, flatten, fc)."""

    head_path = "fc"

    def stages(self):
        out = [("stem", Stage(self, ["conv1", "bn1", "relu", "maxpool"]))]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i in range(len(getattr(self, layer))):
                out.append((f"{layer}.{i}", Stage(self, [f"{layer}.{i}"])))
        out.append(("head", Stage(self, ["avgpool", flatten, "fc"])))
        return out


class MobileNetV2Staged(mobilenetv2.MobileNetV2):
    """torchvision MobileNetV2; stages: features.0 … features.18, head (pool, flatten, classifier)."""

    head_path = "classifier.1"

    def stages(self):
        out = [(f"features.{i}", Stage(self, [f"features.{i}"])) for i in range(len(self.features))]
        out.append(("head", Stage(self, [_pool1, flatten, "classifier"])))
        return out


def _pool1(x):
    """(B, C, H, W) -> (B, C, 1, 1), as MobileNetV2.forward does."""
    return nn.functional.adaptive_avg_pool2d(x, (1, 1))


class SwinStaged(swin_transformer.SwinTransformer):
    """torchvision Swin; stages: features.0, features.1.0, …, features.7.1, head (norm … head)."""

    head_path = "head"

    def stages(self):
        out = []
        for i, feature in enumerate(self.features):
            if isinstance(feature, nn.Sequential) and all(
                isinstance(m, (swin_transformer.SwinTransformerBlock, swin_transformer.SwinTransformerBlockV2))
                for m in feature
            ):
                out += [(f"features.{i}.{j}", Stage(self, [f"features.{i}.{j}"])) for j in range(len(feature))]
            else:
                out.append((f"features.{i}", Stage(self, [f"features.{i}"])))
        out.append(("head", Stage(self, ["norm", "permute", "avgpool", "flatten", "head"])))
        return out


def build_resnet(depth: int) -> ResNetStaged:
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    return ResNetStaged(resnet.BasicBlock, layers, num_classes=1000)


def build_mobilenet_v2() -> MobileNetV2Staged:
    return MobileNetV2Staged(num_classes=1000)


def build_swin_t() -> SwinStaged:
    return SwinStaged(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                      window_size=[7, 7], stochastic_depth_prob=0.2, num_classes=1000)


def _torchvision(name: str, builder, enum, description: str, linear_input: str = "2-D") -> BackboneEntry:
    """An entry from torchvision's weight enum (URL, parameter count, accuracy, torchvision's GFLOPS)."""
    file_name = os.path.basename(enum.url)
    weights = Weights(url=enum.url, file_names=(file_name, f"{name}.pth"),
                      hash_prefix=file_name.rsplit("-", 1)[1].split(".")[0], torch_hub=True,
                      meta={"torchvision": str(enum), "top1": enum.meta["_metrics"]["ImageNet-1K"]["acc@1"]})
    return register(BackboneEntry(
        name=name, family="torchvision", builder=lambda _folder: builder(), resolution=224, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, description=description, num_params=enum.meta["num_params"], weights=weights,
        linear_input=linear_input, meta={"gflops": enum.meta["_ops"]}))


_torchvision("mobilenet_v2", build_mobilenet_v2, models.MobileNet_V2_Weights.DEFAULT, "torchvision MobileNetV2")
_torchvision("resnet18", lambda: build_resnet(18), models.ResNet18_Weights.DEFAULT, "torchvision ResNet-18")
_torchvision("resnet34", lambda: build_resnet(34), models.ResNet34_Weights.DEFAULT, "torchvision ResNet-34")
_torchvision("swin_t", build_swin_t, models.Swin_T_Weights.DEFAULT, "torchvision Swin-T (4-D linear inputs)",
             linear_input="4-D")
