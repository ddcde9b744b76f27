"""engine.batchnorm: the batch-statistics BatchNorm route against ATen's kernel."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.batchnorm import FastBatchNorm2d, batch_stats_norm, fast_route_applies
from engine.packing import PackedFastBatchNorm2d, pack_region


def _pair(channels, affine=True, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(channels, affine=affine, track_running_stats=False).to(dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    fast = FastBatchNorm2d(channels, affine=affine, track_running_stats=False).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("shape,affine,dtype", [((8, 6, 9, 7), True, torch.float32),
                                                ((4, 5, 3, 3), False, torch.float32),
                                                ((16, 3, 29, 29), True, torch.float64),
                                                ((2, 4, 1, 1), True, torch.float32)])
def test_fast_batchnorm_matches_aten_outputs_and_gradients(shape, affine, dtype):
    ref, fast = _pair(shape[1], affine, dtype)
    torch.manual_seed(1)
    x = (torch.randn(shape, dtype=dtype) * 3 + 2).requires_grad_()  # a mean far from 0: the two-pass variance
    grad = torch.randn(shape, dtype=dtype)
    x0, x1 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y0, y1 = ref(x0), fast(x1)
    assert y1.grad_fn is not None and "BatchStatsNorm" in y1.grad_fn.name()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(y0, y1, atol=tol, rtol=tol)
    y0.backward(grad)
    y1.backward(grad)
    assert torch.allclose(x0.grad, x1.grad, atol=tol, rtol=tol)
    if affine:
        assert torch.allclose(ref.weight.grad, fast.weight.grad, atol=50 * tol, rtol=tol)
        assert torch.allclose(ref.bias.grad, fast.bias.grad, atol=50 * tol, rtol=tol)
    ref.eval(), fast.eval()  # no running statistics: batch statistics in eval mode too
    with torch.no_grad():
        assert torch.allclose(ref(x), fast(x), atol=tol, rtol=tol)


def test_frozen_affine_parameters_get_no_gradient_and_the_input_still_does():
    ref, fast = _pair(4)
    for module in (ref, fast):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    x = torch.randn(3, 4, 5, 5)
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x0).square().sum().backward()
    fast(x1).square().sum().backward()
    assert fast.weight.grad is None and fast.bias.grad is None
    assert torch.allclose(x0.grad, x1.grad, atol=1e-5)


def test_other_routes_are_aten_bit_for_bit():
    """channels_last, running statistics, 2-D inputs and a batch of one value per channel take ATen's kernel."""
    ref, fast = _pair(6)
    x = torch.randn(4, 6, 5, 5)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not fast_route_applies(cl) and fast_route_applies(x)
    assert torch.equal(ref(cl), fast(cl))
    tracked_ref, tracked = nn.BatchNorm2d(6), FastBatchNorm2d(6)
    tracked.load_state_dict(tracked_ref.state_dict())
    assert torch.equal(tracked_ref(x), tracked(x))
    assert torch.equal(tracked_ref.running_mean, tracked.running_mean)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast(torch.randn(1, 6, 1, 1))


def test_packing_keeps_the_fast_route_and_the_state_dict():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FastBatchNorm2d(4, track_running_stats=False))
    before = copy.deepcopy(model.state_dict())
    assert pack_region(model) == ["1"] and type(model[1]) is PackedFastBatchNorm2d
    assert isinstance(model[1], nn.BatchNorm2d)
    assert model.state_dict().keys() == before.keys()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert "BatchStatsNorm" in model(x).grad_fn.name()


def test_the_function_without_grad_returns_the_same_values():
    x = torch.randn(3, 2, 4, 4)
    w, b = torch.rand(2) + 0.5, torch.randn(2)
    with torch.no_grad():
        a = batch_stats_norm(x, w, b, 1e-5)
    c = batch_stats_norm(x, w.requires_grad_(), b, 1e-5)
    assert torch.equal(a, c.detach())
