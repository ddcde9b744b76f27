"""Calibration: spectra vs tensorly's HOSVD, running-mean accumulation, perplexity vs an independent
reference, perplexity falling with ε on real activations, JSON cache, rank selection on real results."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorly as tl  # a required dev dependency (pyproject [dev]): the independent reference
import torch
import torch.nn.functional as F
from conftest import SHARED, needs_cifar10_jpeg, needs_mcunet_weights
from tensorly.decomposition import tucker
from torch import nn

from engine.calibration import (
    CalibrationResult,
    InfeasibleBudget,
    brute_force_multiple_choice_knapsack,
    calibrate,
    calibrate_model,
    collect_spectra,
    select_ranks,
)
from engine.calibration.perplexity import CapturedLayer, capture_layer_gradients, gradient_errors
from engine.calibration.spectra import hosvd_singular_values
from engine.spectra import rank_for_energy


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """Small tensors: one intra-op thread is fastest on a shared, oversubscribed 2-core machine."""
    torch.set_num_threads(1)
    yield


GRID = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


def _structured(shape, rank_scale=3, seed=0, dtype=torch.float64):
    """A tensor with decaying spectra in every mode (low-rank core plus noise), like real activations."""
    g = torch.Generator().manual_seed(seed)
    core_shape = [min(d, rank_scale) for d in shape]
    x = torch.randn(core_shape, generator=g, dtype=dtype)
    for m, d in enumerate(shape):
        u = torch.randn(d, core_shape[m], generator=g, dtype=dtype)
        x = torch.movedim(torch.tensordot(x, u, dims=([m], [1])), -1, m)
    return x + 0.1 * torch.randn(shape, generator=g, dtype=dtype)


def _reference_ranks(singular_values: np.ndarray, eps: float) -> int:
    energy = singular_values**2
    cumulative = np.cumsum(energy) / energy.sum()
    for r in range(1, energy.size + 1):
        if cumulative[r - 1] >= eps - 1e-12:
            return r
    return energy.size


@pytest.mark.parametrize("shape", [(6, 5, 7, 4), (8, 12), (5, 9, 11), (4, 3, 5, 10)])
def test_spectra_match_tensorly_hosvd(shape):
    x = _structured(shape, seed=len(shape))
    ours = hosvd_singular_values(x)
    for mode in range(len(shape)):
        reference = np.linalg.svd(tl.unfold(x.numpy(), mode), compute_uv=False)
        np.testing.assert_allclose(ours[mode][: reference.size], reference, rtol=1e-7, atol=1e-9 * reference[0])
        assert np.all(ours[mode][reference.size:] < 1e-6 * reference[0])  # Gram larger than the rank: zeros
    # ranks per ε: our rule on our spectra equals the rule applied to tensorly's singular values, and
    # tensorly's truncated HOSVD at those ranks loses at most the discarded energy of every mode
    norm2 = float((x**2).sum())
    for eps in GRID:
        ranks = []
        for mode in range(len(shape)):
            s = np.linalg.svd(tl.unfold(x.numpy(), mode), compute_uv=False)
            r = rank_for_energy(ours[mode] ** 2, eps)
            assert r == _reference_ranks(s, eps)
            ranks.append(r)
        core, factors = tucker(x.numpy(), rank=ranks, n_iter_max=0, init="svd")
        err2 = float(((tl.tucker_to_tensor((core, factors)) - x.numpy()) ** 2).sum())
        discarded = sum(float((ours[m][ranks[m]:] ** 2).sum()) for m in range(len(shape)))
        assert err2 <= discarded * (1 + 1e-8) + 1e-12
        assert err2 <= len(shape) * (1 - eps) * norm2 * (1 + 1e-8)
    # consistent with the engine's own HOSVD_ε rank rule
    from engine.functional import hosvd_ranks

    for eps in (0.5, 0.8, 0.9):
        assert hosvd_ranks(x, eps) == tuple(rank_for_energy(s**2, eps) for s in ours)


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 5, 7)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_collect_spectra_is_a_true_running_mean():
    torch.manual_seed(0)
    model = _TwoLayer()
    batches = [torch.randn(5, 3, 6, 5) * 3, torch.randn(3, 3, 6, 5)]  # different sizes and scales
    spectra = collect_spectra(model, ["conv", "fc"], batches)
    conv = spectra["conv"]
    assert conv.samples == 8 and conv.batches == 2 and conv.input_shape == [5, 3, 6, 5]
    everything = torch.cat(batches).double()
    for mode in (1, 2, 3):  # channel, height, width: Gram summed over batches / samples, one eigvalsh
        unfolded = everything.movedim(mode, 0).reshape(everything.shape[mode], -1)
        expected = np.sort(torch.linalg.eigvalsh(unfolded @ unfolded.T / 8).numpy())[::-1]
        np.testing.assert_allclose(conv.modes[mode].eigenvalues, expected, rtol=1e-5)
        np.testing.assert_allclose(conv.modes[mode].cumulative[-1], 1.0)
    # batch mode: per-batch eigenvalues, zero-padded to the largest batch, summed, / samples
    per_batch = []
    for b in batches:
        flat = b.double().reshape(b.shape[0], -1)
        eig = np.sort(torch.linalg.eigvalsh(flat @ flat.T).numpy())[::-1]
        per_batch.append(np.pad(eig, (0, 5 - eig.size)))
    np.testing.assert_allclose(conv.modes[0].eigenvalues, np.sum(per_batch, axis=0) / 8, rtol=1e-5, atol=1e-9)
    assert [m.mode for m in conv.modes] == ["B", "C", "H", "W"]
    assert [m.mode for m in spectra["fc"].modes] == ["B", "F"] and spectra["fc"].modes[1].dim == 120
    # ranks grow with ε
    ranks = [spectra["fc"].ranks(e) for e in GRID]
    assert all(a <= b for r1, r2 in zip(ranks, ranks[1:]) for a, b in zip(r1, r2))
    with pytest.raises(KeyError, match="no such layer"):
        collect_spectra(model, ["nope"], batches)


def _reference_weight_grad(layer, activation, grad_output, ranks):
    """Independent reference: rebuild Â from tensorly's truncated HOSVD, then dW by the textbook formula."""
    import warnings

    with warnings.catch_warnings():  # tensorly warns when a rank exceeds the other modes' product
        warnings.simplefilter("ignore", UserWarning)
        core, factors = tucker(activation.numpy(), rank=list(ranks), n_iter_max=0, init="svd")
    approx = torch.from_numpy(tl.tucker_to_tensor((core, factors)))
    if isinstance(layer, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(approx, layer.weight.shape, grad_output, layer.stride, layer.padding,
                                           layer.dilation, layer.groups)
    return grad_output.reshape(-1, grad_output.shape[-1]).T @ approx.reshape(-1, approx.shape[-1])


@pytest.mark.parametrize(
    "make_layer, in_shape",
    [
        (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1), (7, 6, 9, 8)),
        (lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False), (5, 6, 8, 8)),  # depthwise
        (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (5, 4, 7, 9)),   # grouped, dilated
        (lambda: nn.Linear(12, 5), (9, 12)),
        (lambda: nn.Linear(10, 4), (6, 7, 10)),                                          # (B, L, F)
    ],
)
def test_perplexity_matches_independent_reference(make_layer, in_shape):
    torch.manual_seed(1)
    layer = make_layer().double()
    activation = _structured(in_shape, seed=2)
    activation.requires_grad_(True)
    out = layer(activation)
    grad_output = torch.randn_like(out)
    (exact,) = torch.autograd.grad(out, layer.weight, grad_output)
    captured = CapturedLayer("layer", layer, activation.detach(), grad_output, exact)
    full = tuple(in_shape)
    choices = [tuple(max(1, d // 2) for d in full), tuple(max(1, d - 2) for d in full), (1,) * len(full), full]
    rows = gradient_errors(captured, choices)
    norm = float(exact.norm())
    for ranks, row in zip(choices, rows):
        reference = float((exact - _reference_weight_grad(layer, activation.detach(), grad_output, ranks)).norm())
        assert row["perplexity"] == pytest.approx(reference, rel=1e-6, abs=1e-9 * norm), ranks
        assert row["relative_perplexity"] == pytest.approx(row["perplexity"] / norm)
    assert rows[-1]["relative_perplexity"] < 1e-10  # full ranks: the exact gradient
    assert rows[2]["perplexity"] > rows[1]["perplexity"]  # rank 1 everywhere is worse than nearly full


def test_capture_gives_exact_gradients_and_restores_the_model():
    torch.manual_seed(0)
    model = _TwoLayer()
    model.conv.weight.requires_grad_(False)
    model.train()
    x, y = torch.randn(4, 3, 6, 5), torch.tensor([0, 1, 2, 3])
    captured = capture_layer_gradients(model, ["conv", "fc"], x, y)
    assert model.training and not model.conv.weight.requires_grad and model.fc.weight.requires_grad
    assert model.fc.weight.grad is None
    model.eval()
    model.conv.weight.requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(captured["conv"].weight_grad, model.conv.weight.grad)
    torch.testing.assert_close(captured["fc"].weight_grad, model.fc.weight.grad)
    assert captured["conv"].activation.shape == (4, 3, 6, 5) and captured["conv"].grad_output.shape == (4, 4, 6, 5)


def _digits_batches(n_batches=3, batch_size=64, offset=1400):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    train = [(x[i:i + 64], y[i:i + 64]) for i in range(0, offset, 64)]
    calib = [(x[offset + i * batch_size: offset + (i + 1) * batch_size],
              y[offset + i * batch_size: offset + (i + 1) * batch_size]) for i in range(n_batches)]
    return train, calib


@pytest.fixture(scope="module")
def digits_cnn():
    """A small CNN trained for one epoch on scikit-learn's digits (~1 s): real activations, real head."""
    torch.set_num_threads(1)  # tiny convs: one thread is fastest on a shared 2-core machine
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    train, calib = _digits_batches()
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(1):
        for x, y in train:
            optimiser.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimiser.step()
    with torch.no_grad():
        accuracy = float(sum((model.eval()(x).argmax(1) == y).sum() for x, y in calib)) / sum(len(y) for _, y in calib)
    assert accuracy > 0.8
    return model, calib


def test_perplexity_falls_as_eps_rises_on_digits(digits_cnn):
    model, calib = digits_cnn
    grid = [0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 1.0]
    result = calibrate_model(model, calib, "all", grid)
    assert result.batch_size == 64 and len(result.layers) == 5 and len(result.finetuned_layers) == 5
    total = np.zeros(len(grid))
    for layer in result.layers:
        rel = np.array(layer["relative_perplexity"])
        assert rel[-1] < 1e-4, layer["name"]                  # ε = 1: every direction with energy, exact
        assert rel[-2] < 0.5 * rel[0], layer["name"]          # ε 0.99 vs 0.4: clearly better
        assert layer["bytes"][0] < layer["full_bytes"]         # ε = 0.4 stores less than vanilla
        assert layer["bytes"][-1] <= layer["full_bytes"]       # ε = 1: at most vanilla (null space dropped)
        total += np.array(layer["perplexity"])
    # the summed error (what the solver minimises) falls along the whole grid
    assert np.all(np.diff(total) <= 1e-9), total
    # bytes are tucker_bytes at the reported ranks, for the calibration batch shape, never above raw
    from engine.functional import tucker_bytes

    last = result.layers[-1]
    assert all(b == min(tucker_bytes([64, 64], r), 64 * 64 * 4) for b, r in zip(last["bytes"], last["ranks"]))
    for layer in result.layers:
        for b, stored, r in zip(layer["bytes"], layer["stored"], layer["ranks"]):
            assert b <= layer["full_bytes"]
            shape = [64] + layer["input_shape"][1:]
            assert (stored == "raw") == (tucker_bytes(shape, r) >= layer["full_bytes"])
    assert last["full_bytes"] == 64 * 64 * 4


def test_result_json_round_trip_and_selection_on_real_calibration(digits_cnn, tmp_path):
    model, calib = digits_cnn
    result = calibrate_model(model, calib[:2], 3, [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    path = result.save(tmp_path / "calibration.json")
    loaded = CalibrationResult.load(path)
    assert json.loads(path.read_text()) == loaded.to_dict()
    assert loaded.finetuned_layers == result.finetuned_layers == ["5", "8", "10"]
    tuned = [layer for layer in loaded.layers if layer["finetuned"]]
    assert [layer["name"] for layer in tuned] == ["5", "8", "10"]
    assert all(layer["perplexity"] is None for layer in loaded.layers if not layer["finetuned"])
    # the option set: every ε smaller than raw, plus "uncompressed" (raw bytes, perplexity 0)
    costs = [[b for b in layer["bytes"] if b < layer["full_bytes"]] + [layer["full_bytes"]] for layer in tuned]
    values = [[p for b, p in zip(layer["bytes"], layer["perplexity"]) if b < layer["full_bytes"]] + [0.0]
              for layer in tuned]
    least = sum(min(c) for c in costs)
    most = sum(max(c) for c in costs)
    for budget in (least, (least + most) // 2, most, most * 2):
        selection = select_ranks(loaded, budget)
        brute = brute_force_multiple_choice_knapsack(costs, values, budget)
        assert selection.total_bytes <= budget
        assert selection.total_perplexity == pytest.approx(brute.total_value)
        assert selection.total_bytes == sum(c.bytes for c in selection.layers)
        for choice, layer in zip(selection.layers, tuned):
            assert choice.bytes <= layer["full_bytes"]
            if choice.stored == "raw":
                assert choice.eps is None and choice.bytes == layer["full_bytes"] and choice.perplexity == 0.0
                assert choice.ranks == [loaded.batch_size] + layer["input_shape"][1:]
                continue
            j = loaded.eps_grid.index(choice.eps)
            assert choice.ranks == layer["ranks"][j] and choice.bytes == layer["bytes"][j] < layer["full_bytes"]
        assert set(selection.ranks_by_layer()) == {"5", "8", "10"}
    with pytest.raises(InfeasibleBudget) as err:
        select_ranks(loaded.to_dict(), f"{least - 1}")
    assert err.value.min_total_cost == least and str(least) in str(err.value)


def test_calibrate_pipeline_caches_digits(monkeypatch):
    """The real pipeline (engine.models + engine.data) on the always-present digits; second call is cached."""
    first = calibrate("small-cnn", weights="none", dataset="digits", layers_k=2, eps_grid=[0.5, 0.7, 0.9],
                      batches=2, batch_size=32, seed=3)
    assert not first.from_cache and first.config["num_classes"] == 10
    assert len(first.finetuned_layers) == 2 and first.batch_size == 32
    from engine.calibration.cache import cache_dir

    files = list(cache_dir().glob("*.json"))
    assert len(files) == 1 and str(cache_dir()).startswith(str(__import__("os").environ["LANCE_HOME"]))
    import engine.calibration.pipeline as pipeline

    def boom(*args, **kwargs):
        raise AssertionError("a cached calibration must not run again")

    monkeypatch.setattr(pipeline, "calibrate_model", boom)
    second = calibrate("small-cnn", weights="none", dataset="digits", layers_k=2, eps_grid=[0.9, 0.5, 0.7],
                       batches=2, batch_size=32, seed=3)
    assert second.from_cache
    a, b = first.to_dict(), second.to_dict()
    a.pop("from_cache"), b.pop("from_cache")
    assert a == b
    with pytest.raises(AssertionError, match="must not run"):  # another seed is another key
        calibrate("small-cnn", weights="none", dataset="digits", layers_k=2, eps_grid=[0.5, 0.7, 0.9],
                  batches=2, batch_size=32, seed=4)


@needs_cifar10_jpeg
@needs_mcunet_weights
def test_mcunet_in3_cifar10_perplexity_falls_with_eps(monkeypatch):
    monkeypatch.setenv("LANCE_WEIGHTS_DIR", str(SHARED / "weights"))
    torch.set_num_threads(1)
    grid = [0.4, 0.6, 0.8, 0.9, 0.99, 1.0]
    result = calibrate("mcunet-in3", weights="imagenet", dataset="cifar10-jpeg", layers_k=4, eps_grid=grid,
                       batches=1, batch_size=32, resolution=96, data_root=str(SHARED / "datasets"),
                       max_per_class=8, seed=0)
    assert result.config["num_classes"] == 10 and len(result.finetuned_layers) == 4
    assert len(result.layers) >= 50  # spectra for every compressible layer
    total = np.zeros(len(grid))
    for name in result.finetuned_layers:
        layer = result.layer(name)
        rel = np.array(layer["relative_perplexity"])
        assert rel[-1] < 1e-4 and rel[-2] < 0.5 * rel[0], (name, rel)
        total += np.array(layer["perplexity"])
    assert np.all(np.diff(total) <= 1e-9), total
    assert math.isfinite(result.timing["total_s"])


class _WeightOnly(nn.Module):
    """Like torchvision's Swin attention: ``proj``'s weight is applied with F.linear, the module never runs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(F.linear(torch.relu(self.fc(x)), self.proj.weight, self.proj.bias))


def test_layers_whose_module_never_runs_are_reported_not_fatal():
    torch.manual_seed(0)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    result = calibrate_model(_WeightOnly(), batches, ["head"], [0.5, 0.9])
    assert [layer["name"] for layer in result.layers] == ["fc", "head"]
    assert list(result.skipped_layers) == ["proj"] and "never called" in result.skipped_layers["proj"]
    with pytest.raises(RuntimeError, match="never ran"):
        calibrate_model(_WeightOnly(), batches, ["proj", "head"], [0.5, 0.9])


def test_select_ranks_on_plain_arrays():
    from engine.calibration import select_ranks_from_arrays

    selection = select_ranks_from_arrays(
        names=["a", "b"], eps_grid=[0.5, 0.9],
        ranks=[[(2, 1), (4, 3)], [(1, 1), (3, 3)]],
        bytes_=[[100, 400], [50, 300.2]],
        perplexity=[[1.0, 0.1], [2.0, 0.5]],
        budget="0.5kB",
    )
    # within 500 bytes: 100 + 50 (error 3.0), 400 + 50 (2.1), 100 + 301 (1.5, best); 400 + 301 is over
    assert [(c.name, c.eps, c.bytes) for c in selection.layers] == [("a", 0.5, 100), ("b", 0.9, 301)]
    assert selection.total_bytes == 401 and selection.total_perplexity == pytest.approx(1.5)
    assert selection.ranks_by_layer() == {"a": (2, 1), "b": (3, 3)}
    with pytest.raises(ValueError, match="one row per layer"):
        select_ranks_from_arrays(["a"], [0.5], [[(1,)], [(1,)]], [[1]], [[1.0]], 10)
