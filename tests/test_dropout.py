"""engine.dropout.FastDropout: the continual nets' dropout with a numpy-drawn CPU mask."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.dropout import FastDropout, keep_mask
from engine.memory import SavedBytesMeter
from engine.models import build_multihead
from engine.packing import PackedFastDropout, pack_region, unpack_region


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_keep_fraction_is_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    sigma = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(float(mask.float().mean()) - (1 - p)) < 5 * sigma  # 5σ: 0.002 at p = 0.5


def test_masks_follow_torch_manual_seed():
    torch.manual_seed(7)
    a = keep_mask((64, 100), 0.3)
    torch.manual_seed(7)
    b = keep_mask((64, 100), 0.3)
    c = keep_mask((64, 100), 0.3)  # the generator moved on
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_is_x_over_keep_or_zero_and_packing_is_bit_for_bit(dtype):
    drop = FastDropout(0.2).train()
    packed = copy.deepcopy(drop)
    pack_region(packed)
    assert type(packed) is PackedFastDropout
    x = torch.randn(8, 3, 9, 11, dtype=dtype, generator=torch.Generator().manual_seed(1))
    results = []
    for module in (drop, packed):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        with SavedBytesMeter(module) as meter:
            y = module(xi)
        cot = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
        (grad,) = torch.autograd.grad(y, xi, cot)
        results.append((y.detach(), grad, meter.region_activation_bytes, cot))
    (y0, g0, bytes0, cot), (y1, g1, bytes1, _) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    kept = y0 != 0
    scale = torch.ones((), dtype=dtype) / torch.tensor(0.8, dtype=dtype)
    assert torch.equal(y0[kept], x[kept] * scale)
    assert torch.equal(g0, torch.where(kept, cot * scale, torch.zeros((), dtype=dtype)))
    assert 0.7 < float(kept.float().mean()) < 0.9
    assert bytes0 == x.numel()  # the bool mask
    assert bytes1 == (x.numel() + 7) // 8  # its bits
    unpack_region(packed)
    assert type(packed) is FastDropout


def test_eval_mode_and_p_zero_are_identity():
    x = torch.randn(4, 10)
    assert torch.equal(FastDropout(0.5).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def test_alexnet_cl_uses_it():
    net = build_multihead("alexnet-cl", [2, 2], 32)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is FastDropout for m in drops)


def _documented_mask(seed: int, n: int, p: float):
    """keep_mask's documented rule, element by element: u_i < T_hi, and on u_i == T_hi the next tie draw v < T_lo."""
    import numpy as np

    threshold = round((1 - p) * 2 ** 32)
    high, low = threshold >> 16, threshold & 0xFFFF
    stream = np.random.PCG64(seed)
    u = stream.random_raw((n + 3) // 4).view(np.uint16)[:n]
    ties = int((u == high).sum())
    tie_draws = list(stream.random_raw((ties + 3) // 4).view(np.uint16)[:ties]) if ties else []
    want, k = [], 0
    for value in u.tolist():
        if value == high:
            want.append(tie_draws[k] < low)
            k += 1
        else:
            want.append(value < high)
    return torch.tensor(want), ties


@pytest.mark.parametrize("shape", [(7,), (64, 101), (3, 5, 9, 11)])
def test_mask_is_the_documented_stream(shape):
    """keep_i = u_i < T_hi (u: the stream's uint16s, T = round((1 − p)·2³²)), ties settled by further draws."""
    import numpy as np

    torch.manual_seed(11)
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,)).item())
    n = int(np.prod(shape))
    want, _ = _documented_mask(seed, n, 0.3)
    torch.manual_seed(11)
    got = keep_mask(shape, 0.3)
    assert got.shape == shape
    assert torch.equal(got.reshape(-1), want)


def test_ties_on_the_high_half_are_settled_by_the_low_half():
    """Over 300,000 draws some land on T_hi exactly (one in 65,536): each of them is decided by a further draw
    against T_lo, so the keep probability is T / 2³², not T_hi / 2¹⁶."""
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,)).item())
    want, ties = _documented_mask(seed, 300_000, 0.2)
    assert ties >= 1
    torch.manual_seed(5)
    assert torch.equal(keep_mask((300_000,), 0.2), want)
