"""Engine core behaviour: error vs ε/ranks, any batch size, checkpoints, measured bytes, surgery, bench CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import engine
from engine.bench.layers import synthetic_activation
from engine.cli import main as lance_main

METHODS_AND_OPTIONS = [
    ("vanilla", {}), ("gradient_filter", {"patch": 2}), ("hosvd", {"eps": 0.8}), ("asi", {}), ("lance", {"eps": 0.7}),
]


def _structured(shape, seed=0):
    return synthetic_activation(shape, torch.Generator().manual_seed(seed))


def _weight_grad_error(method, options, x, layer, grad_output, calibration=None):
    model = nn.Sequential(copy.deepcopy(layer))
    engine.compress_model(model, method, layers=["0"], options=options, calibration_loader=calibration)
    model(x).backward(grad_output)
    reference = copy.deepcopy(layer)
    reference(x).backward(grad_output)
    return float((model[0].weight.grad - reference.weight.grad).norm() / reference.weight.grad.norm())


def test_hosvd_error_falls_as_eps_grows():
    x = _structured((16, 12, 8, 8))
    layer = nn.Conv2d(12, 10, 3, padding=1)
    grad_output = torch.randn(16, 10, 8, 8)
    errors = [_weight_grad_error("hosvd", {"eps": eps}, x, layer, grad_output) for eps in (0.5, 0.7, 0.9, 0.99, 1.0)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-5, errors


def test_asi_and_lance_error_falls_as_ranks_grow():
    x = _structured((16, 12, 8, 8), seed=1)
    layer = nn.Conv2d(12, 10, 3, padding=1)
    grad_output = torch.randn(16, 10, 8, 8)
    rank_steps = [(2, 2, 2, 2), (4, 4, 4, 4), (8, 8, 6, 6), (12, 10, 8, 8), (16, 12, 8, 8)]
    for method in ("asi", "lance"):
        calibration = [x] if method == "lance" else None
        errors = [_weight_grad_error(method, {"ranks": r}, x, layer, grad_output, calibration) for r in rank_steps]
        assert errors[-1] < 1e-5, (method, errors)
        assert errors[0] > errors[1] > errors[2] > errors[-1], (method, errors)


def test_lance_error_falls_as_eps_grows_on_a_linear_layer():
    x = _structured((32, 24))
    layer = nn.Linear(24, 6)
    grad_output = torch.randn(32, 6)
    errors = [_weight_grad_error("lance", {"eps": eps}, x, layer, grad_output, [x]) for eps in (0.5, 0.8, 0.95, 1.0)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("method,options", METHODS_AND_OPTIONS, ids=[m for m, _ in METHODS_AND_OPTIONS])
def test_every_batch_size_trains(method, options):
    """Full batches, a smaller last batch and batch 1 — conv and linear layers, several steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    calibration = [torch.randn(8, 3, 12, 12) for _ in range(2)] if method == "lance" else None
    handle = engine.compress_model(model, method, last_k=2, options=options, calibration_loader=calibration)
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
    for batch in (8, 8, 3, 1, 8):
        x, y = torch.randn(batch, 3, 12, 12), torch.randint(0, 4, (batch,))
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in handle.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        stats = handle.stats()["2"]
        assert stats["activation_shape"][0] == batch
        assert stats["ranks"][0] <= batch


@pytest.mark.parametrize("method", ["asi", "lance"])
def test_checkpoint_round_trip_keeps_method_state(method, tmp_path):
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))

    data = [_structured((8, 4, 10, 10), seed=s) for s in range(4)]
    model = build()
    engine.compress_model(model, method, last_k=1, options={"ranks": (4, 3, 5, 5)}, calibration_loader=data[:2],
                          seed=3)
    for x in data[:3]:
        model(x).sum().backward()
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    prefix = "asi_factor_" if method == "asi" else "lance_factor_"
    assert any(k.startswith("2." + prefix) for k in model.state_dict())

    fresh = build()
    # a fresh LANCE model is calibrated on other data: the checkpoint must overwrite that subspace
    engine.compress_model(fresh, method, last_k=1, options={"ranks": (4, 3, 5, 5)}, calibration_loader=data[3:],
                          seed=3)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    for m in (model, fresh):
        m.zero_grad()
        m(data[3]).sum().backward()
    assert torch.allclose(model[2].weight.grad, fresh[2].weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,options", METHODS_AND_OPTIONS, ids=[m for m, _ in METHODS_AND_OPTIONS])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_measured_saved_bytes_equal_analytic_for_one_layer(method, options, kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer, x = nn.Conv2d(16, 12, 3, padding=1), _structured((16, 16, 8, 8))
    else:
        layer, x = nn.Linear(24, 10), _structured((16, 5, 24))
    model = nn.Sequential(layer)
    handle = engine.compress_model(model, method, layers=["0"], options=options,
                                   calibration_loader=[x] if method == "lance" else None)
    with engine.SavedBytesMeter(model) as meter:
        out = model(x)
    out.sum().backward()
    stats = handle.stats()["0"]
    assert meter.layer_activation_bytes == stats["analytic_bytes"] > 0
    assert meter.per_layer_bytes["0"] == stats["analytic_bytes"]
    if method == "vanilla":
        assert stats["analytic_bytes"] == x.numel() * 4
    elif kind == "conv" or method != "gradient_filter":
        assert stats["analytic_bytes"] < x.numel() * 4


def test_region_bytes_include_batchnorm_and_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(4, 3, 16, 16)
    handle = engine.compress_model(model, "asi", last_k=2, pack=False)
    with engine.SavedBytesMeter(model) as meter:
        out = model(x)
    out.sum().backward()
    # conv at index 3 and the head are compressed; BN(4) and ReLU(5) save full-size tensors in the region
    full = 4 * 8 * 16 * 16 * 4
    assert meter.layer_activation_bytes == handle.analytic_bytes()
    assert meter.region_activation_bytes >= meter.layer_activation_bytes + full
    # packed (the default): frozen BN saves nothing, ReLU one bit per element
    engine.pack_region(model)
    with engine.SavedBytesMeter(model) as packed:
        out = model(x)
    out.sum().backward()
    assert packed.region_activation_bytes == packed.layer_activation_bytes + full // 32
    # nothing before the first trained layer is saved: the frozen prefix does not need gradients
    assert handle.frozen_prefix == ["0", "1", "2"]


def test_surgery_freezes_prefix_keeps_bn_eval_and_restores():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LazyLinear(3) if False else nn.Linear(4 * 4 * 4, 3))
    originals = {n: m for n, m in model.named_modules()}
    names = engine.compressible_layers(model)
    assert names == ["0", "3", "6"]
    handle = engine.compress_model(model, "hosvd", last_k=2, options={"eps": 0.9})
    assert set(handle.layers) == {"3", "6"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"3.weight", "3.bias", "6.weight", "6.bias"}
    handle.train_mode()
    assert not model[1].training and not model[4].training and not model[0].training and model[3].training
    assert model[3].weight is originals["3"].weight
    engine.restore_model(model)
    assert model[3] is originals["3"] and model[6] is originals["6"]
    assert all(p.requires_grad for p in model.parameters())


def test_bad_choices_are_refused_with_reasons():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        engine.compress_model(model, "svd", last_k=1)
    with pytest.raises(ValueError, match="not compressible layers"):
        engine.compress_model(model, "asi", layers=["1"])
    with pytest.raises(ValueError, match="last_k must be between 0 and 2"):
        engine.compress_model(model, "asi", last_k=5)
    with pytest.raises(ValueError, match="calibration_loader"):
        engine.compress_model(model, "lance", last_k=1)
    with pytest.raises(ValueError, match="accepts"):
        engine.compress_model(model, "asi", last_k=1, options={"eps": 0.5})
    with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
        engine.compress_model(model, "hosvd", last_k=1, options={"eps": 1.5})
    engine.compress_model(model, "asi", layers=["0"], options={"ranks": (2, 2)})
    with pytest.raises(ValueError, match="one rank per mode"):
        model(torch.randn(2, 3, 5, 5))
    engine.restore_model(model)


def test_decomposition_uses_layer_generator_not_global_rng():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    engine.compress_model(model, "asi", layers=["0"], options={"ranks": (2, 2, 3, 3)})
    model(_structured((6, 4, 8, 8))).sum().backward()  # cold start draws random probes
    assert torch.equal(torch.rand(1), expected_next)


def test_bench_layers_cli_full_rank_is_exact(tmp_path):
    out = tmp_path / "bench.json"
    status = lance_main(["bench", "layers", "--backbones", "mcunet-in3", "--batch-size", "4", "--repeats", "1",
                         "--full-rank", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {r["method"] for r in rows} == {"vanilla", "gradient_filter", "hosvd", "asi", "lance"}
    assert len(rows) == 4 * 5
    for r in rows:
        assert set(r) >= {"layer", "shape", "method", "ranks", "fwd_ms", "bwd_ms", "step_ms", "saved_bytes",
                          "analytic_bytes", "flops", "grad_rel_error"}
        assert r["saved_bytes"] == r["analytic_bytes"]
        if r["method"] != "gradient_filter":
            assert r["grad_rel_error"] < 1e-5, r
    assert report["summary"]["vanilla"]["step_ratio_vs_vanilla"] == 1.0
    assert set(report["summary"]["asi"]) >= {"step_ratio_vs_vanilla", "memory_ratio_vs_vanilla"}


def test_bench_layers_cli_default_ranks_compress(tmp_path):
    out = tmp_path / "bench.json"
    assert lance_main(["bench", "layers", "--backbones", "mcunet-in3", "--batch-size", "16", "--repeats", "1",
                       "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    for method in ("hosvd", "asi", "lance"):
        assert summary[method]["memory_ratio_vs_vanilla"] < 0.2, summary[method]
    assert 0.2 < summary["gradient_filter"]["memory_ratio_vs_vanilla"] < 0.35
