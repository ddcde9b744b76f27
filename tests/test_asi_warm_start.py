"""ASI's warm start (methods.md: one subspace-iteration step per mode per step, from the previous step's
factor): on a fixed input its captured energy climbs to that of a fresh HOSVD at the same ranks and beats
the cold start (one iteration from a random probe). A never-warm ASI (``prev = None``) stays at the cold value."""
from __future__ import annotations

import torch
from torch import nn

import engine
from engine.functional import hosvd

B, F, RANK, STEPS = 64, 48, 6, 12


def fixed_input() -> torch.Tensor:
    """(B, F) with singular values 0.85^i: a slow decay, so one random-probe iteration misses energy."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(B, B, generator=g))
    v, _ = torch.linalg.qr(torch.randn(F, F, generator=g))
    return (u[:, :F] * 0.85 ** torch.arange(F, dtype=torch.float32)) @ v.T


def test_warm_started_asi_reaches_hosvd_energy_and_beats_a_cold_start():
    torch.manual_seed(0)
    x = fixed_input()
    model = nn.Sequential(nn.Linear(F, 4))
    layer = engine.compress_model(model, "asi", layers=["0"], options={"ranks": (RANK, RANK)}).layers["0"]
    model.train()
    energies = []
    for _ in range(STEPS):
        model(x).sum().backward()
        energies.append(layer.last_stats["captured_energy"])
    core, _ = hosvd(x, (RANK, RANK))
    fresh = float(core.pow(2).sum() / x.pow(2).sum())
    cold = energies[0]
    assert abs(fresh - 0.858) < 0.01 and cold < fresh - 0.1  # the input is as intended
    assert energies[-1] >= fresh - 0.005, (energies, fresh)  # warm start converged to HOSVD's subspace
    assert energies[-1] > cold + 0.15
    assert all(b >= a - 1e-6 for a, b in zip(energies, energies[1:]))  # subspace iteration only climbs


def test_captured_energy_is_the_core_share_of_the_activation_energy_on_both_batch_routes():
    """``captured_energy = ‖core‖²/‖A‖²``, whether ‖A‖² comes from the batch Gram's trace (batch mode first:
    a wide layer at r_B = 8) or from a pass over A (batch mode last: a narrow one)."""
    from engine.methods.base import unpack_tucker
    from engine.methods.tucker import ASI

    torch.manual_seed(11)
    for shape, ranks, batch_first in [((32, 960, 7, 7), (8, 120, 4, 4), True), ((32, 6, 9, 9), (8, 3, 5, 5), False)]:
        conv = nn.Conv2d(shape[1], 4, 3, padding=1)
        model = nn.Sequential(conv)
        handle = engine.compress_model(model, "asi", layers=["0"], options={"ranks": ranks})
        layer = handle.layers["0"]
        order = [2, 3, 1] if batch_first else [1, 2, 3]
        assert ASI._batch_first_is_cheaper(shape, ranks, order) == batch_first
        x = torch.randn(shape).relu()
        stash = layer.method.compress(layer, x)
        core, _ = unpack_tucker(stash.tensors, stash.meta)
        expected = float(core.double().norm() ** 2 / x.double().norm() ** 2)
        assert abs(stash.meta["captured_energy"] - expected) < 1e-5 * expected, (shape, stash.meta["captured_energy"])


def test_lance_captured_energy_on_its_batch_first_route():
    """LANCE's batch-first route (wide layer, B ≤ 8·r_B) takes ‖A‖² from the batch Gram's trace: still
    ``‖core‖²/‖A‖²``; the batch-last route (batch 128 > 8·8) measures it by a pass."""
    from engine.methods.base import unpack_tucker

    torch.manual_seed(12)
    for batch in (32, 128):
        shape = (batch, 960, 7, 7)
        conv = nn.Conv2d(960, 4, 1)
        model = nn.Sequential(conv)
        calibration = [torch.randn(shape).relu()]
        handle = engine.compress_model(model, "lance", layers=["0"], options={"ranks": (8, 120, 4, 4)},
                                       calibration_loader=calibration, calibration_batches=1)
        layer = handle.layers["0"]
        x = torch.randn(shape).relu()
        stash = layer.method.compress(layer, x)
        core, factors = unpack_tucker(stash.tensors, stash.meta)
        assert (factors[0] is not None) and core.shape[0] == 8
        expected = float(core.double().norm() ** 2 / x.double().norm() ** 2)
        # float32 sums over 6 M elements: 1e-4 apart from float64 (either route)
        assert abs(stash.meta["captured_energy"] - expected) < 1e-3 * expected, (batch, stash.meta["captured_energy"])
