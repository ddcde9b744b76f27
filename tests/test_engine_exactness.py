"""Engine core: at full rank every method but gradient filter is exact, for every layer configuration."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import engine
import engine.depthwise as depthwise
import engine.geometry as geometry_mod
from engine import functional as Fn
from engine import tensor_ops as T

CONV_CONFIGS = {
    "plain": dict(in_channels=6, out_channels=10, kernel_size=3, padding=1),
    "stride2_dilation2": dict(in_channels=6, out_channels=10, kernel_size=3, stride=2, dilation=2, padding=1),
    "per_axis_padding": dict(in_channels=6, out_channels=10, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "same_even_kernel": dict(in_channels=6, out_channels=10, kernel_size=4, padding="same"),
    "same_dilated": dict(in_channels=6, out_channels=10, kernel_size=3, padding="same", dilation=2),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    "depthwise_multiplier": dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6),
    "grouped": dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3),
    # kernels of 10+ taps: the depthwise weight gradient runs in channels_last (engine.geometry)
    "depthwise_7x7": dict(in_channels=6, out_channels=6, kernel_size=7, padding=3, groups=6),
    "depthwise_5x7_stride2_multiplier": dict(in_channels=6, out_channels=12, kernel_size=(5, 7), stride=2,
                                             padding=(2, 1), groups=6),
    "no_bias_stride3": dict(in_channels=6, out_channels=10, kernel_size=3, stride=3, bias=False),
    "pointwise": dict(in_channels=6, out_channels=10, kernel_size=1),
}
INPUT = (5, 6, 9, 10)


def _full_rank_options(method: str, shape) -> dict:
    return {"hosvd": {"eps": 1.0}, "asi": {"ranks": tuple(shape)}, "lance": {"eps": 1.0}, "vanilla": {}}[method]


def _compare(layer: nn.Module, x: torch.Tensor, method: str, options: dict, calibration=None):
    reference = copy.deepcopy(layer)
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)

    model = nn.Sequential(copy.deepcopy(layer))
    engine.compress_model(model, method, layers=["0"], options=options, calibration_loader=calibration)
    x_c = x.clone().requires_grad_(True)
    out = model(x_c)
    assert torch.equal(out, out_ref) or torch.allclose(out, out_ref, rtol=1e-6, atol=1e-6), "forward must be exact"
    out.backward(grad_output)

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    errors = {"weight": rel(model[0].weight.grad, reference.weight.grad), "input": rel(x_c.grad, x_ref.grad)}
    if reference.bias is not None:
        errors["bias"] = rel(model[0].bias.grad, reference.bias.grad)
    return errors


@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
@pytest.mark.parametrize("method", ["vanilla", "hosvd", "asi", "lance"])
def test_conv_full_rank_matches_autograd(config, method):
    torch.manual_seed(0)
    layer = nn.Conv2d(**CONV_CONFIGS[config])
    x = torch.randn(INPUT)
    calibration = [torch.randn(INPUT) for _ in range(2)] if method == "lance" else None
    errors = _compare(layer, x, method, _full_rank_options(method, INPUT), calibration)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 7), (3, 4, 5, 7)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("method", ["vanilla", "hosvd", "asi", "lance"])
def test_linear_full_rank_matches_autograd(shape, method):
    torch.manual_seed(1)
    layer = nn.Linear(7, 9)
    x = torch.randn(shape)
    calibration = [torch.randn(shape) for _ in range(2)] if method == "lance" else None
    errors = _compare(layer, x, method, _full_rank_options(method, shape), calibration)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
def test_compressed_space_weight_grad_exact_with_full_orthogonal_factors(config):
    """The §3 contraction itself (padding in factor space, channel lift, grouped path) with real factors."""
    torch.manual_seed(2)
    layer = nn.Conv2d(**CONV_CONFIGS[config]).double()
    x = torch.randn(INPUT, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    factors = [torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q for d in INPUT]
    core = x.detach()
    for mode, factor in enumerate(factors):
        core = T.mode_product(core, factor, mode)
    dw = Fn.tucker_weight_grad(layer, core, factors, grad_output)
    assert float((dw - layer.weight.grad).norm() / layer.weight.grad.norm()) < 1e-12


@pytest.mark.parametrize("channels_first", [True, False], ids=["channels_first", "spatial_first"])
@pytest.mark.parametrize("config", ["depthwise", "depthwise_multiplier", "grouped"])
def test_grouped_weight_grad_at_low_rank_equals_reconstructed_input(config, channels_first, monkeypatch):
    """A grouped conv lifts channels and spatial modes in the cheaper order; both orders give the dW of the
    reconstructed input ``x̂ = core ×_m U_m`` (truncated, non-square factors), to rounding."""
    monkeypatch.setattr(Fn, "_channels_first_is_cheaper", lambda *args: channels_first)
    torch.manual_seed(4)
    layer = nn.Conv2d(**CONV_CONFIGS[config]).double()
    x = torch.randn(INPUT, dtype=torch.float64)
    ranks = (3, 4, 5, 6)
    factors = [torch.linalg.qr(torch.randn(d, r, dtype=torch.float64)).Q for d, r in zip(INPUT, ranks)]
    core = x
    for mode, factor in enumerate(factors):
        core = T.mode_product(core, factor, mode)
    assert _reconstructed_input_dw_error(layer, core, factors) < 1e-12


def _reconstructed_input_dw_error(layer: nn.Conv2d, core: torch.Tensor, factors) -> float:
    """Relative error of the compressed-space dW from ``(core, factors)`` against autograd's dW of the
    reconstructed input ``x̂ = core ×_m U_m`` (a random output gradient)."""
    x_hat = core
    for mode, factor in enumerate(factors):
        x_hat = T.mode_expand(x_hat, factor, mode)
    layer.zero_grad(set_to_none=True)
    out = layer(x_hat)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    dw = Fn.tucker_weight_grad(layer, core, factors, grad_output)
    return float((dw - layer.weight.grad).norm() / layer.weight.grad.norm())


def test_depthwise_lifts_channels_first_where_that_is_cheaper():
    """MobileNetV2's 960-channel depthwise core (8, 120, 4, 4) padded to 9×9: channels first (18 M MACs, not 75 M)."""
    assert Fn._channels_first_is_cheaper((8, 120, 4, 4), (32, 960, 7, 7), (1, 1, 1, 1))
    # barely compressed spatial modes, few channels: lifting the spatial modes first is cheaper
    assert not Fn._channels_first_is_cheaper((8, 2, 56, 56), (32, 4, 56, 56), (1, 1, 1, 1))


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 7), (3, 4, 5, 7)], ids=["2d", "3d", "4d"])
def test_linear_compressed_space_with_full_orthogonal_factors(shape):
    torch.manual_seed(3)
    layer = nn.Linear(7, 4).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    factors = [torch.linalg.qr(torch.randn(d, d, dtype=torch.float64)).Q for d in shape]
    core = x.detach()
    for mode, factor in enumerate(factors):
        core = T.mode_product(core, factor, mode)
    dw = Fn.linear_weight_grad(core, factors, grad_output)
    assert dw.shape == layer.weight.shape
    assert float((dw - layer.weight.grad).norm() / layer.weight.grad.norm()) < 1e-12


@pytest.mark.parametrize("method", ["vanilla", "hosvd", "asi", "lance"])
@pytest.mark.parametrize("config", ["stride2_dilation2", "same_even_kernel", "grouped"])
def test_gradcheck_fp64_full_rank(method, config):
    torch.manual_seed(4)
    shape = (3, 6, 6, 7)
    conv = nn.Conv2d(**CONV_CONFIGS[config]).double()
    model = nn.Sequential(conv)
    calibration = [torch.randn(shape, dtype=torch.float64)] if method == "lance" else None
    engine.compress_model(model, method, layers=["0"], options=_full_rank_options(method, shape),
                          calibration_loader=calibration)
    layer = model[0]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    # gradcheck over the input, weight and bias through the compressed Function
    from engine.layers import _CompressedOp

    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True) if layer.bias is not None else None
    inputs = (x, weight, bias) if bias is not None else (x, weight)

    def op(*args):
        return _CompressedOp.apply(args[0], args[1], args[2] if len(args) > 2 else None, layer)

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_linear_gradcheck_fp64_3d():
    from engine.layers import _CompressedOp

    torch.manual_seed(5)
    shape = (3, 4, 5)
    model = nn.Sequential(nn.Linear(5, 3).double())
    engine.compress_model(model, "asi", layers=["0"], options={"ranks": shape})
    layer = model[0]
    inputs = (torch.randn(shape, dtype=torch.float64, requires_grad=True),
              layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, w, b: _CompressedOp.apply(x, w, b, layer), inputs, eps=1e-6, atol=1e-7)


def test_gradient_filter_patch1_pointwise_is_exact():
    """With R = 1 on a 1×1 stride-1 conv, the filtered gradients equal the exact ones."""
    torch.manual_seed(6)
    layer = nn.Conv2d(6, 8, 1)
    errors = _compare(layer, torch.randn(INPUT), "gradient_filter", {"patch": 1})
    assert max(errors.values()) < 1e-5, errors


def test_gradient_filter_patch_constant_fields():
    """Activations and output gradients constant over each 2×2 patch: the pooled dW of a 1×1 conv is exact."""
    torch.manual_seed(7)
    layer = nn.Conv2d(4, 5, 1)
    coarse_x = torch.randn(3, 4, 3, 3)
    x = coarse_x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    model = nn.Sequential(copy.deepcopy(layer))
    engine.compress_model(model, "gradient_filter", layers=["0"], options={"patch": 2})
    grad_output = torch.randn(3, 5, 3, 3).repeat_interleave(2, 2).repeat_interleave(2, 3)
    model(x).backward(grad_output)
    reference = copy.deepcopy(layer)
    reference(x).backward(grad_output)
    assert torch.allclose(model[0].weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    # and a field that varies inside the patches is only approximated (the filter is lossy)
    model.zero_grad()
    reference.zero_grad()
    x2, g2 = torch.randn(3, 4, 6, 6), torch.randn(3, 5, 6, 6)
    model(x2).backward(g2)
    reference(x2).backward(g2)
    assert not torch.allclose(model[0].weight.grad, reference.weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("route", ["taps", "channels_last", "nchw"])
def test_exact_large_depthwise_weight_grad_routes_equal_aten(route, dtype, monkeypatch):
    """The exact dW of a 7×7 depthwise conv: a small map at batch 4 takes the taps route (engine.depthwise), a
    larger one channels_last (float32; float64 stays NCHW), 3×3 kernels NCHW; each equals ATen's NCHW dW."""
    from engine.geometry import conv_geometry, depthwise_grad_in_channels_last

    x32 = torch.empty(2, 8, 12, 12)
    assert depthwise_grad_in_channels_last(x32, (8, 1, 7, 7), 8)
    assert depthwise_grad_in_channels_last(x32, (16, 1, 5, 2), 8)  # 10 taps, channel multiplier 2
    assert not depthwise_grad_in_channels_last(x32, (8, 1, 3, 3), 8)
    assert not depthwise_grad_in_channels_last(x32, (8, 2, 7, 7), 4)
    assert not depthwise_grad_in_channels_last(x32.double(), (8, 1, 7, 7), 8)
    assert not depthwise_grad_in_channels_last(x32, (8, 8, 7, 7), 1)
    assert not depthwise_grad_in_channels_last(torch.empty(1, 8, 6, 6), (8, 1, 7, 7), 8)  # 36 positions: NCHW

    torch.manual_seed(3)
    conv = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=False).to(dtype)
    geometry = conv_geometry(conv)
    side = {"taps": 6, "channels_last": 16, "nchw": 16}[route]
    if route == "nchw":
        monkeypatch.setattr(geometry_mod, "DEPTHWISE_CHANNELS_LAST_MIN_TAPS", 1 << 30)
    assert depthwise.exact_taps_route((4, 8, side, side), geometry, conv.weight.shape) == (route == "taps")
    x, g = torch.randn(4, 8, side, side, dtype=dtype), torch.randn(4, 8, side, side, dtype=dtype)
    grad = geometry.weight_grad(x, g, conv.weight.shape, 8, padded=False)
    reference = torch.ops.aten.convolution_backward(
        g, x, conv.weight.detach(), None, [1, 1], [3, 3], [1, 1], False, [0, 0], 8, [False, True, False])[1]
    assert grad.is_contiguous() and grad.shape == conv.weight.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((grad - reference).abs().max() / reference.abs().max()) < tolerance


LARGE_DEPTHWISE = {
    "depthwise_7x7": CONV_CONFIGS["depthwise_7x7"],
    "depthwise_5x7_stride2_multiplier": CONV_CONFIGS["depthwise_5x7_stride2_multiplier"],
    "depthwise_same_4x5_dilated": dict(in_channels=6, out_channels=6, kernel_size=(4, 5), padding="same",
                                       dilation=(1, 2), groups=6),  # asymmetric padding (4 rows)
}
LARGE_INPUT = (3, 6, 16, 18)
#: spatial ranks per route: (3, 4) → r_H·r_W = 12, within 2× the kernel's taps (the taps route); (12, 13) → 156,
#: more (the core lifted to the unpadded map, the kernel pads, in channels_last where the padding is symmetric)
ROUTE_RANKS = {"taps": (3, 4, 3, 4), "kernel_pads": (3, 4, 12, 13), "factor_space": (3, 4, 12, 13)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("route", list(ROUTE_RANKS))
@pytest.mark.parametrize("config", list(LARGE_DEPTHWISE))
def test_large_depthwise_compressed_weight_grad_equals_reconstructed_input(config, route, dtype, monkeypatch):
    """Truncated factors: each route of a large depthwise kernel's compressed dW (the taps route in factor space;
    the lift to the unpadded map padded by the kernel, in channels_last; the factor-space padding in NCHW)
    equals the dW of the reconstructed input ``x̂``."""
    if route == "factor_space":
        monkeypatch.setattr(depthwise, "LARGE_KERNEL_TAPS", 1 << 30)
        monkeypatch.setattr(geometry_mod, "DEPTHWISE_CHANNELS_LAST_MIN_TAPS", 1 << 30)
    torch.manual_seed(5)
    layer = nn.Conv2d(**LARGE_DEPTHWISE[config]).to(dtype)
    ranks = ROUTE_RANKS[route]
    factors = [torch.linalg.qr(torch.randn(d, r, dtype=dtype)).Q for d, r in zip(LARGE_INPUT, ranks)]
    core = torch.randn(ranks, dtype=dtype)
    geometry = geometry_mod.conv_geometry(layer)
    assert depthwise.taps_route(core.shape, factors, geometry, layer.weight.shape) == (route == "taps")
    assert not depthwise.exact_taps_route(LARGE_INPUT, geometry, layer.weight.shape)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert _reconstructed_input_dw_error(layer, core, factors) < tolerance


@pytest.mark.parametrize("config", list(LARGE_DEPTHWISE))
def test_taps_route_on_a_raw_activation_is_autograds_weight_grad(config):
    """The taps route with identity spatial factors (the exact route): stride, dilation, asymmetric padding and
    channel multiplier, float64, against autograd."""
    torch.manual_seed(6)
    layer = nn.Conv2d(**LARGE_DEPTHWISE[config]).double()
    x = torch.randn(4, 6, 7, 8, dtype=torch.float64)
    out = layer(x)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    geometry = geometry_mod.conv_geometry(layer)
    dw = depthwise.taps_weight_grad(x, (None,) * 4, grad_output, geometry, layer.weight.shape)
    assert float((dw - layer.weight.grad).norm() / layer.weight.grad.norm()) < 1e-12


FLIPPED_INPUT_GRAD = {  # depthwise, stride 1, multiplier 1: dX as a forward conv with the flipped kernel
    "3x3": dict(kernel_size=3, padding=1),
    "7x7": dict(kernel_size=7, padding=3),
    "dilated_3x3": dict(kernel_size=3, padding=2, dilation=2),
    "per_axis_3x5": dict(kernel_size=(3, 5), padding=(1, 2)),
    "valid_3x3": dict(kernel_size=3, padding=0),
    "same_odd_dilated": dict(kernel_size=3, padding="same", dilation=(2, 1)),
    "pointwise_depthwise": dict(kernel_size=1),
}
NOT_FLIPPED = {  # these keep ATen's backward-data kernel
    "stride2": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, stride=2, groups=6),
    "multiplier2": dict(in_channels=6, out_channels=12, kernel_size=3, padding=1, groups=6),
    "grouped": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=3),
    "dense": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1),
    "same_even": dict(in_channels=6, out_channels=6, kernel_size=4, padding="same", groups=6),  # asymmetric
    "overpadded": dict(in_channels=6, out_channels=6, kernel_size=3, padding=3, groups=6),  # p > (k−1)·d
}


@pytest.mark.parametrize("config", list(FLIPPED_INPUT_GRAD) + list(NOT_FLIPPED))
def test_depthwise_input_grad_routes_equal_autograd(config):
    """A stride-1 depthwise conv's dX runs as the forward correlation of G with the flipped kernel
    (``ConvGeometry.flipped_input_grad``); it and ATen's backward-data route equal autograd (float64)."""
    flipped = config in FLIPPED_INPUT_GRAD
    kwargs = NOT_FLIPPED.get(config) or dict(in_channels=6, out_channels=6, groups=6, **FLIPPED_INPUT_GRAD[config])
    torch.manual_seed(7)
    layer = nn.Conv2d(bias=False, **kwargs).double()
    x = torch.randn(3, 6, 9, 10, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_output = torch.randn_like(out)
    (reference,) = torch.autograd.grad(out, x, grad_output)
    geometry = geometry_mod.conv_geometry(layer)
    assert geometry.flipped_input_grad(grad_output, layer.weight) == flipped
    with torch.no_grad():
        grad = geometry.input_grad(grad_output, layer.weight, x.shape)
    assert grad.shape == x.shape
    assert float((grad - reference).abs().max() / reference.abs().max()) < 1e-12
