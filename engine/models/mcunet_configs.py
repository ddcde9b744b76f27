"""Built-in MCUNet network configs (upstream JSON format), so ``--weights none`` needs no file.

Only mcunet-in3 ("mcunet-320kb-1mb") is built in; the other variants read their JSON from the
weights folder or download it. Each block row: (in, out, kernel, stride, expand_ratio, mid, shortcut).
"""
from __future__ import annotations

_IN3_BLOCKS = [
    (16, 8, 3, 1, 1, None, False), (8, 16, 7, 2, 3, 24, False), (16, 16, 3, 1, 5, 80, True),
    (16, 16, 7, 1, 5, 80, True), (16, 16, 5, 1, 4, 64, True), (16, 24, 5, 2, 5, 80, False),
    (24, 24, 5, 1, 5, 120, True), (24, 24, 5, 1, 5, 120, True), (24, 40, 3, 2, 5, 120, False),
    (40, 40, 7, 1, 6, 240, True), (40, 40, 5, 1, 4, 160, True), (40, 48, 5, 1, 5, 200, False),
    (48, 48, 7, 1, 5, 240, True), (48, 48, 3, 1, 5, 240, True), (48, 96, 3, 2, 6, 288, False),
    (96, 96, 7, 1, 5, 480, True), (96, 96, 3, 1, 4, 384, True), (96, 160, 7, 1, 5, 480, False),
]


def _config(first_out: int, blocks: list[tuple], classifier_in: int, resolution: int) -> dict:
    def block(row):
        c_in, c_out, k, s, e, mid, shortcut = row
        return {
            "name": "MobileInvertedResidualBlock",
            "mobile_inverted_conv": {"name": "MBInvertedConvLayer", "in_channels": c_in, "out_channels": c_out,
                                     "kernel_size": k, "stride": s, "expand_ratio": e, "mid_channels": mid,
                                     "act_func": "relu6", "use_se": False},
            "shortcut": {"name": "IdentityLayer", "in_channels": [c_in], "out_channels": [c_out]} if shortcut else None,
        }

    return {
        "name": "ProxylessNASNets",
        "bn": {"momentum": 0.1, "eps": 1e-5, "ws_eps": None},
        "first_conv": {"name": "ConvLayer", "kernel_size": 3, "stride": 2, "dilation": 1, "groups": 1,
                       "bias": False, "in_channels": 3, "out_channels": first_out, "use_bn": True,
                       "act_func": "relu6", "ops_order": "weight_bn_act"},
        "blocks": [block(r) for r in blocks],
        "feature_mix_layer": None,
        "classifier": {"name": "LinearLayer", "in_features": classifier_in, "out_features": 1000, "bias": True,
                       "use_bn": False, "act_func": None, "dropout_rate": 0},
        "resolution": resolution,
    }


BUILTIN_CONFIGS = {"mcunet-in3": lambda: _config(16, _IN3_BLOCKS, 160, 176)}
