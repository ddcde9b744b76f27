"""The GPU path (marker ``gpu``): the engine's exactness on CUDA tensors and one short fine-tune on CUDA.

Skipped with a reason where CUDA is not available (``torch.cuda.is_available()`` is False). Run them on a
GPU machine with ``python3 -m pytest -q -m gpu``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import engine
from engine.bench.layers import LAYER_TABLE, bench_layer
from engine.dropout import FastDropout
from engine.memory import SavedBytesMeter
from engine.packing import pack_region
from engine.store import RunStore
from engine.train.config import FinetuneConfig
from engine.train.session import run_finetune

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
]

CUDA = torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _full_rank(method: str, shape) -> dict:
    return {"hosvd": {"eps": 1.0}, "asi": {"ranks": tuple(shape)}, "lance": {"ranks": tuple(shape)}}.get(method, {})


LAYERS = {
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (5, 6, 9, 9)),
    "conv-stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (5, 6, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (5, 6, 9, 9)),
    "linear-tokens": (lambda: nn.Linear(7, 4), (5, 3, 7)),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("method", ["vanilla", "hosvd", "asi", "lance"])
def test_full_rank_matches_autograd_on_cuda(name, method):
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    layer = build().double().to(CUDA)
    x = torch.randn(shape, dtype=torch.float64, device=CUDA)
    reference = copy.deepcopy(layer)
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    grad_output = torch.randn_like(out_ref)
    out_ref.backward(grad_output)
    model = nn.Sequential(copy.deepcopy(layer))
    engine.compress_model(model, method, layers=["0"], options=_full_rank(method, shape),
                          calibration_loader=[x] if method == "lance" else None, calibration_batches=1)
    x_c = x.clone().requires_grad_(True)
    out = model(x_c)
    out.backward(grad_output)
    assert out.device.type == "cuda" and model[0].weight.grad.device.type == "cuda"
    assert _rel(model[0].weight.grad, reference.weight.grad) < 1e-9
    assert _rel(x_c.grad, x_ref.grad) < 1e-9


def test_low_rank_methods_run_on_cuda_with_cuda_generators():
    """Default ranks (randomized range finder, ASI cold start) draw from generators on the input's device."""
    spec = LAYER_TABLE[0]
    rows = bench_layer(spec, batch_size=16, repeats=1, device="cuda")
    by_method = {r["method"]: r for r in rows}
    assert by_method["vanilla"]["grad_rel_error"] == 0.0
    for method in ("hosvd", "asi", "lance"):
        assert 0.0 < by_method[method]["grad_rel_error"] < 1.0
        assert by_method[method]["saved_bytes"] < by_method["vanilla"]["saved_bytes"]


def test_short_finetune_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path / "cache"))
    config = FinetuneConfig(backbone="small-cnn", dataset="digits", layers=2, epochs=1, batch_size=32,
                            limit_train=96, limit_val=64, seed=3, methods=["vanilla", "lance"], device="cuda")
    store = RunStore()
    results = run_finetune(config, store=store)
    assert [r.status for r in results] == ["completed", "completed"]


def test_packed_fast_dropout_on_cuda_keeps_bits():
    """alexnet-cl's FastDropout off CPU is nn.Dropout; packed, it keeps the mask as bits like PackedDropout."""
    drop = nn.Sequential(FastDropout(0.5)).train()
    pack_region(drop)
    x = torch.randn(8, 64, device=CUDA, requires_grad=True)
    with SavedBytesMeter(drop) as meter:
        y = drop(x)
    y.sum().backward()
    kept = y != 0
    assert torch.equal(x.grad[kept], torch.full_like(x.grad[kept], 2.0))
    assert meter.region_activation_bytes == (x.numel() + 7) // 8
