"""Built-in MCUNet network configs (the upstream JSON format), so no variant needs a file to build.

Source: the five ImageNet models of the MCUNet model zoo (mit-han-lab/mcunet, ``mcunet/model_zoo.py``:
mcunet-in0 = ``mcunet-10fps_imagenet``, in1 = ``mcunet-5fps_imagenet``, in2 = ``mcunet-256kb-1mb_imagenet``,
in3 = ``mcunet-320kb-1mb_imagenet``, in4 = ``mcunet-512kb-2mb_imagenet``), whose configs are published
as ``https://hanlab18.mit.edu/projects/tinyml/mcunet/release/<release>.json``. The block tables below
are those configs' (first conv width, per block kernel / stride / expand ratio / output width,
resolution): in3's is checked key for key against the released JSON in ``../shared/weights``
(tests/test_models_shared.py); in0, in1, in2 and in4 were taken from a public transcription of the
released JSONs (a torchvision-style re-implementation on GitHub whose comments name each JSON file) and
are checked against the model zoo README's published parameter counts and MACs (tests/test_models.py:
every variant matches both to the README's precision). Their ImageNet weights are not here.

Each block row: (expand_ratio, out_channels, stride, kernel). Widths follow from the rows: a block's
input is the previous output, mid = in · expand (no expansion conv when expand is 1), and a block
has an identity shortcut exactly when stride is 1 and in == out (as in every released config).
All activations are ReLU6, no squeeze-excite, no feature-mix layer; the classifier reads the last
block's channels.
"""
from __future__ import annotations

# name -> (first conv out channels, resolution, blocks)
TABLES: dict[str, tuple[int, int, list[tuple[int, int, int, int]]]] = {
    "mcunet-in0": (24, 48, [
        (1, 16, 1, 3), (4, 16, 2, 5), (3, 16, 1, 3), (4, 16, 1, 3), (5, 24, 2, 7), (4, 24, 1, 5), (5, 24, 1, 5),
        (5, 48, 2, 7), (4, 48, 1, 5), (5, 56, 1, 3), (4, 56, 1, 5), (5, 56, 1, 3), (6, 112, 2, 3), (4, 112, 1, 5),
        (6, 192, 1, 3)]),
    "mcunet-in1": (16, 96, [
        (1, 8, 1, 3), (4, 16, 2, 3), (3, 16, 1, 3), (3, 24, 2, 7), (5, 24, 1, 3), (5, 40, 2, 3), (4, 40, 1, 7),
        (4, 48, 1, 5), (3, 48, 1, 3), (4, 48, 1, 3), (5, 96, 2, 7), (4, 96, 1, 5), (4, 96, 1, 5), (6, 160, 1, 3)]),
    "mcunet-in2": (16, 160, [
        (1, 8, 1, 3), (3, 16, 2, 5), (6, 16, 1, 7), (5, 16, 1, 3), (5, 16, 1, 5), (5, 24, 2, 3), (6, 24, 1, 7),
        (6, 24, 1, 5), (4, 40, 2, 7), (5, 40, 1, 5), (5, 48, 1, 3), (5, 48, 1, 5), (4, 48, 1, 3), (6, 96, 2, 5),
        (4, 96, 1, 5), (3, 96, 1, 5), (4, 96, 1, 3), (5, 160, 1, 5)]),
    "mcunet-in3": (16, 176, [
        (1, 8, 1, 3), (3, 16, 2, 7), (5, 16, 1, 3), (5, 16, 1, 7), (4, 16, 1, 5), (5, 24, 2, 5), (5, 24, 1, 5),
        (5, 24, 1, 5), (5, 40, 2, 3), (6, 40, 1, 7), (4, 40, 1, 5), (5, 48, 1, 5), (5, 48, 1, 7), (5, 48, 1, 3),
        (6, 96, 2, 3), (5, 96, 1, 7), (4, 96, 1, 3), (5, 160, 1, 7)]),
    "mcunet-in4": (32, 160, [
        (1, 16, 1, 3), (3, 24, 2, 7), (5, 24, 1, 3), (4, 24, 1, 5), (5, 40, 2, 7), (4, 40, 1, 3), (4, 40, 1, 7),
        (3, 80, 2, 7), (3, 80, 1, 3), (3, 80, 1, 7), (4, 96, 1, 3), (3, 96, 1, 5), (3, 96, 1, 5), (4, 192, 2, 7),
        (3, 192, 1, 7), (3, 192, 1, 5), (4, 320, 1, 5)]),
}


def _block(c_in: int, expand: int, c_out: int, stride: int, kernel: int) -> dict:
    return {
        "name": "MobileInvertedResidualBlock",
        "mobile_inverted_conv": {"name": "MBInvertedConvLayer", "in_channels": c_in, "out_channels": c_out,
                                 "kernel_size": kernel, "stride": stride, "expand_ratio": expand,
                                 "mid_channels": None if expand == 1 else c_in * expand,
                                 "act_func": "relu6", "use_se": False},
        "shortcut": ({"name": "IdentityLayer", "in_channels": [c_in], "out_channels": [c_out]}
                     if stride == 1 and c_in == c_out else None),
    }


def builtin_config(name: str) -> dict:
    """The upstream-format JSON config of MCUNet variant ``name`` (``mcunet-in0`` … ``mcunet-in4``)."""
    first_out, resolution, rows = TABLES[name]
    blocks, c_in = [], first_out
    for expand, c_out, stride, kernel in rows:
        blocks.append(_block(c_in, expand, c_out, stride, kernel))
        c_in = c_out
    return {
        "name": "ProxylessNASNets",
        "bn": {"momentum": 0.1, "eps": 1e-5, "ws_eps": None},
        "first_conv": {"name": "ConvLayer", "kernel_size": 3, "stride": 2, "dilation": 1, "groups": 1,
                       "bias": False, "in_channels": 3, "out_channels": first_out, "use_bn": True,
                       "act_func": "relu6", "ops_order": "weight_bn_act"},
        "blocks": blocks,
        "feature_mix_layer": None,
        "classifier": {"name": "LinearLayer", "in_features": c_in, "out_features": 1000, "bias": True,
                       "use_bn": False, "act_func": None, "dropout_rate": 0},
        "resolution": resolution,
    }
