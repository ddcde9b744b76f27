"""Never worse than raw: a layer whose compressed form would not be smaller than its activation stores
the activation (exact gradient) and says so; the rank selection offers "uncompressed" and never picks
an option costlier than raw."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import engine
from engine.calibration import select_ranks_from_arrays
from engine.functional import tucker_bytes
from engine.methods.base import stored_bytes, stores_raw
from engine.models import build_backbone

METHODS = [("vanilla", {}), ("gradient_filter", {"patch": 2}), ("hosvd", {"eps": 0.8}), ("asi", {}),
           ("lance", {"eps": 0.8})]


def _calibration(shape, n=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((16,) + tuple(shape[1:]), generator=g) for _ in range(n)]


def _measure(model, names, method, options, x, calibration=None):
    handle = engine.compress_model(model, method, layers=names, options=options, calibration_loader=calibration)
    with engine.SavedBytesMeter(model) as meter:
        out = model(x)
    out.sum().backward()
    return handle.stats(), dict(meter.per_layer_bytes)


@pytest.mark.parametrize("batch", [1, 4, 128])
@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_small_cnn_layers_never_store_more_than_raw(method, options, batch):
    torch.manual_seed(0)
    bb = build_backbone("small-cnn", weights="none", num_classes=10)
    model = bb.model
    names = ["block1.conv", "block2.conv", "block3.conv", "classifier"]
    x = torch.randn(batch, 3, 32, 32)
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(2)] if method == "lance" else None
    stats, measured = _measure(model, names, method, options, x, calibration)
    for name in names:
        s = stats[name]
        raw = math.prod(s["activation_shape"]) * 4
        assert s["full_bytes"] == raw
        assert measured[name] == s["stored_bytes"] == s["analytic_bytes"] <= raw, (name, s)
        assert s["stored"] in ("raw", "compressed")
        if s["stored"] == "raw":
            assert s["stored_bytes"] == raw and s["ranks"] == s["activation_shape"]
        else:
            assert s["stored_bytes"] < raw
    if method == "vanilla":
        assert all(stats[n]["stored"] == "raw" for n in names)
    if method == "asi" and batch == 1:
        # the known case: ASI's default ranks at batch 1 were 538.8 kB against vanilla's 114.7 kB
        assert sum(measured.values()) <= sum(stats[n]["full_bytes"] for n in names)
        assert stats["classifier"]["stored"] == "raw"  # (1, 1024) at ranks (1, 128): 132 096 B > 4 096 B


@pytest.mark.parametrize("batch", [1, 4, 128])
@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("shape", [(24,), (5, 24)], ids=["2d", "3d"])
def test_linear_layer_never_stores_more_than_raw(method, options, batch, shape):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 10))
    x = torch.randn((batch,) + shape)
    calibration = _calibration(x.shape) if method == "lance" else None
    stats, measured = _measure(model, ["0"], method, options, x, calibration)
    s = stats["0"]
    assert measured["0"] == s["stored_bytes"] <= s["full_bytes"] == x.numel() * 4, s
    expected_raw = s["stored_bytes"] == s["full_bytes"]
    assert (s["stored"] == "raw") == expected_raw


def _autograd_grads(layer, x, grad_output):
    ref = copy.deepcopy(layer)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(grad_output)
    return ref.weight.grad, ref.bias.grad, xr.grad


@pytest.mark.parametrize("method,options", [("asi", {"ranks": (1, 15, 8, 8)}), ("hosvd", {"eps": 1.0}),
                                            ("gradient_filter", {"patch": 1}), ("lance", {"eps": 1.0})])
def test_raw_fallback_gradients_equal_autograd(method, options):
    """ASI at (1, 15, 8, 8) on a (1, 16, 8, 8) input: 960 + 240 = 1200 elements > 1024 raw; HOSVD/LANCE at
    ε = 1 and a 1x1 gradient-filter patch keep (nearly) everything: all must store the input and give
    autograd's gradients."""
    torch.manual_seed(2)
    layer = nn.Conv2d(16, 6, 3, padding=1).double()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    grad_output = torch.randn(1, 6, 8, 8, dtype=torch.float64)
    w_ref, b_ref, x_ref = _autograd_grads(layer, x, grad_output)
    model = nn.Sequential(copy.deepcopy(layer))
    calibration = [torch.randn(1, 16, 8, 8, dtype=torch.float64) for _ in range(3)] if method == "lance" else None
    handle = engine.compress_model(model, method, layers=["0"], options=options, calibration_loader=calibration)
    xc = x.clone().requires_grad_(True)
    model(xc).backward(grad_output)
    s = handle.stats()["0"]
    assert s["stored"] == "raw" and s["stored_bytes"] == x.numel() * 8, s
    torch.testing.assert_close(model[0].weight.grad, w_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].bias.grad, b_ref, rtol=0, atol=0)
    torch.testing.assert_close(xc.grad, x_ref, rtol=1e-12, atol=1e-12)


def test_the_rule_is_a_byte_comparison():
    # mcunet-in3's classifier at a 100KB budget: ranks (33, 48) on a (64, 160) input
    shape = (64, 160)
    assert tucker_bytes(shape, (33, 48)) == 45_504 and math.prod(shape) * 4 == 40_960
    assert stored_bytes(shape, (33, 48)) == (40_960, True)
    assert stored_bytes(shape, (8, 20)) == (tucker_bytes(shape, (8, 20)), False)
    assert stores_raw(40_960, 40_960) and not stores_raw(40_959, 40_960)


def test_knapsack_never_picks_an_option_costlier_than_raw():
    # layer a: its best-perplexity option (45 504 B) costs more than raw (40 960 B)
    names, grid = ["a", "b"], [0.5, 0.9, 0.99]
    ranks = [[[8, 10], [20, 30], [33, 48]], [[2, 3], [4, 6], [8, 9]]]
    shapes = [[64, 160], [8, 12]]
    bytes_ = [[tucker_bytes(shapes[0], r) for r in ranks[0]], [tucker_bytes(shapes[1], r) for r in ranks[1]]]
    full = [40_960, 8 * 12 * 4]
    assert bytes_[0][2] > full[0]
    perplexity = [[5.0, 1.0, 0.1], [2.0, 1.0, 0.5]]
    for budget in range(sum(min(b) for b in bytes_), 60_000, 997):
        selection = select_ranks_from_arrays(names, grid, ranks, bytes_, perplexity, budget,
                                             full_bytes=full, shapes=shapes)
        assert selection.total_bytes <= budget
        for choice, raw in zip(selection.layers, full):
            assert choice.bytes <= raw
            assert (choice.stored == "raw") == (choice.eps is None)
            if choice.stored == "raw":
                assert choice.bytes == raw and choice.perplexity == 0.0
    # with room for everything, layer a is stored raw (exact) rather than at the 45 504 B option
    top = select_ranks_from_arrays(names, grid, ranks, bytes_, perplexity, 100_000, full_bytes=full, shapes=shapes)
    assert top.layers[0].stored == "raw" and top.layers[0].ranks == [64, 160] and top.layers[0].bytes == 40_960
    # without shapes the costlier option is still dropped (no raw option to offer)
    no_raw = select_ranks_from_arrays(names, grid, ranks, bytes_, perplexity, 100_000, full_bytes=full)
    assert no_raw.layers[0].eps == 0.9 and no_raw.layers[0].bytes < full[0]
