"""Lossless packing (engine.packing): same forward, same gradients as autograd, fewer saved bytes."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.memory import SavedBytesMeter
from engine.packing import (
    PACKED_CLASSES,
    offset_dtype,
    pack_bits,
    pack_region,
    unpack_bits,
    unpack_region,
)


def test_bits_round_trip_any_length():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 64, 1001):
        mask = torch.rand(n, generator=gen) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(unpack_bits(packed, mask.shape), mask)
    mask = torch.tensor([True, False, True] + [False] * 5)
    assert pack_bits(mask).tolist() == [0b101]


def _packed_copy(module: nn.Module) -> nn.Module:
    packed = copy.deepcopy(module)
    pack_region(packed)
    assert type(packed) is PACKED_CLASSES[type(module)]
    return packed


def _compare(module: nn.Module, x: torch.Tensor, seed: int = 0):
    """(plain meter, packed meter): asserts forward and input gradients equal bit for bit (fp64 inputs)."""
    packed = _packed_copy(module)
    results = []
    for m in (module, packed):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(seed)
        with SavedBytesMeter(m) as meter:
            y = m(xi)
        (grad,) = torch.autograd.grad(y, xi, _cot(y, seed))
        results.append((y.detach(), grad, meter))
    (y0, g0, m0), (y1, g1, m1) = results
    assert torch.equal(y0, y1)
    assert torch.equal(g1, g0)  # bit for bit: the packed backward does ATen's arithmetic
    return m0, m1


def _cot(y: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=y.dtype)


def _x(*shape, scale=4.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0), nn.Hardsigmoid(),
                                    nn.LeakyReLU(0.1)], ids=lambda m: type(m).__name__)
def test_masked_activations_match_autograd_and_save_one_bit(module):
    x = _x(4, 6, 5, 5)
    x[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -3.0], dtype=torch.float64)  # the boundaries themselves
    plain, packed = _compare(module, x)
    assert packed.region_activation_bytes == (x.numel() + 7) // 8
    assert plain.region_activation_bytes == x.numel() * 8


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(6, affine=False)],
                         ids=["1d", "2d", "2d-no-affine"])
def test_frozen_eval_batchnorm_saves_nothing_and_matches(bn):
    bn = bn.double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if bn.weight is not None:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    for p in bn.parameters():
        p.requires_grad_(False)
    bn.eval()
    x = _x(5, 6, 4, 4) if isinstance(bn, nn.BatchNorm2d) else _x(5, 6)
    plain, packed = _compare(bn, x)
    assert packed.region_activation_bytes == 0
    assert plain.region_activation_bytes >= x.numel() * 8


def test_batchnorm_with_batch_statistics_or_trained_affine_keeps_autograd():
    stats = nn.BatchNorm2d(6, track_running_stats=False).double()  # the continual nets' BN
    x = _x(5, 6, 4, 4)
    plain, packed = _compare(stats.train(), x)
    assert packed.region_activation_bytes == plain.region_activation_bytes >= x.numel() * 8
    trained = nn.BatchNorm2d(6).double().eval()  # eval, but its affine parameters train
    plain, packed = _compare(trained, x)
    assert packed.region_activation_bytes == plain.region_activation_bytes >= x.numel() * 8


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_draws_the_same_mask_and_keeps_it_as_bits(p):
    drop = nn.Dropout(p).train()
    x = _x(8, 33)
    plain, packed = _compare(drop, x, seed=5)  # same seed: the very same mask as F.dropout's
    assert packed.region_activation_bytes == (x.numel() + 7) // 8
    assert plain.region_activation_bytes == x.numel() * 8  # CPU: autograd keeps the float noise


@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1},
                                    {"kernel_size": 3, "stride": 1, "dilation": 2},
                                    {"kernel_size": 3, "ceil_mode": True},
                                    {"kernel_size": (2, 3), "stride": (1, 2)}], ids=str)
def test_max_pool_keeps_window_offsets_in_uint8(kwargs):
    pool = nn.MaxPool2d(**kwargs)
    x = _x(2, 3, 11, 12)
    x[0, 0, :4, :4] = 1.0  # ties: the first maximum wins in both
    plain, packed = _compare(pool, x)
    out = pool(x)
    assert packed.region_activation_bytes == out.numel()  # one uint8 per output
    assert plain.region_activation_bytes == x.numel() * 8 + out.numel() * 8


@pytest.mark.parametrize("shape", [(2, 3, 17, 19), (2, 3, 16, 16)], ids=["odd", "even"])
def test_max_pool_2x2_route_matches_aten_values_offsets_and_gradients(shape):
    """The strided-quarters 2×2 route (maps of ≥ 256 positions): ATen's maxima, its first-maximum (row-major)
    offsets on every kind of tie, and the same input gradient bit for bit."""
    x = _x(*shape).relu()  # many exact zeros, as after ReLU/dropout
    x[0, 0, 0:2, 0:2] = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=x.dtype)  # (0,1) ties (1,0): (0,1) wins
    x[0, 0, 2:4, 0:2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=x.dtype)  # (0,0) ties (1,1)
    x[0, 0, 4:6, 0:2] = torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=x.dtype)  # (1,0) ties (1,1)
    x[0, 1, :6, :6] = 3.0                                                       # all four tie
    assert engine.packing.is_plain_2x2(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    y, offsets = engine.packing.max_pool_2x2(x)
    want, index = F.max_pool2d(x, 2, return_indices=True)
    rows, cols = index // shape[-1], index % shape[-1]
    oh = torch.arange(want.shape[-2]).view(-1, 1)
    ow = torch.arange(want.shape[-1]).view(1, -1)
    assert torch.equal(y, want)
    assert torch.equal(offsets.long(), (rows - 2 * oh) * 2 + (cols - 2 * ow))
    assert offsets[0, 0, 0, 0] == 1 and offsets[0, 0, 1, 0] == 0 and offsets[0, 0, 2, 0] == 2
    _compare(nn.MaxPool2d(2), x)


@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_batchnorm_gradient_is_bitwise_autograd_in_fp32(channels_last):
    bn = nn.BatchNorm2d(48).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.01, 3)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    for p in bn.parameters():
        p.requires_grad_(False)
    x = torch.randn(16, 48, 6, 6, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare(bn, x)


def test_max_pool_on_channels_last_and_3d_input():
    pool = nn.MaxPool2d(2)
    _compare(pool, _x(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    _compare(pool, _x(3, 8, 8))


@pytest.mark.parametrize("pool", [nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((3, 2)), nn.AvgPool2d(2),
                                  nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)], ids=str)
def test_average_pools_save_nothing(pool):
    x = _x(2, 3, 9, 8)
    plain, packed = _compare(pool, x)
    assert packed.region_activation_bytes == 0
    # ATen turns an adaptive pool to 1x1 into a mean, which saves nothing either
    assert plain.region_activation_bytes == (0 if pool.__dict__.get("output_size") == 1 else x.numel() * 8)


def test_offset_dtype_is_the_narrowest():
    assert offset_dtype(4) == torch.uint8 and offset_dtype(256) == torch.uint8
    assert offset_dtype(257) == torch.int16 and offset_dtype(2 ** 16) == torch.int32


@pytest.mark.parametrize("options", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                                     dict(kernel_size=2, ceil_mode=True), dict(kernel_size=3, dilation=2)],
                         ids=["2x2", "3x3_s2_p1", "ceil", "dilated"])
def test_packed_max_pool_without_grad_gives_the_plain_maxima_in_nchw(options):
    """Evaluation goes through a channels_last copy (2-4× faster on CPU): same values, NCHW-contiguous out."""
    torch.manual_seed(11)
    x = torch.randn(3, 5, 13, 11)
    x[:, :, :4, :4] = 0.0  # ties
    packed = engine.packing.PackedMaxPool2d(**options)
    with torch.no_grad():
        got = packed(x)
    want = F.max_pool2d(x, **options)
    assert got.is_contiguous() and torch.equal(got, want)


def test_inplace_and_no_grad_fall_back_and_unpack_restores_classes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    keys = list(model.state_dict())
    assert pack_region(model) == ["1", "2", "3"]
    assert list(model.state_dict()) == keys and isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        model(x)
    model.eval()
    y = model(x)  # input needs no grad: nothing saved, plain forward
    assert y.grad_fn is not None  # the conv's weight needs grad
    assert unpack_region(model) == ["1", "2", "3"]
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]


def _mcunet_like(num_classes: int = 10) -> nn.Module:
    """A tiny MCUNet-like inverted-residual block: 1x1 expand, 3x3 depthwise, 1x1 project, BN, ReLU6."""
    def cbr(c_in, c_out, k, groups=1, act=True):
        layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
        return layers + ([nn.ReLU6()] if act else [])
    return nn.Sequential(*cbr(3, 8, 3), nn.MaxPool2d(2), *cbr(8, 24, 1), *cbr(24, 24, 3, groups=24),
                         *cbr(24, 8, 1, act=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                         nn.Linear(8, num_classes))


def _small_cnn():
    from engine.models.small_cnn import SmallCNN

    return SmallCNN(num_classes=10)


def _trajectory(build, method, pack, steps=5, last_k=3):
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # non-trivial frozen BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    data = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 3, 16, 16, generator=data) for _ in range(steps)]
    ys = [torch.randint(0, 10, (16,), generator=data) for _ in range(steps)]
    handle = engine.compress_model(model, method, last_k=last_k, pack=pack)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=0.1, momentum=0.9)
    losses, region = [], []
    torch.manual_seed(2)  # dropout masks
    for x, y in zip(xs, ys):
        with SavedBytesMeter(model) as meter:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        region.append(meter.region_activation_bytes)
    return losses, region, handle


@pytest.mark.parametrize("build", [_small_cnn, _mcunet_like], ids=["small-cnn", "mcunet-like"])
@pytest.mark.parametrize("method", ["vanilla", "asi"])
def test_same_seed_same_loss_trajectory_with_and_without_packing(build, method):
    plain, plain_bytes, plain_handle = _trajectory(build, method, pack=False)
    packed, packed_bytes, handle = _trajectory(build, method, pack=True)
    assert handle.packed and not plain_handle.packed
    assert plain == packed  # bit for bit (the issue asks 1e-6), so long runs cannot drift apart
    assert plain[0] != plain[-1]  # it trains
    assert packed_bytes[0] < plain_bytes[0]


def test_restore_model_switches_packing_off():
    model = _mcunet_like()
    engine.compress_model(model, "vanilla", last_k=2)
    assert type(model[1]) is PACKED_CLASSES[nn.BatchNorm2d]
    engine.restore_model(model)
    assert not engine.packing.is_packed(model)


# ---------------------------------------------------------------------------- the meter keeps no graph alive
class _SideGraph(nn.Module):
    """Forward builds a side graph (saves a 1000-float tensor), drops it, then returns relu(x · 2)."""

    def __init__(self):
        super().__init__()
        self.side = None

    def forward(self, x):
        side = torch.sigmoid(x.repeat(10, 1)).exp()  # sigmoid and exp each save their output: 2 × 1000 floats
        self.side = weakref.ref(side)
        del side
        return torch.relu(x * 2)  # mul saves nothing (scalar), relu saves its output: 100 floats


def test_meter_does_not_keep_a_dropped_side_graph_alive():
    x = torch.randn(1, 100, requires_grad=True)
    module = _SideGraph()
    was_enabled = gc.isenabled()
    gc.disable()  # freed by reference counting alone, not by the cycle collector
    try:
        with SavedBytesMeter(module) as meter:
            y = module(x)
            assert module.side() is None  # the dropped graph is freed at once
            assert meter.live_region_bytes == 100 * 4
        y.sum().backward()
    finally:
        if was_enabled:
            gc.enable()
    # the side graph was live (2 × 4000 B) before the main graph saved anything: that is the peak
    assert meter.region_activation_bytes == 2 * 1000 * 4
    assert meter.live_region_bytes == 0  # backward released everything
    assert meter.tensor_count == 3


def test_meter_counts_a_shared_storage_once_and_lists_saved_tensors_by_op():
    model = nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 5))
    x = torch.randn(8, 50)
    with SavedBytesMeter(model) as meter:
        out = model(x)
    rows = {r["op"]: r for r in meter.saved_by_op(out)}
    # the input (for the first weight's gradient) and relu's output, which ReluBackward0 and the second
    # linear both save: one storage, counted once
    assert meter.region_activation_bytes == 2 * 8 * 50 * 4
    assert sum(r["bytes"] for r in rows.values()) == 2 * 8 * 50 * 4
    assert set(rows) <= {"ReluBackward0", "AddmmBackward0"}
    pack_region(model)
    with SavedBytesMeter(model) as packed:
        out = model(x)
    rows = {r["op"]: r for r in packed.saved_by_op(out)}
    assert rows["_MaskedGradBackward"]["bytes"] == 8 * 50 // 8
    assert rows["_MaskedGradBackward"]["dtypes"] == ["uint8"]
    assert packed.region_activation_bytes == 2 * 8 * 50 * 4 + 8 * 50 // 8


# ---------------------------------------------------------------------------- continual runs
class _CLNet(nn.Module):
    """conv-BN(batch statistics)-ReLU-dropout-maxpool, fc-ReLU-dropout, one head per task (8×8 inputs)."""

    def __init__(self, task_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 32, bias=False)
        self.heads = nn.ModuleList(nn.Linear(32, k, bias=False) for k in task_classes)

    def forward(self, x, task):
        x = self.pool(self.drop(self.relu(self.bn(self.conv(x)))))
        return self.heads[task](self.drop(self.relu(self.fc(x.flatten(1)))))


def _cl_tasks(n_tasks=2, n=64):
    from torch.utils.data import TensorDataset

    from engine.continual.runner import Task

    gen = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(n_tasks):
        x = torch.randn(n, 3, 8, 8, generator=gen)
        y = (x[:, t].mean((1, 2)) > 0).long()
        tasks.append(Task(f"t{t}", [2 * t, 2 * t + 1], TensorDataset(x, y), TensorDataset(x[:32], y[:32])))
    return tasks


@pytest.mark.parametrize("method", ["lance", "gpm"])
def test_continual_packing_is_exact_and_measures_peak_memory(method):
    from engine.continual.learner import ContinualConfig
    from engine.continual.runner import run_sequence, task_rows

    out = {}
    for pack in (False, True):
        torch.manual_seed(0)
        config = ContinualConfig(method=method, epochs=2, batch_size=16, lr=0.05, calibration_batches=2,
                                 calibration_batch_size=16, basis_samples=32, seed=0, pack=pack)
        records, learner = run_sequence(_CLNet([2, 2]), _cl_tasks(), config)
        out[pack] = (records, learner.model)
    (plain, plain_model), (packed, packed_model) = out[False], out[True]
    assert engine.packing.is_packed(packed_model) and not engine.packing.is_packed(plain_model)
    for a, b in zip(plain, packed):
        assert a.train_loss == b.train_loss and a.acc == b.acc  # bit for bit
        assert a.peak_layer_activation_bytes == b.peak_layer_activation_bytes
        # ReLU 4 → 1/32, dropout 4 → 1/32 bytes per element, max-pool input + int64 → 1 byte per output;
        # the batch-statistics BN keeps its input either way
        assert b.peak_region_activation_bytes < a.peak_region_activation_bytes
        assert b.peak_memory_bytes > 0 and a.peak_memory_bytes > 0
        assert {"key": "peak_memory_bytes", "value": b.peak_memory_bytes}.items() <= \
            next(r for r in task_rows(b) if r["key"] == "peak_memory_bytes").items()


def _alexnet_step(model, x, y, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with SavedBytesMeter(model) as meter:
        loss = F.cross_entropy(model(x, 0), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meter


def test_packed_relu_dropout_and_pool_run_as_one_op_with_the_same_numbers_and_fewer_bits(monkeypatch):
    """alexnet-cl's ReLU → dropout (→ max-pool) runs: the fused ops give the plain model's loss and every gradient
    bit for bit. A ReLU → dropout pair saves one bit per element where the two packed ops saved two; with the
    2×2 pool after it, one bit per pooled output instead of two per input element."""
    from engine.models.cl_nets import build_multihead
    from engine.packing import PackedReLU, _PackedReluDropout, _PackedReluDropoutPool

    torch.manual_seed(0)
    plain = build_multihead("alexnet-cl", [2, 2], 32, seed=0).train()
    packed = copy.deepcopy(plain)
    pack_region(packed)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,))
    pairs, triples = [], []
    real_pair, real_triple = _PackedReluDropout.apply, _PackedReluDropoutPool.apply
    monkeypatch.setattr(_PackedReluDropout, "apply", lambda *a: pairs.append(a[0].shape) or real_pair(*a))
    monkeypatch.setattr(_PackedReluDropoutPool, "apply", lambda *a: triples.append(a[0].shape) or real_triple(*a))
    loss0, grads0, _ = _alexnet_step(plain, x, y, seed=3)
    loss1, grads1, fused_meter = _alexnet_step(packed, x, y, seed=3)
    assert [tuple(s[1:]) for s in triples] == [(64, 29, 29), (128, 12, 12)]  # conv1, conv2 and their pools
    assert [tuple(s[1:]) for s in pairs] == [(256, 5, 5), (2048,), (2048,)]  # conv3's 5×5 map: pair, then pool
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    monkeypatch.setattr(PackedReLU, "fuse_next", lambda self, following, x: None)
    loss2, grads2, separate_meter = _alexnet_step(packed, x, y, seed=3)
    assert torch.equal(loss1, loss2) and all(torch.equal(grads1[n], grads2[n]) for n in grads1)

    def bits(n):
        return (n + 7) // 8

    pooled = [s[0] * s[1] * (s[2] // 2) * (s[3] // 2) for s in triples]
    saved = sum(bits(s.numel()) for s in pairs) + sum(2 * bits(s.numel()) - bits(p) for s, p in zip(triples, pooled))
    assert separate_meter.region_activation_bytes - fused_meter.region_activation_bytes == saved


@pytest.mark.parametrize("shape", [(3, 4, 9, 7), (2, 5, 16, 16), (2, 3, 2, 3), (2, 3, 7, 6)])
def test_relu_dropout_pool_op_matches_the_three_ops_with_nans_and_odd_maps(shape):
    """The three-op kernel against ReLU → FastDropout → MaxPool2d(2) in plain autograd: the same output and
    input gradient bit for bit on odd map sizes (the cropped last row / column gets zero gradient), with ties
    (zeros, repeated values) and a NaN in the input and in the output gradient."""
    from engine.dropout import FastDropout
    from engine.packing import _PackedReluDropoutPool

    torch.manual_seed(1)
    x = torch.randn(shape)
    x.view(-1)[::5] = 0.0
    x.view(-1)[1::7] = 0.5
    x.view(-1)[3] = float("nan")
    reference = nn.Sequential(nn.ReLU(), FastDropout(0.3), nn.MaxPool2d(2)).train()
    x0, x1 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    y0 = reference(x0)
    torch.manual_seed(7)
    y1 = _PackedReluDropoutPool.apply(x1, 0.3)
    assert torch.equal(y0.isnan(), y1.isnan()) and torch.equal(y0.nan_to_num(), y1.nan_to_num())
    grad = torch.randn_like(y0)
    grad.view(-1)[-1] = float("nan")
    y0.backward(grad)
    y1.backward(grad)
    h, w = shape[2] // 2 * 2, shape[3] // 2 * 2
    window_ok = ~y0.isnan().repeat_interleave(2, -2).repeat_interleave(2, -1)  # a NaN window's argmax may differ
    g0, g1 = x0.grad[..., :h, :w][window_ok], x1.grad[..., :h, :w][window_ok]
    assert torch.equal(g0.isnan(), g1.isnan()) and torch.equal(g0.nan_to_num(), g1.nan_to_num())
    assert not x1.grad[..., h:, :].any() and not x1.grad[..., :, w:].any()  # cropped: no gradient
    assert int((g1 != 0).sum()) > 0


def test_fuse_next_declines_where_the_ops_take_other_paths():
    from engine.packing import PackedFastDropout, PackedMaxPool2d, PackedReLU, _PackedReluDropoutPool

    relu, drop, pool = PackedReLU(), PackedFastDropout(0.5), PackedMaxPool2d(2)
    x = torch.randn(4, 6, requires_grad=True)
    assert relu.fuse_next([drop], x)[1] == 1
    assert relu.fuse_next([nn.Dropout(0.5)], x) is None  # not the packed fast dropout
    assert relu.fuse_next([drop.eval()], x) is None
    assert relu.fuse_next([drop.train()], x.detach()) is None  # no grad: plain forward
    assert relu.fuse_next([PackedFastDropout(0.0)], x) is None
    assert relu.fuse_next([], x) is None
    with torch.no_grad():
        assert relu.fuse_next([drop], x) is None
    maps = torch.randn(2, 3, 8, 8, requires_grad=True)
    out, ran = relu.fuse_next([drop, pool], maps)
    assert ran == 2 and out.shape == (2, 3, 4, 4) and out.grad_fn.name().startswith(_PackedReluDropoutPool.__name__)
    for other in (PackedMaxPool2d(3), PackedMaxPool2d(2, stride=1), PackedMaxPool2d(2, padding=1),
                  PackedMaxPool2d(2, ceil_mode=True), PackedMaxPool2d(2, return_indices=True), nn.MaxPool2d(2)):
        assert relu.fuse_next([drop, other], maps)[1] == 1  # the pair; the pool is left to run alone
    assert relu.fuse_next([drop, pool], torch.randn(2, 3, 1, 8, requires_grad=True))[1] == 1
    assert relu.fuse_next([drop, pool], torch.randn(2, 3, 5, 5, requires_grad=True))[1] == 1  # below 36 positions
    assert relu.fuse_next([drop, pool], torch.randn(2, 3, 6, 6, requires_grad=True))[1] == 2
