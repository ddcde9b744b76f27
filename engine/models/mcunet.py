"""MCUNet (ProxylessNAS-style) networks built from the upstream JSON network config.

The module names follow the upstream ``ProxylessNASNets`` so the released state_dicts load with
every key matching: ``first_conv.{conv,bn,act}``,
``blocks.N.mobile_inverted_conv.{inverted_bottleneck,depth_conv,point_linear}.{conv,bn,act}``,
``blocks.N.shortcut``, optional ``feature_mix_layer``, ``classifier.linear``.

Forward: first_conv -> blocks -> [feature_mix_layer] -> global average pool -> classifier.
Input (B, 3, R, R) with R = config["resolution"] natively (any R divisible by 32 works).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import partial
from pathlib import Path

from torch import nn

from .mcunet_configs import builtin_config
from .registry import IMAGENET_MEAN, IMAGENET_STD, BackboneEntry, Weights, register
from .stages import Stage, global_avg_pool
from .weights import find_local

# net id -> upstream release name (mit-han-lab/mcunet model_zoo.py); files are <name>.json/.pth
MCUNET_RELEASES = {
    "mcunet-in0": "mcunet-10fps_imagenet",
    "mcunet-in1": "mcunet-5fps_imagenet",
    "mcunet-in2": "mcunet-256kb-1mb_imagenet",
    "mcunet-in3": "mcunet-320kb-1mb_imagenet",
    "mcunet-in4": "mcunet-512kb-2mb_imagenet",
}
MCUNET_URL_BASE = "https://hanlab18.mit.edu/projects/tinyml/mcunet/release/"


def _activation(name: str | None) -> nn.Module | None:
    if name in (None, "none"):
        return None
    table = {"relu6": lambda: nn.ReLU6(inplace=False), "relu": lambda: nn.ReLU(inplace=False),
             "h_swish": nn.Hardswish, "h_sigmoid": nn.Hardsigmoid, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if name not in table:
        raise ValueError(f"unsupported activation {name!r} in MCUNet config")
    return table[name]()


class ConvLayer(nn.Module):
    """Upstream ``ConvLayer``: conv (same padding) -> [bn] -> [act]; (B, C, H, W) -> (B, C', H/s, W/s)."""

    def __init__(self, cfg: dict, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        if cfg.get("ops_order", "weight_bn_act") != "weight_bn_act":
            raise ValueError(f"unsupported ops_order {cfg.get('ops_order')!r} in MCUNet config")
        k, dilation = cfg["kernel_size"], cfg.get("dilation", 1)
        self.conv = nn.Conv2d(cfg["in_channels"], cfg["out_channels"], k, stride=cfg.get("stride", 1),
                              padding=(k // 2) * dilation, dilation=dilation, groups=cfg.get("groups", 1),
                              bias=cfg.get("bias", False))
        if cfg.get("use_bn", True):
            self.bn = nn.BatchNorm2d(cfg["out_channels"], eps=bn_eps, momentum=bn_momentum)
        act = _activation(cfg.get("act_func"))
        if act is not None:
            self.act = act

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def _conv_bn_act(c_in: int, c_out: int, k: int, stride: int, groups: int, act: str | None,
                 bn_eps: float, bn_momentum: float) -> nn.Sequential:
    layers = OrderedDict(conv=nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         bn=nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum))
    activation = _activation(act)
    if activation is not None:
        layers["act"] = activation
    return nn.Sequential(layers)


class MBInvertedConvLayer(nn.Module):
    """1x1 expand -> kxk depthwise (stride s) -> 1x1 project; (B, C, H, W) -> (B, C', H/s, W/s)."""

    def __init__(self, cfg: dict, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        if cfg.get("use_se"):
            raise ValueError("MCUNet configs with squeeze-excitation (use_se) are not supported")
        c_in, c_out, k, s = cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], cfg["stride"]
        mid = cfg.get("mid_channels") or round(c_in * cfg["expand_ratio"])
        act = cfg.get("act_func", "relu6")
        if cfg["expand_ratio"] != 1:
            self.inverted_bottleneck = _conv_bn_act(c_in, mid, 1, 1, 1, act, bn_eps, bn_momentum)
        else:
            mid = c_in
        self.depth_conv = _conv_bn_act(mid, mid, k, s, mid, act, bn_eps, bn_momentum)
        self.point_linear = _conv_bn_act(mid, c_out, 1, 1, 1, None, bn_eps, bn_momentum)

    def forward(self, x):
        if hasattr(self, "inverted_bottleneck"):
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MobileInvertedResidualBlock(nn.Module):
    """``mobile_inverted_conv(x)`` plus ``x`` when the block has an identity shortcut."""

    def __init__(self, cfg: dict, bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        conv_cfg = cfg["mobile_inverted_conv"]
        if conv_cfg is None or conv_cfg.get("name") == "ZeroLayer":
            raise ValueError("MCUNet configs with ZeroLayer blocks are not supported")
        self.mobile_inverted_conv = MBInvertedConvLayer(conv_cfg, bn_eps, bn_momentum)
        shortcut = cfg.get("shortcut")
        if shortcut is not None and shortcut.get("name") != "IdentityLayer":
            raise ValueError(f"unsupported shortcut {shortcut.get('name')!r} in MCUNet config")
        self.shortcut = nn.Identity() if shortcut is not None else None

    def forward(self, x):
        out = self.mobile_inverted_conv(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class LinearLayer(nn.Module):
    """Upstream ``LinearLayer``: [dropout] -> linear; (B, F) -> (B, classes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dropout_rate: float = 0.0):
        super().__init__()
        if dropout_rate > 0:
            self.dropout = nn.Dropout(dropout_rate)
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        if hasattr(self, "dropout"):
            x = self.dropout(x)
        return self.linear(x)


class ProxylessNASNet(nn.Module):
    """The MCUNet network; ``stages()``: first_conv, blocks.0 .. blocks.N-1, [feature_mix_layer], head."""

    def __init__(self, config: dict, num_classes: int | None = None):
        super().__init__()
        bn = config.get("bn") or {}
        eps, momentum = bn.get("eps", 1e-5), bn.get("momentum", 0.1)
        self.config = config
        self.resolution = int(config.get("resolution", 224))
        self.first_conv = ConvLayer(config["first_conv"], eps, momentum)
        self.blocks = nn.ModuleList([MobileInvertedResidualBlock(b, eps, momentum) for b in config["blocks"]])
        mix = config.get("feature_mix_layer")
        self.feature_mix_layer = ConvLayer(mix, eps, momentum) if mix else None
        head = config["classifier"]
        if head.get("use_bn") or head.get("act_func"):
            raise ValueError("MCUNet classifier with BN/activation is not supported")
        self.classifier = LinearLayer(head["in_features"], num_classes or head["out_features"],
                                      head.get("bias", True), head.get("dropout_rate", 0.0) or 0.0)

    def forward(self, x):
        """(B, 3, R, R) -> (B, classes)."""
        x = self.first_conv(x)
        for block in self.blocks:
            x = block(x)
        if self.feature_mix_layer is not None:
            x = self.feature_mix_layer(x)
        return self.classifier(global_avg_pool(x))

    def stages(self) -> list[tuple[str, nn.Module]]:
        out = [("first_conv", Stage(self, ["first_conv"]))]
        out += [(f"blocks.{i}", Stage(self, [f"blocks.{i}"])) for i in range(len(self.blocks))]
        if self.feature_mix_layer is not None:
            out.append(("feature_mix_layer", Stage(self, ["feature_mix_layer"])))
        out.append(("head", Stage(self, [global_avg_pool, "classifier"])))
        return out

    def replace_head(self, num_classes: int) -> None:
        old = self.classifier.linear
        self.classifier.linear = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)


# ---------------------------------------------------------------- the registry's MCUNet entries
def mcunet_config(name: str, folder: Path) -> dict:
    """The JSON config of an MCUNet variant: the upstream file in the weights folder when there
    (``<name>_imagenet.json`` or ``<release>.json``), else the built-in one."""
    release = MCUNET_RELEASES[name]
    local = find_local(name, [f"{name}_imagenet.json", f"{release}.json"], folder)
    return json.loads(local.read_text()) if local else builtin_config(name)


def build_mcunet(name: str, folder: Path) -> ProxylessNASNet:
    """MCUNet variant ``name`` with random weights (config from :func:`mcunet_config`)."""
    return ProxylessNASNet(mcunet_config(name, folder))


def _mcunet(name: str, num_params: int, macs: int, published: dict, sha256: str | None = None) -> BackboneEntry:
    """One model-zoo entry; ``published``: the zoo README's rounded figures (M params, M MACs, top-1 %)."""
    release = MCUNET_RELEASES[name]
    weights = Weights(url=MCUNET_URL_BASE + release + ".pth", file_names=(f"{name}_imagenet.pth", f"{release}.pth"),
                      sha256=sha256, meta={"release": release, "config_url": MCUNET_URL_BASE + release + ".json"})
    return register(BackboneEntry(
        name=name, family="mcunet", builder=partial(build_mcunet, name), resolution=builtin_config(name)["resolution"],
        mean=IMAGENET_MEAN, std=IMAGENET_STD, num_params=num_params, macs=macs, weights=weights,
        description=f"MCUNet {release} (ImageNet), built-in upstream config",
        meta={"release": release, "published": published, "source": "mit-han-lab/mcunet model zoo"}))


# num_params / macs: counted on the built model at its resolution (tests/test_models.py); "published":
# the mit-han-lab/mcunet README's model-zoo tables (Param, MACs, FP top-1)
_mcunet("mcunet-in0", 749_840, 6_364_224, {"params_m": 0.7, "macs_m": 6.4, "top1": 41.5})
_mcunet("mcunet-in1", 636_232, 12_790_096, {"params_m": 0.6, "macs_m": 12.8, "top1": 51.5})
_mcunet("mcunet-in2", 729_392, 67_287_200, {"params_m": 0.73, "macs_m": 67.3, "top1": 60.9})
_mcunet("mcunet-in3", 737_408, 81_785_520, {"params_m": 0.74, "macs_m": 81.8, "top1": 62.2},
        sha256="c0d4ccf4bb8ba93ef69a609c60ca053be2c6bab3b4ece19d9b7e66cec8a485e5")  # ../shared/weights/mcunet-in3
_mcunet("mcunet-in4", 1_732_640, 125_874_400, {"params_m": 1.7, "macs_m": 125.9, "top1": 68.4})
