"""Continual learning: metrics, bases, LANCE's compressed gradient, protection of old tasks, runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from engine import SavedBytesMeter
from engine.continual.basis import extend_basis, plain_factor, residual_factor
from engine.continual.learner import ContinualConfig, ContinualLearner
from engine.continual.metrics import average_accuracy, backward_transfer, forgetting, summarize
from engine.continual.runner import Task, run_sequence
from engine.layers import CompressedLayer, _CompressedOp
from engine.methods import make_method
from engine.methods.protected import ProtectedLANCE, feature_rows
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
def protected_layer(module: nn.Module, mode: str = "lance", name: str = "layer", **options) -> CompressedLayer:
    """The engine's compressed layer running the continual method (as ``prepare_model`` builds it)."""
    return CompressedLayer(module, make_method("protected", name, {"mode": mode, **options}), name=name)


def direct_conv_weight_grad(conv: nn.Conv2d, x, g, u, u_h=None, u_w=None):
    """dW from the explicitly rebuilt im2col patches: Â = patches ×_F U Uᵀ [×_H U_H U_Hᵀ ×_W U_W U_Wᵀ]."""
    b, _, h_out, w_out = g.shape
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, D, L)
    a = patches.reshape(b, -1, h_out, w_out)
    a = torch.einsum("bdhw,de,fe->bfhw", a, u, u)
    if u_h is not None:
        a = torch.einsum("bdhw,hi,ki->bdkw", a, u_h, u_h)
    if u_w is not None:
        a = torch.einsum("bdhw,wi,ki->bdhk", a, u_w, u_w)
    return torch.einsum("bohw,bdhw->od", g, a).reshape(conv.weight.shape)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, (1, 0), 1), (1, 2, 2)])
def test_lance_conv_core_at_full_rank_equals_autograd(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 4, 11, 10)
    ref_out = conv(x)
    g = torch.randn_like(ref_out)
    ref_out.backward(g)
    layer = protected_layer(conv)
    d = conv.weight[0].numel()
    ProtectedLANCE.set_factors(layer, torch.eye(d), torch.eye(ref_out.shape[2]), torch.eye(ref_out.shape[3]))
    stash = layer.method.core_stash(layer, x)  # full rank: larger than x, so compress itself would keep x
    assert stash.tensors[0].shape == (3, d, ref_out.shape[2], ref_out.shape[3])
    dw = layer.method.weight_grad(layer, stash.tensors, stash.meta, g)
    assert float((dw - conv.weight.grad).norm() / conv.weight.grad.norm()) < 1e-5


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, (1, 0), 1), (1, 2, 2)])
def test_lance_conv_gradient_low_rank_matches_direct_computation_and_lies_in_span(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(3, 4, 11, 10, requires_grad=True)
    ref_out = conv(x)
    g = torch.randn_like(ref_out)
    ref_out.backward(g)
    ref_bias, ref_x = conv.bias.grad.clone(), x.grad.clone()
    layer = protected_layer(conv)
    d, h_out, w_out = conv.weight[0].numel(), ref_out.shape[2], ref_out.shape[3]
    u = torch.linalg.qr(torch.randn(d, 5))[0]
    u_h, u_w = torch.linalg.qr(torch.randn(h_out, 3))[0], torch.linalg.qr(torch.randn(w_out, 2))[0]
    ProtectedLANCE.set_factors(layer, u, u_h, u_w)
    conv.weight.grad = conv.bias.grad = x.grad = None
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert torch.allclose(out, ref_out, atol=1e-6)  # forward exact
    assert layer.last_stats["stored"] == "compressed"
    assert meter.layer_activation_bytes == 4 * (3 * 5 * 3 * 2 + d * 5 + h_out * 3 + w_out * 2)  # core + factors
    out.backward(g)
    expected = direct_conv_weight_grad(conv, x.detach(), g, u, u_h, u_w)
    assert float((conv.weight.grad - expected).norm() / expected.norm()) < 1e-5
    assert torch.allclose(conv.bias.grad, ref_bias, atol=1e-5)  # bias and input gradients exact
    assert torch.allclose(x.grad, ref_x, atol=1e-5)
    flat = conv.weight.grad.reshape(6, -1)
    assert float((flat - flat @ u @ u.T).norm() / flat.norm()) < 1e-5


@pytest.mark.parametrize("kernel,stride,dilation", [(1, 2, 1), (2, 3, 1), (2, 3, 2)])
def test_compressed_conv_function_passes_gradcheck(kernel, stride, dilation):
    """fp64 gradcheck of the engine's Function running the protected method on its core path (at full rank
    the core of these strided convs is smaller than the input, so the compressed stash is what is kept)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=1, dilation=dilation).double()
    layer = protected_layer(conv)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    h_out, w_out = conv(x).shape[2:]
    ProtectedLANCE.set_factors(layer, torch.eye(conv.weight[0].numel()), torch.eye(h_out), torch.eye(w_out))
    layer(x)
    assert layer.last_stats["stored"] == "compressed"
    assert torch.autograd.gradcheck(lambda inp, w, b: _CompressedOp.apply(inp, w, b, layer),
                                    (x, conv.weight, conv.bias))


def test_lance_linear_gradient_3d_input_and_saved_size():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7).double()
    x = torch.randn(4, 5, 10, dtype=torch.float64, requires_grad=True)
    layer = protected_layer(lin)
    q = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64))[0]
    layer.method.set_factors(layer, q)
    layer._buffers["u_feat"] = q  # fp64 factor for the gradcheck
    # rank 2 of 10 on 20 rows: the core path; dW = G^T (A U) U^T, the exact gradient restricted to span(U_F)
    out = layer(x)
    assert layer.last_stats["stored"] == "compressed"
    g = torch.randn_like(out)
    out.backward(g)
    exact = g.reshape(-1, 7).T @ x.detach().reshape(-1, 10)
    assert torch.allclose(lin.weight.grad, exact @ q @ q.T, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (x,))  # the engine's Function: input gradient exact
    # what autograd keeps for a rank-2 factor: (N, 2) + the factor instead of (N, 10)
    lin.float()
    layer.method.set_factors(layer, torch.linalg.qr(torch.randn(10, 2))[0])
    xf = torch.randn(64, 10)
    with SavedBytesMeter(layer) as meter:
        layer(xf).sum()
    assert meter.layer_activation_bytes == 64 * 2 * 4 + 10 * 2 * 4
    layer.method.mode = "full"
    with SavedBytesMeter(layer) as meter:
        layer(xf).sum()
    assert meter.layer_activation_bytes == 64 * 10 * 4


def test_gpm_projection_in_backward_matches_direct_computation():
    """GPM (mode full, project): dW - dW P P^T, computed in the layer's backward; heads (unprotected) and
    finetune (no project) get the exact gradient."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 7, 7)
    ref = conv(x)
    g = torch.randn_like(ref)
    ref.backward(g)
    exact = conv.weight.grad.reshape(4, -1).clone()
    p = torch.linalg.qr(torch.randn(27, 6))[0]
    for protected, project, expected in ((True, True, exact - exact @ p @ p.T), (False, True, exact),
                                         (True, False, exact)):
        layer = protected_layer(conv, mode="full", protected=protected, project=project)
        ProtectedLANCE.set_basis(layer, p)
        conv.weight.grad = None
        layer(x).backward(g)
        assert torch.allclose(conv.weight.grad.reshape(4, -1), expected, atol=1e-5), (protected, project)
    # the last layer built is the GPM one: its update is orthogonal to every protected direction
    layer = protected_layer(conv, mode="full", project=True)
    ProtectedLANCE.set_basis(layer, p)
    conv.weight.grad = None
    layer(x).backward(g)
    assert float((conv.weight.grad.reshape(4, -1) @ p).abs().max()) < 1e-5


def test_feature_rows_are_the_im2col_patches():
    conv = nn.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 0))
    layer = protected_layer(conv)
    x = torch.randn(2, 2, 7, 6)
    rows = feature_rows(layer, x)
    patches = F.unfold(x, (3, 2), 1, (1, 0), 2)
    assert torch.equal(rows, patches.transpose(1, 2).reshape(-1, 12))
    assert ProtectedLANCE.usage(layer) == 0.0


def test_lance_mode_needs_calibrated_factors():
    layer = protected_layer(nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match="calibrate"):
        layer(torch.randn(3, 4, requires_grad=True))


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
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, CompressedLayer))]
    outs["logits"] = model(x, task).clone()
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("method, recalibrate_every", [("lance", 0), ("gpm", 0), ("lance", 2)])
def test_old_task_outputs_do_not_move_with_protection(method, recalibrate_every):
    before, after, records, learner = _train_two_tasks(method, recalibrate_every=recalibrate_every)
    # task 1 did change the shared weights...
    assert records[1].usage["fc"] > 0
    moved_weights = [n for n, l in learner.layers.items() if l.method.protected]
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
        seen.append((task, epoch, {n: l.u_feat.clone() for n, l in learner.layers.items() if l.u_feat is not None},
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
    """Never worse than raw, decided per step from shapes and ranks: a conv's patch space (D = C·kh·kw = 18)
    is larger than its channel count (2), so a rank-9 core with whole spatial modes is 4.5x the input; the
    input is kept and the exact gradient restricted to span(U_F) in backward. Small spatial factors make
    the core smaller than the input: then the core is kept."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    layer = protected_layer(conv, name="c")
    q, _ = torch.linalg.qr(torch.randn(18, 9))
    ProtectedLANCE.set_factors(layer, q)
    x = torch.randn(5, 2, 6, 6)
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert layer.last_stats["stored"] == "raw"
    assert meter.layer_activation_bytes == x.numel() * 4  # the input, smaller than 5*9*6*6 + 18*9 floats
    g = torch.randn_like(out)
    out.backward(g)
    conv2 = nn.Conv2d(2, 4, 3, padding=1)
    conv2.load_state_dict(conv.state_dict())
    conv2(x).backward(g)
    expected = (conv2.weight.grad.reshape(4, -1) @ q @ q.T).reshape(conv.weight.shape)
    assert torch.allclose(conv.weight.grad, expected, atol=1e-5)
    u_h, u_w = torch.linalg.qr(torch.randn(6, 1))[0], torch.linalg.qr(torch.randn(6, 1))[0]
    ProtectedLANCE.set_factors(layer, q[:, :2], u_h, u_w)
    with SavedBytesMeter(layer) as meter:
        layer(x)
    assert layer.last_stats["stored"] == "compressed"
    assert meter.layer_activation_bytes == 4 * (5 * 2 * 1 * 1 + 18 * 2 + 6 + 6)


def test_one_byte_definition_factors_count_in_continual_as_in_finetune():
    """The same rank-r feature factor on the same input: fine-tune LANCE (engine.compress_model) and continual
    LANCE (the protected method) both count core + the factor backward reads as layer activation bytes."""
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
    layer = protected_layer(nn.Linear(features, 5), name="fc")
    ProtectedLANCE.set_factors(layer, torch.linalg.qr(torch.randn(features, rank))[0])
    with SavedBytesMeter(layer) as meter:
        layer(x).sum()
    expected = 4 * (batch * rank + features * rank)  # core (B, r) + factor (F, r), float32
    assert finetune_bytes == meter.layer_activation_bytes == expected
    assert handle is not None


def test_linear_stores_input_when_core_and_factor_would_be_larger_and_restricts_gradient():
    """Never worse than the input for linear layers too, at the batch size of the step: 4 rows of 16 features
    at rank 6 would save a (4, 6) core + a (16, 6) factor = 120 floats > the 64-float input, so the input is
    saved and the gradient is restricted to span(U_F) in backward; 64 rows keep the core (480 < 1024)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 3)
    layer = protected_layer(lin, name="fc")
    q, _ = torch.linalg.qr(torch.randn(16, 6))
    ProtectedLANCE.set_factors(layer, q)
    x = torch.randn(4, 16)
    with SavedBytesMeter(layer) as meter:
        out = layer(x)
    assert meter.layer_activation_bytes == x.numel() * 4
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.allclose(lin.weight.grad, (g.T @ x) @ q @ q.T, atol=1e-5)
    with SavedBytesMeter(layer) as meter:
        layer(torch.randn(64, 16))
    assert meter.layer_activation_bytes == (64 * 6 + 16 * 6) * 4


def test_evaluation_runs_in_channels_last_with_the_nchw_accuracy(monkeypatch):
    """``ContinualLearner.evaluate`` feeds CPU image batches channels_last (faster convs and BatchNorm): the layout
    really reaches the first conv, the logits equal NCHW's to float rounding, and the accuracy is NCHW's;
    ``LANCE_CHANNELS_LAST=0`` keeps NCHW."""
    from engine.continual.learner import eval_layout
    from engine.models.cl_nets import build_multihead
    from engine.packing import pack_region

    monkeypatch.delenv("LANCE_CHANNELS_LAST", raising=False)
    x = torch.randn(64, 3, 32, 32)
    assert eval_layout(x).is_contiguous(memory_format=torch.channels_last) and not eval_layout(x).is_contiguous()
    flat = torch.randn(8, 5)
    assert eval_layout(flat) is flat
    learner = ContinualLearner(build_multihead("alexnet-cl", [2, 2], 32, seed=0), ContinualConfig(method="gpm"))
    pack_region(learner.model)
    seen = []
    handle = learner.model.features.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    y = torch.randint(0, 2, (64,))
    learner.model.eval()
    with torch.no_grad():
        nchw = learner.model(x, 0)
        assert torch.allclose(nchw, learner.model(eval_layout(x), 0), atol=1e-4)
    seen.clear()
    acc = learner.evaluate(0, [(x, y)])
    assert seen == [True]
    assert acc == pytest.approx(100.0 * float((nchw.argmax(1) == y).float().mean()))
    monkeypatch.setenv("LANCE_CHANNELS_LAST", "0")
    assert eval_layout(x) is x
    seen.clear()
    assert learner.evaluate(0, [(x, y)]) == acc and seen == [False]
    handle.remove()
