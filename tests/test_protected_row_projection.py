"""GPM / LANCE-with-input-kept on a linear layer with fewer rows than outputs project the input rows:
the same weight gradient as projecting dW itself (``dW − dW P Pᵀ``, ``dW U_F U_Fᵀ``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers import CompressedLayer
from engine.methods.protected import ProtectedLANCE


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("batch,out_features", [(8, 40), (64, 40)])  # rows < outputs (row route) and rows > outputs
def test_gpm_linear_gradient_is_dw_minus_dw_p_pt(batch, out_features):
    torch.manual_seed(0)
    layer = CompressedLayer(nn.Linear(24, out_features, bias=False).double(),
                            ProtectedLANCE("fc", protected=True, mode="full", project=True), name="fc")
    basis = _orthonormal(24, 9, 1)
    ProtectedLANCE.set_basis(layer, basis)
    basis = layer.protected_basis.double()  # as stored (float32): the two formulas agree for any P
    x = torch.randn(batch, 24, dtype=torch.float64)
    g = torch.randn(batch, out_features, dtype=torch.float64)
    layer(x).backward(g)
    dw = g.T @ x
    expected = dw - (dw @ basis) @ basis.T
    assert torch.allclose(layer.weight.grad, expected, rtol=1e-10, atol=1e-12)
    assert (layer.weight.grad @ basis).abs().max() < 1e-5  # nothing moves inside span(P) (float32 P)


def test_lance_linear_with_input_kept_stays_in_span_u():
    torch.manual_seed(0)
    method = ProtectedLANCE("fc", protected=True, mode="lance")
    layer = CompressedLayer(nn.Linear(24, 40, bias=False).double(), method, name="fc")
    u = _orthonormal(24, 20, 2)  # rank 20 of 24 at batch 4: the core (4·20) + U_F (24·20) is larger than the input
    ProtectedLANCE.set_factors(layer, u)
    u = layer.u_feat.double()
    x = torch.randn(4, 24, dtype=torch.float64)
    g = torch.randn(4, 40, dtype=torch.float64)
    layer(x).backward(g)
    assert layer.last_stats["stored"] == "raw"
    dw = g.T @ x
    assert torch.allclose(layer.weight.grad, (dw @ u) @ u.T, rtol=1e-10, atol=1e-12)
