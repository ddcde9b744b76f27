"""Continual learning: metrics, bases, LANCE's compressed gradient, protection of old tasks, runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from engine import SavedBytesMeter
from engine.continual.basis import extend_basis, plain_factor, residual_factor
from engine.continual.layers import CLConv2d, CLLinear
from engine.continual.learner import ContinualConfig, ContinualLearner
from engine.continual.metrics import average_accuracy, backward_transfer, forgetting, summarize
from engine.continual.runner import Task, run_sequence
from engine.spectra import rank_for_energy

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ small real stand-ins
class TinyMultiHead(nn.Module):
    """conv(3→8)-BN-ReLU-pool-conv(8→16)-ReLU-fc(256→32)-ReLU + one head per task (8×8 inputs)."""

    def __init__(self, task_classes: list[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.heads = nn.ModuleList(nn.Linear(32, k) for k in task_classes)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x, task):
        return self.heads[task](self.features(x))


def digits_tasks(n_tasks: int = 3, per_task_train: int | None = None) -> list[Task]:
    """Split-digits from scikit-learn's bundled digits: task t = classes (2t, 2t+1), 3×8×8 inputs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    x = ((x - 0.3) / 0.4).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(n_tasks):
        idx = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = int(0.7 * len(idx))
        tr, te = idx[:cut], idx[cut:]
        if per_task_train:
            tr = tr[:per_task_train]
        tasks.append(Task(f"digits {2*t}/{2*t+1}", [2 * t, 2 * t + 1],
                          TensorDataset(x[tr], y[tr] - 2 * t), TensorDataset(x[te], y[te] - 2 * t)))
    return tasks


def meter_factory(model):
    return SavedBytesMeter(model)


# ------------------------------------------------------------------ metrics
def test_metrics_match_hand_computed_values():
    r = [[90.0],
         [70.0, 80.0],
         [60.0, 85.0, 75.0]]
    # ACC = (60+85+75)/3 ; BWT = ((60-90) + (85-80))/2
    # forgetting = ((max(90,70)-60) + (max(80)-85))/2 = (30 - 5)/2  (negative terms are not clipped)
    assert average_accuracy(r) == pytest.approx(220.0 / 3)
    assert backward_transfer(r) == pytest.approx(-12.5)
    assert forgetting(r) == pytest.approx(12.5)
    assert summarize(r, 1) == pytest.approx({"ACC": 75.0, "BWT": -20.0, "forgetting": 20.0})
    assert summarize(r, 0) == {"ACC": 90.0, "BWT": 0.0, "forgetting": 0.0}
    with pytest.raises(ValueError, match="missing"):
        average_accuracy([[float("nan")]])


# ------------------------------------------------------------------ bases
def test_extend_basis_gpm_rule_and_residual_factor():
    gen = torch.Generator().manual_seed(0)
    d = 12
    a = torch.randn(d, 4, generator=gen) @ torch.randn(4, 200, generator=gen)  # rank-4 data (D, N)
    basis, info = extend_basis(None, a.double() @ a.double().T, 1.0)
    assert info["rank"] == 4 and info["added"] == 4
    assert torch.allclose(basis.T @ basis, torch.eye(4), atol=1e-5)
    # the basis spans the data exactly
    assert float((a - basis @ (basis.T @ a)).norm() / a.norm()) < 1e-5
    # energy threshold: spectrum 100, 10, 1 -> 0.9 needs 1 direction, 0.95 needs 2
    values = torch.tensor([100.0, 10.0, 1.0], dtype=torch.float64)
    assert rank_for_energy(values, 0.9) == 1
    assert rank_for_energy(values, 0.95) == 2
    assert rank_for_energy(values, 0.9, captured=50.0, total=161.0) == 1  # (50+100)/161 = 0.93
    assert rank_for_energy(values, 0.95, captured=50.0, total=161.0) == 2
    # new data: half inside the old span -> residual factor is orthogonal to the basis
    b = torch.cat([a[:, :100], torch.randn(d, 100, generator=gen)], dim=1)
    u = residual_factor(b.double() @ b.double().T, basis, 0.99)
    assert u.shape[1] >= 1
    assert float((basis.T @ u).abs().max()) < 1e-5
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-5)
    # basis already covers everything -> GPM adds nothing, LANCE's factor is empty
    full, _ = extend_basis(None, torch.eye(d, dtype=torch.float64), 1.0)
    assert full.shape == (d, d)
    again, info = extend_basis(full, b.double() @ b.double().T, 0.97)
    assert info["added"] == 0 and again.shape == (d, d)
    assert residual_factor(b.double() @ b.double().T, full, 0.9).shape == (d, 0)
    assert plain_factor(torch.diag(torch.tensor([4.0, 1.0, 0.0])).double(), 0.75).shape == (3, 1)


# ------------------------------------------------------------------ the compressed gradient
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, (1, 0), 1), (1, 2, 2)])
def test_lance_conv_gradient_full_rank_equals_autograd_and_lies_in_span(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 4, 11, 10, requires_grad=True)
    ref_out = conv(x)
    g = torch.randn_like(ref_out)
    ref_out.backward(g)
    ref = (conv.weight.grad.clone(), conv.bias.grad.clone(), x.grad.clone())
    layer = CLConv2d.from_conv(conv)
    layer.storage = "lance"
    d = layer.feature_dim
    layer.set_factors(torch.eye(d), torch.eye(ref_out.shape[2]), torch.eye(ref_out.shape[3]))
    conv.weight.grad = conv.bias.grad = x.grad = None
    out = layer(x)
    assert torch.equal(out, ref_out.detach()) or torch.allclose(out, ref_out, atol=1e-6)
    out.backward(g)
    rel = (conv.weight.grad - ref[0]).norm() / ref[0].norm()
    assert float(rel) < 1e-5
    assert torch.allclose(conv.bias.grad, ref[1], atol=1e-5)
    assert torch.allclose(x.grad, ref[2], atol=1e-5)
    # low rank: the weight update lies in span(U_F)
    q, _ = torch.linalg.qr(torch.randn(d, 5))
    layer.set_factors(q)
    conv.weight.grad = None
    layer(x).backward(g)
    flat = conv.weight.grad.reshape(6, -1)
    assert float((flat - flat @ q @ q.T).norm() / flat.norm()) < 1e-5


def test_lance_linear_gradient_3d_input_and_saved_size():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7)
    x = torch.randn(4, 5, 10, dtype=torch.float64, requires_grad=True)
    lin = lin.double()
    layer = CLLinear.from_linear(lin)
    layer.storage = "lance"
    layer.set_factors(torch.eye(10))
    layer.u_feat = layer.u_feat.double()
    # the layer's own autograd Function: its input gradient against finite differences
    assert torch.autograd.gradcheck(layer, (x,))
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    gw = lin.weight.grad.clone()
    lin.weight.grad = None
    F.linear(x, lin.weight, lin.bias).backward(g)
    assert torch.allclose(gw, lin.weight.grad, atol=1e-10)
    # what autograd keeps for a rank-2 factor: (N, 2) instead of (N, 10)
    layer.set_factors(torch.linalg.qr(torch.randn(10, 2))[0])
    lin.float()
    layer.u_feat = layer.u_feat.float()
    xf = torch.randn(64, 10)
    with SavedBytesMeter(layer) as meter:
        layer(xf).sum()
    # the core and the factor backward reads (counted as fine-tune LANCE counts its factors)
    assert meter.layer_activation_bytes == 64 * 2 * 4 + 10 * 2 * 4
    layer.storage = "full"
    with SavedBytesMeter(layer) as meter:
        layer(xf).sum()
    assert meter.layer_activation_bytes == 64 * 10 * 4


# ------------------------------------------------------------------ protection of old tasks
def _train_two_tasks(method: str, compress_first_task: bool = True, recalibrate_every: int = 0):
    torch.manual_seed(0)
    tasks = digits_tasks(2, per_task_train=64)
    model = TinyMultiHead([2, 2])
    config = ContinualConfig(method=method, epochs=10, lr=0.1, batch_size=32, eps=0.9, spatial_eps=0.9,
                             eps_cl=1.0, basis_samples=64, calibration_batches=2, seed=0,
                             compress_first_task=compress_first_task, recalibrate_every=recalibrate_every)
    old_x = torch.stack([tasks[0].train[i][0] for i in range(64)])  # the inputs the basis is built from
    snapshots = {}

    def after(record, learner):
        if record.task == 0:
            learner.model.eval()
            snapshots["before"] = _layer_outputs(learner.model, old_x, 0)

    records, learner = run_sequence(model, tasks, config, meter_factory=meter_factory, on_task_end=after)
    learner.model.eval()
    return snapshots["before"], _layer_outputs(learner.model, old_x, 0), records, learner


@torch.no_grad()
def _layer_outputs(model, x, task):
    outs = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o.clone()))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    outs["logits"] = model(x, task).clone()
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("method, recalibrate_every", [("lance", 0), ("gpm", 0), ("lance", 2)])
def test_old_task_outputs_do_not_move_with_protection(method, recalibrate_every):
    before, after, records, learner = _train_two_tasks(method, recalibrate_every=recalibrate_every)
    # task 1 did change the shared weights...
    assert records[1].usage["fc"] > 0
    moved_weights = [n for n, l in learner.layers.items() if l.protected]
    assert moved_weights
    for name in ("conv1", "conv2", "fc", "logits"):
        scale = before[name].abs().max()
        diff = (after[name] - before[name]).abs().max()
        assert float(diff / scale) < 2e-5, (name, float(diff), float(scale))
    assert records[1].BWT == pytest.approx(0.0, abs=1e-9)


def _three_digit_tasks(method: str):
    torch.manual_seed(0)
    config = ContinualConfig(method=method, epochs=5, lr=0.1, batch_size=32, eps=0.9, spatial_eps=0.9,
                             eps_cl=0.97, basis_samples=64, calibration_batches=2, calibration_batch_size=32,
                             seed=0)
    records, _ = run_sequence(TinyMultiHead([2, 2, 2]), digits_tasks(3, per_task_train=128), config,
                              meter_factory=meter_factory)
    return records


def test_lance_learns_new_tasks_about_as_well_as_gpm():
    lance, gpm = _three_digit_tasks("lance"), _three_digit_tasks("gpm")
    assert all(acc > 85.0 for acc in lance[-1].acc), lance[-1].acc
    assert lance[-1].ACC >= gpm[-1].ACC - 3.0
    assert lance[-1].BWT >= -3.0
    # the factors of later tasks are orthogonal to what earlier tasks protected: ranks were calibrated
    assert lance[2].ranks["fc"][0] >= 1 and 0 < lance[2].usage["conv2"] < 1


def test_recalibration_refits_factors_orthogonal_to_the_basis_every_n_epochs():
    torch.manual_seed(0)
    config = ContinualConfig(method="lance", epochs=7, lr=0.1, batch_size=32, eps=0.9, spatial_eps=0.9,
                             eps_cl=0.97, basis_samples=64, calibration_batches=2, seed=0, recalibrate_every=3)
    learner = ContinualLearner(TinyMultiHead([2, 2]), config)
    seen = []  # (task, epoch, {layer: U_F after the epoch}, {layer: protected basis})

    def on_epoch_end(task, epoch, values):
        seen.append((task, epoch, {n: l.u_feat.clone() for n, l in learner.layers.items()},
                     {n: l.protected_basis.clone() for n, l in learner.layers.items()}))

    run_sequence(learner.model, digits_tasks(2, per_task_train=64), config, meter_factory=None,
                 on_epoch_end=on_epoch_end, learner=learner)
    assert [(t, e) for t, e, _, _ in seen] == [(t, e) for t in (0, 1) for e in range(7)]
    for name in ("conv2", "fc"):
        factors = [u[name] for t, _, u, _ in seen if t == 0]
        # fixed within each block of 3 epochs, re-fitted (to the weights as they trained) at epochs 3 and 6
        for e in range(1, 7):
            same = factors[e].shape == factors[e - 1].shape and torch.equal(factors[e], factors[e - 1])
            assert same == (e % 3 != 0), (name, e)
    for t, _, factors, bases in seen:
        for name, u in factors.items():
            p = bases[name]
            if t == 1 and p.shape[1]:  # every factor task 1 used is orthogonal to task 0's protected basis
                assert float((p.T @ u).abs().max()) < 1e-4, name
    assert any(bases["conv2"].shape[1] for t, _, _, bases in seen if t == 1)


class BatchStatNet(TinyMultiHead):
    """TinyMultiHead normalised with batch statistics only (GPM's ``track_running_stats=False``)."""

    def __init__(self, task_classes: list[int]):
        super().__init__(task_classes)
        self.bn1 = nn.BatchNorm2d(8, track_running_stats=False)
        self.bn2 = nn.BatchNorm1d(32, track_running_stats=False)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.relu(self.conv2(x))
        return F.relu(self.bn2(self.fc(x.flatten(1))))


def test_accuracy_with_batch_statistics_does_not_depend_on_a_class_sorted_test_set():
    # an image folder lists test images class by class; evaluated in that order, batches of one class
    # are normalised to near chance (64 % here) — the runner evaluates a fixed seeded shuffle instead
    tasks = digits_tasks(1)
    x, y = tasks[0].test.tensors
    order = torch.argsort(y, stable=True)
    tasks[0].test = TensorDataset(x[order], y[order])
    torch.manual_seed(0)
    config = ContinualConfig(method="gpm", epochs=3, lr=0.1, batch_size=16, eval_batch_size=16, seed=0)
    records, _ = run_sequence(BatchStatNet([2]), tasks, config, meter_factory=None)
    assert records[0].acc[0] > 95.0


def test_finetune_moves_old_task_outputs():
    before, after, records, _ = _train_two_tasks("finetune")
    rel = (after["fc"] - before["fc"]).abs().max() / before["fc"].abs().max()
    assert float(rel) > 1e-2


def test_lance_stores_less_than_gpm():
    _, _, lance, _ = _train_two_tasks("lance")
    _, _, lance_full0, _ = _train_two_tasks("lance", compress_first_task=False)
    _, _, gpm, _ = _train_two_tasks("gpm")
    assert gpm[1].peak_layer_activation_bytes > 0
    assert lance[0].peak_layer_activation_bytes * 2 < gpm[0].peak_layer_activation_bytes
    assert lance[1].peak_layer_activation_bytes * 2 < gpm[1].peak_layer_activation_bytes
    # task 0 uncompressed: same storage as GPM on task 0, compressed afterwards
    assert lance_full0[0].peak_layer_activation_bytes == gpm[0].peak_layer_activation_bytes
    assert lance_full0[1].peak_layer_activation_bytes * 2 < gpm[1].peak_layer_activation_bytes
    assert all(r.peak_region_activation_bytes >= r.peak_layer_activation_bytes for r in lance + gpm)


def test_layer_stores_input_when_core_would_be_larger_and_restricts_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)  # patch space D = 18 > C = 2: a rank-9 core is 4.5x the input
    layer = CLConv2d.from_conv(conv, name="c")
    layer.storage = "lance"
    q, _ = torch.linalg.qr(torch.randn(18, 9))
    layer.set_factors(q)
    x = torch.randn(5, 2, 6, 6)
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert meter.layer_activation_bytes == 5 * 9 * 6 * 6 * 4 + 18 * 9 * 4  # the core (B, r, H', W') + U_F
    layer.store_input_instead = True
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert meter.layer_activation_bytes == x.numel() * 4  # the input, smaller
    g = torch.randn_like(out)
    out.backward(g)
    layer.restrict_weight_grad()
    conv2 = nn.Conv2d(2, 4, 3, padding=1)
    conv2.load_state_dict(conv.state_dict())
    conv2(x).backward(g)
    expected = (conv2.weight.grad.reshape(4, -1) @ q @ q.T).reshape(conv.weight.shape)
    assert torch.allclose(conv.weight.grad, expected, atol=1e-5)


def test_one_byte_definition_factors_count_in_continual_as_in_finetune():
    """The same rank-r feature factor on the same input: fine-tune LANCE (engine.compress_model) and continual
    LANCE (CLLinear) both count core + the factor backward reads as layer activation bytes."""
    import engine

    torch.manual_seed(0)
    batch, features, rank = 32, 24, 3
    x = torch.randn(batch, features)
    lin = nn.Linear(features, 5)
    model = nn.Sequential(lin)
    handle = engine.compress_model(model, "lance", layers=["0"], options={"ranks": (batch, rank)},
                                   calibration_loader=[(x, None)], calibration_batches=1)
    with SavedBytesMeter(model) as meter:
        model(x).sum()
    finetune_bytes = meter.layer_activation_bytes
    engine.restore_model(model)
    layer = CLLinear.from_linear(nn.Linear(features, 5), name="fc")
    layer.storage = "lance"
    layer.set_factors(torch.linalg.qr(torch.randn(features, rank))[0])
    with SavedBytesMeter(layer) as meter:
        layer(x).sum()
    expected = 4 * (batch * rank + features * rank)  # core (B, r) + factor (F, r), float32
    assert finetune_bytes == meter.layer_activation_bytes == expected
    assert handle is not None


def test_linear_stores_input_when_core_and_factor_would_be_larger_and_restricts_gradient():
    """Never worse than the input for linear layers too: 4 rows of 16 features at rank 6 would save a
    (4, 6) core + a (16, 6) factor = 120 floats > the 64-float input, so the input is saved and the
    gradient is restricted to span(U_F) after backward (what the core would have given)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 3)
    layer = CLLinear.from_linear(lin, name="fc")
    layer.storage = "lance"
    q, _ = torch.linalg.qr(torch.randn(16, 6))
    layer.set_factors(q)
    x = torch.randn(4, 16)
    with SavedBytesMeter(layer) as meter:
        layer(x)
    assert meter.layer_activation_bytes == (4 * 6 + 16 * 6) * 4
    layer.store_input_instead = True
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert meter.layer_activation_bytes == x.numel() * 4
    g = torch.randn_like(out)
    out.backward(g)
    layer.restrict_weight_grad()
    assert torch.allclose(lin.weight.grad, (g.T @ x) @ q @ q.T, atol=1e-5)
