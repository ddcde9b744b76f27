"""The fast routes of the Tucker compression give the numbers of the plain ones.

- ``pair_product`` / ``pair_expand`` / ``pair_mode_gram`` (both spatial modes of a small map at once) equal the
  per-mode products and Grams;
- ``batch_factor``'s Gram route gives the exact leading left singular vectors (``n ≥ B`` and ``n < B``);
- ASI's Gram routes (the batch mode, the spatial pair) run the same warm subspace iteration as its
  per-mode route, and LANCE's pair projection equals its per-mode projection.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import engine
from engine import tensor_ops as T
from engine.methods import base


def _orth(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q


def _subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖P_a − P_b‖ of two orthonormal bases' projectors (0: the same span)."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 4, 6, 5), (4, 3, 1, 8)])
def test_pair_product_and_expand_equal_the_per_mode_products(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u_h, u_w = _orth(shape[2], max(1, shape[2] // 2), 1), _orth(shape[3], max(1, shape[3] // 2), 2)
    sequential = T.mode_product(T.mode_product(x, u_h, 2), u_w, 3)
    paired = T.pair_product(x, u_h, u_w)
    assert paired.shape == sequential.shape
    assert torch.allclose(paired, sequential, atol=1e-12, rtol=0)
    lifted = T.mode_expand(T.mode_expand(paired, u_h, 2), u_w, 3)
    assert torch.allclose(T.pair_expand(paired, u_h, u_w), lifted, atol=1e-12, rtol=0)
    # transposed (non-contiguous) factors, as the padded factors of a weight gradient arrive
    assert torch.allclose(T.pair_product(x, u_h.T.contiguous().T, u_w.T.contiguous().T), sequential, atol=1e-12)


def test_pair_mode_grams_equal_the_mode_grams_before_and_after_projecting_the_other_mode():
    x = torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u_h, u_w = _orth(6, 2, 4), _orth(5, 3, 5)
    gram4 = T.pair_gram(x)
    assert gram4.shape == (6, 5, 6, 5)
    assert torch.allclose(T.pair_mode_gram(gram4, 0), T.mode_gram(x, 2), atol=1e-10)
    assert torch.allclose(T.pair_mode_gram(gram4, 1), T.mode_gram(x, 3), atol=1e-10)
    assert torch.allclose(T.pair_mode_gram(gram4, 1, u_h), T.mode_gram(T.mode_product(x, u_h, 2), 3), atol=1e-10)
    assert torch.allclose(T.pair_mode_gram(gram4, 0, u_w), T.mode_gram(T.mode_product(x, u_w, 3), 2), atol=1e-10)


@pytest.mark.parametrize("batch, n", [(32, 500), (40, 12)], ids=["wide", "narrow"])
def test_batch_factor_gram_route_is_the_exact_leading_left_singular_subspace(batch, n):
    g = torch.Generator().manual_seed(6)
    u, _ = torch.linalg.qr(torch.randn(batch, batch, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(batch, n)
    m = (u[:, :k] * 0.7 ** torch.arange(k, dtype=torch.float64)) @ v[:, :k].T  # (B, n), σ_i = 0.7^i
    assert base.gram_route(batch, n)
    factor, flops = base.batch_factor(m, 4, torch.Generator().manual_seed(0))
    assert factor.shape == (batch, 4) and flops > 0
    assert torch.allclose(factor.T @ factor, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert _subspace_gap(factor, u[:, :4]) < 1e-8


def test_batch_factor_range_finder_above_the_gram_limit_still_finds_the_subspace(monkeypatch):
    monkeypatch.setattr(base, "gram_route", lambda batch, n: False)
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    m = (u[:, :4] * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)) @ torch.randn(4, 300, generator=g,
                                                                                          dtype=torch.float64)
    factor, _ = base.batch_factor(m, 4, torch.Generator().manual_seed(0))
    assert _subspace_gap(factor, torch.linalg.qr(m).Q[:, :4]) < 1e-8  # rank-4 input: the span is exact


def _asi_layer(shape, ranks):
    conv = nn.Conv2d(shape[1], 5, 3, padding=1).double()
    model = nn.Sequential(conv)
    handle = engine.compress_model(model, "asi", layers=["0"], options={"ranks": ranks})
    return model, handle.layers["0"]


@pytest.mark.parametrize("route", ["pair", "batch"])
def test_asi_gram_routes_run_the_same_warm_iteration_as_the_per_mode_route(route, monkeypatch):
    shape, ranks = (6, 16, 5, 5), (3, 4, 3, 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).relu()
    model, layer = _asi_layer(shape, ranks)
    for mode, (d, r) in enumerate(zip(shape, ranks)):  # the same warm state for both routes
        layer._buffers[f"asi_factor_{mode}"] = _orth(d, r, 10 + mode)
    fast = copy.deepcopy(layer)
    plain = copy.deepcopy(layer)
    fast.method.compress(fast, x)
    if route == "pair":
        monkeypatch.setattr(T, "PAIR_MAX_POSITIONS", 0)
    else:
        monkeypatch.setattr(type(plain.method), "GRAM_ROWS_PER_RANK", 0)
    plain.method.compress(plain, x)
    modes = (2, 3) if route == "pair" else (0,)
    for mode in modes:
        a, b = fast._buffers[f"asi_factor_{mode}"], plain._buffers[f"asi_factor_{mode}"]
        assert _subspace_gap(a, b) < 1e-8, (mode, _subspace_gap(a, b))


def test_asi_pair_route_is_taken_on_small_maps_and_not_on_large_ones(monkeypatch):
    calls = []
    real = T.pair_gram
    monkeypatch.setattr(T, "pair_gram", lambda x: calls.append(tuple(x.shape)) or real(x))
    for side, expected in ((5, 1), (9, 0)):  # 25 positions fit, 81 do not (PAIR_MAX_POSITIONS = 64)
        calls.clear()
        x = torch.randn(4, 8, side, side, dtype=torch.float64)
        _, layer = _asi_layer(x.shape, (4, 4, 2, 2))
        layer.method.compress(layer, x)
        assert len(calls) == expected, (side, calls)


def test_lance_pair_projection_equals_the_per_mode_projection(monkeypatch):
    torch.manual_seed(9)
    x = torch.randn(8, 6, 6, 6).relu()
    model = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1))
    handle = engine.compress_model(model, "lance", layers=["0"], options={"ranks": (8, 3, 3, 3)},
                                   calibration_loader=[x], calibration_batches=1)
    layer = handle.layers["0"]
    paired = layer.method.compress(layer, x).tensors[0]
    monkeypatch.setattr(T, "PAIR_MAX_POSITIONS", 0)
    plain = layer.method.compress(layer, x).tensors[0]
    assert paired.shape == plain.shape == (8, 3, 3, 3)
    assert torch.allclose(paired, plain, atol=1e-5, rtol=1e-5)
