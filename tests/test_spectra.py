"""The one home for spectra (engine.spectra): the rank rule's edge cases, the true-mean Gram accumulator,
and the same ranks at ε from LANCE's training calibration and from `lance calibrate` on real layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MCUNET_IN3_DIR, SHARED, needs_cifar10_jpeg, needs_mcunet_weights
from torch import nn

import engine
from engine import tensor_ops as T
from engine.calibration import calibrate_model
from engine.calibration.pipeline import calibration_batches
from engine.functional import hosvd_ranks
from engine.methods.calibration import calibrate_layers
from engine.spectra import (
    ENERGY_TOLERANCE,
    GramAccumulator,
    eigh_descending,
    rank_for_energy,
)


# ------------------------------------------------------------------------------------ rank rule
def test_rank_for_energy_edge_cases_on_values():
    # all-zero spectrum: the floor (1 for a Tucker factor, 0 where the caller allows none)
    assert rank_for_energy([0.0, 0.0, 0.0], 0.8) == 1
    assert rank_for_energy(torch.zeros(4), 0.5, min_rank=0) == 0
    assert rank_for_energy([0.0, 0.0], 1.0) == 1
    # eps = 1: every direction that carries energy, the null space dropped, nothing else
    assert rank_for_energy([3.0, 2.0, 1.0], 1.0) == 3
    assert rank_for_energy([3.0, 2.0, 0.0, 0.0], 1.0) == 2
    assert rank_for_energy([3.0, 2.0, 1e-13], 1.0) == 2           # below the 1e-9 tolerance of the total
    assert rank_for_energy([3.0, 2.0, 1e-6], 1.0) == 3
    # ties: [1, 1, 1, 1] reaches exactly 0.5 at r = 2; round-off above ε within the tolerance still counts
    assert rank_for_energy([1, 1, 1, 1], 0.5) == 2
    assert rank_for_energy([1, 1, 1, 1], 0.5 + 0.5 * ENERGY_TOLERANCE) == 2
    assert rank_for_energy([1, 1, 1, 1], 0.5 + 1e-6) == 3
    assert rank_for_energy([1, 1, 1, 1], 0.25) == 1
    assert rank_for_energy([1, 1, 1, 1], 0.2500001) == 2
    # spectrum 100, 10, 1: 0.9 needs 1 direction, 0.95 needs 2, 0.995 all 3; energies give the same ranks
    values = np.array([100.0, 10.0, 1.0])
    for eps, r in ((0.9, 1), (0.95, 2), (0.995, 3)):
        assert rank_for_energy(values, eps) == r
        assert rank_for_energy(values / values.sum(), eps) == r
        assert rank_for_energy(torch.tensor(values), eps) == r
    # negatives are round-off: they count as 0
    assert rank_for_energy([5.0, -1e-12, -1e-12], 0.99) == 1
    # captured energy (GPM): (50 + 100) / 161 = 0.93
    assert rank_for_energy(values, 0.9, captured=50.0, total=161.0) == 1
    assert rank_for_energy(values, 0.95, captured=50.0, total=161.0) == 2
    assert rank_for_energy(values, 0.2, captured=50.0, total=161.0, min_rank=0) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            rank_for_energy(values, bad)


def test_eigh_descending_clamps_and_orders():
    g = torch.randn(6, 3, dtype=torch.float64)
    gram = g @ g.T  # rank 3: three (round-off) zero eigenvalues
    values, vectors = eigh_descending(gram)
    assert torch.all(values[:-1] >= values[1:]) and torch.all(values >= 0)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, gram, atol=1e-10)
    assert torch.allclose(values[:3], torch.linalg.eigvalsh(gram).flip(0)[:3])


def test_hosvd_per_step_ranks_use_the_rule():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 7, 4) * torch.linspace(3, 0.1, 5)[None, :, None, None]
    layer = nn.Sequential(nn.Conv2d(5, 3, 3, padding=1))
    engine.compress_model(layer, "hosvd", layers=["0"], options={"eps": 0.8})
    layer(x).sum().backward()
    expected = tuple(rank_for_energy(eigh_descending(T.mode_gram(x, m))[0], 0.8) for m in range(4))
    assert tuple(layer[0].last_stats["ranks"]) == expected == hosvd_ranks(x, 0.8)


# ------------------------------------------------------------------------------------ accumulator
@pytest.mark.parametrize("shape", [(3, 6, 5), (7,), (4, 5, 3)], ids=["conv-like", "linear", "tokens"])
def test_accumulator_is_the_gram_of_the_concatenated_data_over_n(shape):
    """Unequal batch sizes and scales: every non-batch mode's mean Gram is the Gram of all samples / N.
    An accumulator that overweights the first batch (or weights later ones x0.001) fails here."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn((b,) + shape, generator=g, dtype=torch.float64) * s
               for b, s in ((5, 3.0), (3, 1.0), (1, 0.5))]
    acc = GramAccumulator()
    for b in batches:
        acc.update(b)
    everything = torch.cat(batches)
    assert acc.samples == 9 and acc.batches == 3 and acc.shape == (5,) + shape and acc.first_shape == (5,) + shape
    for mode in range(1, everything.dim()):
        unfolded = everything.movedim(mode, 0).reshape(everything.shape[mode], -1)
        expected = unfolded @ unfolded.T / 9
        assert torch.allclose(acc.mean_gram(mode), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(acc.eigenvalues(mode), np.sort(torch.linalg.eigvalsh(expected).numpy())[::-1],
                                   rtol=1e-8, atol=1e-10)
    # the batch mode: per-batch eigenvalues, zero-padded to the widest batch, summed, / N
    summed = np.zeros(5)
    for b in batches:
        flat = b.reshape(b.shape[0], -1)
        eig = np.sort(torch.linalg.eigvalsh(flat @ flat.T).numpy())[::-1]
        summed[: eig.size] += eig
    np.testing.assert_allclose(acc.eigenvalues(0), summed / 9, rtol=1e-8, atol=1e-10)
    # every mode's spectrum holds the same total: the mean energy per sample
    total = float((everything**2).sum()) / 9
    for mode in range(everything.dim()):
        assert acc.eigenvalues(mode).sum() == pytest.approx(total, rel=1e-9)
    # ranks are the rule on those spectra
    for eps in (0.5, 0.8, 0.95):
        assert acc.ranks_at(eps) == tuple(rank_for_energy(acc.eigenvalues(m), eps) for m in range(everything.dim()))
    with pytest.raises(ValueError, match="one input resolution"):
        acc.update(torch.randn((2,) + tuple(d + 1 for d in shape), dtype=torch.float64))


# ------------------------------------------------------- LANCE trains with what `lance calibrate` reports
def _trained_ranks(model: nn.Module, names: list[str], batches, eps: float) -> dict[str, tuple[int, ...]]:
    """The ranks LANCE trains with: its calibrated batch rank and factor widths (full size: no factor)."""
    stats = calibrate_layers(model, names, batches)
    handle_model = model
    engine.compress_model(handle_model, "lance", layers=names, options={"eps": eps}, calibration_loader=batches)
    modules = dict(handle_model.named_modules())
    out = {}
    for name in names:
        layer = modules[name]
        dims = stats[name].shape
        ranks = [int(layer.lance_batch_rank)]
        for mode in range(1, len(dims)):
            f = layer._buffers.get(f"lance_factor_{mode}")
            ranks.append(int(dims[mode]) if f is None else int(f.shape[1]))
        out[name] = tuple(ranks)
    engine.restore_model(handle_model)
    return out


def _reported_ranks(model, names, batches, grid) -> dict[str, list[tuple[int, ...]]]:
    result = calibrate_model(model, batches, names, grid)
    return {layer["name"]: [tuple(r) for r in layer["ranks"]] for layer in result.layers if layer["name"] in names}


@needs_cifar10_jpeg
@needs_mcunet_weights
def test_lance_trains_with_the_ranks_lance_calibrate_reports_on_mcunet():
    """A real conv (the last inverted bottleneck) and the real linear classifier of MCUNet-in3 on real
    CIFAR-10 JPEGs: both code paths on the same 3 batches (the last one smaller)."""
    from engine.data import get_dataset
    from engine.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("mcunet-in3", weights="imagenet", num_classes=10, weights_dir=MCUNET_IN3_DIR)
    data = get_dataset("cifar10-jpeg", split="train", resolution=96, mean=bb.mean, std=bb.std,
                       data_root=SHARED / "datasets", seed=0, augment=False, max_per_class=6)
    batches = calibration_batches(data, 3, 24, 0)
    batches[-1] = (batches[-1][0][:11], batches[-1][1][:11])
    all_layers = engine.compressible_layers(bb.model)
    names = [all_layers[-4], all_layers[-1]]  # inverted_bottleneck conv, classifier.linear
    assert isinstance(dict(bb.model.named_modules())[names[0]], nn.Conv2d)
    assert isinstance(dict(bb.model.named_modules())[names[1]], nn.Linear)
    grid = [0.5, 0.8, 0.9]
    bb.model.eval()
    reported = _reported_ranks(bb.model, names, batches, grid)
    for j, eps in enumerate(grid):
        trained = _trained_ranks(bb.model, names, batches, eps)
        for name in names:
            assert trained[name] == reported[name][j], (name, eps)


@pytest.mark.parametrize("eps", [0.6, 0.8, 0.95])
def test_lance_trains_with_the_ranks_lance_calibrate_reports_on_small_cnn(eps):
    """The same agreement without ../shared: small-cnn's conv block3 and its linear classifier on digits."""
    from sklearn.datasets import load_digits

    from engine.models import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("small-cnn", weights="none", num_classes=10)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 8.0 - 1.0
    x = nn.functional.interpolate(x, size=32)
    y = torch.tensor(digits.target)
    batches = [(x[0:32], y[0:32]), (x[32:64], y[32:64]), (x[64:77], y[64:77])]
    names = ["block3.conv", "classifier"]
    bb.model.eval()
    reported = _reported_ranks(bb.model, names, batches, [eps])
    trained = _trained_ranks(bb.model, names, batches, eps)
    for name in names:
        assert trained[name] == reported[name][0], name


def test_accumulator_without_the_batch_mode_keeps_the_same_mean_grams():
    """The continual learner's im2col rows (N, D) skip the N×N batch spectrum; the mean Grams are the same."""
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(b, 2, 7, 5, generator=g, dtype=torch.float64) for b in (6, 2)]
    full, rows_only = GramAccumulator(), GramAccumulator(batch_spectrum=False)
    for b in batches:
        full.update(b)
        rows_only.update(b)
    for mode in (1, 2, 3):
        assert torch.equal(full.mean_gram(mode), rows_only.mean_gram(mode))
    with pytest.raises(ValueError, match="batch_spectrum=False"):
        rows_only.eigenvalues(0)
