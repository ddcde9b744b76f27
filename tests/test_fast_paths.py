"""The speed paths compute what the plain paths compute: HOSVD's wide-mode factor from the small Gram."""
from __future__ import annotations

import pytest
import torch

from engine import spectra as S
from engine import tensor_ops as T
from engine.methods.tucker import HOSVD


def _plain_factor(x, mode, eps):
    values, vectors = S.eigh_descending(T.mode_gram(x, mode))
    r = S.rank_for_energy(values, eps)
    return r, vectors[:, :r]


@pytest.mark.parametrize("shape,mode", [((16, 300), 1), ((4, 6, 200), 2), ((3, 50, 2, 2), 1)])
@pytest.mark.parametrize("eps", [0.5, 0.8, 0.99])
def test_hosvd_wide_mode_factor_spans_the_plain_one(shape, mode, eps):
    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -2, shape[mode]).reshape([-1 if i == mode else 1 for i in range(len(shape))])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * decay).relu()
    assert x.shape[mode] > x.numel() // x.shape[mode]  # the wide case
    r_plain, plain = _plain_factor(x, mode, eps)
    r, factor, flops = HOSVD(eps=eps)._wide_mode_factor(x, mode)
    assert r == r_plain and 1 <= r < x.shape[mode]
    assert flops < 2 * x.numel() * x.shape[mode] + 9 * x.shape[mode] ** 3
    assert torch.allclose(factor.T @ factor, torch.eye(r, dtype=x.dtype), atol=1e-10)
    assert torch.allclose(factor @ factor.T, plain @ plain.T, atol=1e-6)  # the same subspace


def test_hosvd_full_energy_on_a_wide_linear_input_is_exact():
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stash = HOSVD(eps=1.0).compress(None, x)
    assert stash.meta["ranks"][1] == 8  # rank of an 8 × 100 matrix
    factors = dict(zip(stash.meta["factor_modes"], stash.tensors[1:]))
    y = stash.tensors[0]
    for mode, f in factors.items():
        y = T.mode_expand(y, f, mode)
    assert torch.allclose(y, x, atol=1e-10)
