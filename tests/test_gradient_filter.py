"""Gradient filter against a direct computation: non-overlapping R×R output patches (the last partial),
the matching (s·R)×(s·R) input patches, dW = Σ |patch|·Ḡ·Ā per tap, dX = exact transposed conv of G̃."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.geometry import conv_geometry
from engine.methods import simple
from engine.methods.simple import broadcast_patches, filtered_input_grad_taps, taps_route_cheaper


def _patch_bounds(size: int, patch: int, i: int) -> tuple[int, int]:
    return i * patch, min((i + 1) * patch, size)


def _direct(conv: nn.Conv2d, x: torch.Tensor, grad_output: torch.Tensor, patch: int):
    """Explicit loops over the patches: (dW, dX) of gradient filtering with patch ``patch``."""
    batch, channels, height, width = x.shape
    out_h, out_w = grad_output.shape[2:]
    sh, sw = conv.stride
    grid_h, grid_w = -(-out_h // patch), -(-out_w // patch)
    a_bar = torch.zeros(batch, channels, grid_h, grid_w, dtype=x.dtype)
    g_bar = torch.zeros(batch, grad_output.shape[1], grid_h, grid_w, dtype=x.dtype)
    count = torch.zeros(grid_h, grid_w, dtype=x.dtype)
    g_tilde = torch.zeros_like(grad_output)
    for i in range(grid_h):
        for j in range(grid_w):
            y0, y1 = _patch_bounds(out_h, patch, i)
            x0, x1 = _patch_bounds(out_w, patch, j)
            count[i, j] = (y1 - y0) * (x1 - x0)
            g_bar[:, :, i, j] = grad_output[:, :, y0:y1, x0:x1].mean(dim=(2, 3))
            g_tilde[:, :, y0:y1, x0:x1] = g_bar[:, :, i, j, None, None]
            iy0, iy1 = _patch_bounds(height, sh * patch, i)
            ix0, ix1 = _patch_bounds(width, sw * patch, j)
            a_bar[:, :, i, j] = x[:, :, iy0:iy1, ix0:ix1].mean(dim=(2, 3))
    groups = conv.groups
    out_ch, in_per_group, kh, kw = conv.weight.shape
    dw = torch.zeros(out_ch, in_per_group, dtype=x.dtype)
    for o in range(out_ch):
        g = o // (out_ch // groups)
        for c in range(in_per_group):
            dw[o, c] = (count * g_bar[:, o] * a_bar[:, g * in_per_group + c]).sum()
    dw = dw[:, :, None, None].expand(out_ch, in_per_group, kh, kw)
    xr = x.detach().clone().requires_grad_(True)
    F.conv2d(xr, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation, groups).backward(g_tilde)
    return dw, xr.grad


CASES = [
    # (in_ch, out_ch, kernel, stride, padding, groups, H): 7×7 with R = 2 is the case whose windows used to differ
    pytest.param(5, 6, 3, 1, 1, 1, 7, id="3x3-7x7"),
    pytest.param(5, 6, 1, 1, 0, 1, 7, id="1x1-7x7"),
    pytest.param(6, 6, 3, 1, 1, 6, 7, id="depthwise-7x7"),
    pytest.param(5, 6, 3, 1, 1, 1, 6, id="3x3-6x6"),
    pytest.param(6, 6, 7, 1, 3, 6, 6, id="depthwise7-6x6"),
    pytest.param(5, 6, 1, 1, 0, 1, 6, id="1x1-6x6"),
    pytest.param(4, 6, 1, 2, 0, 1, 14, id="1x1-stride2-14x14"),
    pytest.param(4, 6, 3, 2, 1, 1, 14, id="3x3-stride2-14x14"),
    pytest.param(4, 6, 3, 2, 1, 1, 8, id="3x3-stride2-8x8"),
    # R = 2 not dividing H': the partial last patch row / column through their own transposed convs
    pytest.param(6, 6, 7, 1, 3, 6, 7, id="depthwise7-7x7"),
    pytest.param(4, 6, 3, 2, 1, 1, 13, id="3x3-stride2-13x13"),
    pytest.param(4, 5, 5, 1, 2, 1, 9, id="5x5-9x9"),
    pytest.param(4, 5, 3, 1, 0, 1, 7, id="3x3-nopad-7x7"),
    # wide enough that the FLOP rule takes the taps route (Wᵀ Ḡ on the grid, then the scatter matmul)
    pytest.param(64, 64, 3, 1, 1, 1, 7, id="taps-3x3-7x7"),
    pytest.param(64, 64, 3, 1, 1, 1, 6, id="taps-3x3-6x6"),
    pytest.param(48, 64, 3, 2, 1, 1, 13, id="taps-3x3-stride2-13x13"),
]


@pytest.mark.parametrize("in_ch,out_ch,kernel,stride,padding,groups,size", CASES)
def test_gradient_filter_matches_direct_patch_sums(in_ch, out_ch, kernel, stride, padding, groups, size):
    torch.manual_seed(size * 10 + kernel)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups).double()
    x = torch.randn(3, in_ch, size, size, dtype=torch.float64)
    model = nn.Sequential(copy.deepcopy(conv))
    engine.compress_model(model, "gradient_filter", layers=["0"], options={"patch": 2})
    xin = x.clone().requires_grad_(True)
    out = model(xin)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    dw, dx = _direct(conv, x, grad_output, 2)
    assert torch.allclose(model[0].weight.grad, dw, rtol=1e-10, atol=1e-10)
    assert torch.allclose(xin.grad, dx, rtol=1e-10, atol=1e-10)


def test_gradient_filter_stores_the_patch_grid_at_7x7():
    """At 7×7, R = 2 the stored activation is 4×4: rows/cols {0,1},{2,3},{4,5},{6} averaged (not overlapping)."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(conv)
    handle = engine.compress_model(model, "gradient_filter", layers=["0"], options={"patch": 2})
    x = torch.arange(2 * 49, dtype=torch.float64).reshape(1, 2, 7, 7)
    stored = handle.layers["0"].method.pool_activation(handle.layers["0"], x)
    assert stored.shape == (1, 2, 4, 4)
    assert stored[0, 0, 0, 0] == x[0, 0, :2, :2].mean()
    assert stored[0, 0, 1, 2] == x[0, 0, 2:4, 4:6].mean()
    assert stored[0, 0, 3, 3] == x[0, 0, 6, 6]
    assert stored[0, 1, 3, 0] == x[0, 1, 6, :2].mean()


TAPS_GEOMETRIES = [
    # (in_ch, out_ch, kernel, stride, padding, dilation, size (H, W), patch)
    pytest.param(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), (7, 7), 2, id="3x3-7x7"),
    pytest.param(3, 4, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8), 2, id="3x3-8x8"),
    pytest.param(3, 4, (3, 3), (2, 2), (1, 1), (1, 1), (13, 11), 2, id="stride2-13x11"),
    pytest.param(3, 4, (3, 3), (1, 1), (2, 2), (2, 2), (9, 9), 2, id="dilation2"),
    pytest.param(3, 4, (5, 3), (1, 2), (2, 0), (1, 1), (10, 9), 3, id="rect-5x3-patch3"),
    pytest.param(3, 4, (2, 2), (1, 1), "same", (1, 1), (7, 7), 2, id="same-even-asymmetric"),
    pytest.param(3, 4, (3, 3), (1, 1), (0, 0), (1, 1), (7, 7), 4, id="nopad-patch4"),
]


@pytest.mark.parametrize("in_ch,out_ch,kernel,stride,padding,dilation,size,patch", TAPS_GEOMETRIES)
def test_taps_route_equals_the_broadcast_transposed_conv(in_ch, out_ch, kernel, stride, padding, dilation, size, patch):
    """``Wᵀ Ḡ`` per tap on the grid, scattered by the fixed 0/1 matrix, is the exact transposed conv of G̃."""
    torch.manual_seed(sum(size) + patch)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation).double()
    geometry = conv_geometry(conv)
    input_shape = torch.Size((2, in_ch) + size)
    out_hw = geometry.output_hw(*size)
    grid = (-(-out_hw[0] // patch), -(-out_hw[1] // patch))
    g_avg = torch.randn(2, out_ch, *grid, dtype=torch.float64)
    weight = conv.weight.detach()
    expected = geometry.input_grad(broadcast_patches(g_avg, patch, out_hw), weight, input_shape)
    got = filtered_input_grad_taps(g_avg, weight, geometry, patch, out_hw, input_shape)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_taps_route_is_chosen_where_its_flops_are_lower():
    """ResNet-18 layer4's 3×3 convs at 7×7 take the taps route; a 28×28 map (scatter matmul too big) does not."""
    assert taps_route_cheaper((32, 512, 4, 4), (512, 512, 3, 3), (7, 7), (32, 512, 7, 7))
    assert taps_route_cheaper((32, 256, 7, 7), (256, 256, 3, 3), (14, 14), (32, 256, 14, 14))
    assert not taps_route_cheaper((32, 128, 14, 14), (128, 128, 3, 3), (28, 28), (32, 128, 28, 28))
    assert not taps_route_cheaper((3, 6, 4, 4), (6, 5, 3, 3), (7, 7), (3, 5, 7, 7))  # too narrow to pay off


@pytest.mark.parametrize("size,patch", [((7, 7), (2, 2)), ((6, 6), (2, 2)), ((14, 13), (4, 4)), ((9, 8), (3, 2))])
def test_patch_sums_matmul_and_strided_routes_equal_explicit_sums(monkeypatch, size, patch):
    """Both routes of ``patch_sums`` (0/1 matrix matmul; strided adds over a padded view) give each patch's sum."""
    torch.manual_seed(size[0] * 7 + patch[0])
    t = torch.randn(2, 3, *size, dtype=torch.float64)
    grid = (-(-size[0] // patch[0]), -(-size[1] // patch[1]))
    expected = torch.zeros(2, 3, *grid, dtype=torch.float64)
    for i in range(grid[0]):
        for j in range(grid[1]):
            expected[:, :, i, j] = t[:, :, i * patch[0]:(i + 1) * patch[0], j * patch[1]:(j + 1) * patch[1]].sum((2, 3))
    via_matrix, counts = simple.patch_sums(t, patch, grid)
    monkeypatch.setattr(simple, "POOL_MATRIX_MAX_ENTRIES", 0)
    via_strides, counts_strided = simple.patch_sums(t, patch, grid)
    assert torch.allclose(via_matrix, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(via_strides, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, counts_strided)
    last_rows = min(patch[0], size[0] - (grid[0] - 1) * patch[0])
    last_cols = min(patch[1], size[1] - (grid[1] - 1) * patch[1])
    assert counts[-1, -1] == last_rows * last_cols


@pytest.mark.parametrize("out_hw,patch", [((7, 7), 2), ((6, 6), 2), ((13, 14), 4)])
def test_broadcast_patches_both_routes_repeat_each_cell_over_its_patch(monkeypatch, out_hw, patch):
    grid = (-(-out_hw[0] // patch), -(-out_hw[1] // patch))
    pooled = torch.randn(2, 3, *grid, dtype=torch.float64)
    expected = torch.empty(2, 3, *out_hw, dtype=torch.float64)
    for y in range(out_hw[0]):
        for x in range(out_hw[1]):
            expected[:, :, y, x] = pooled[:, :, y // patch, x // patch]
    via_matrix = broadcast_patches(pooled, patch, out_hw)
    monkeypatch.setattr(simple, "POOL_MATRIX_MAX_ENTRIES", 0)
    assert torch.equal(via_matrix, expected)
    assert torch.equal(broadcast_patches(pooled, patch, out_hw), expected)


@pytest.mark.parametrize("kernel,groups,size,route", [(1, 1, 7, "pointwise"), (3, 1, 7, "taps"), (3, 64, 8, "grid"),
                                                       (3, 64, 7, "broadcast")])
def test_flop_model_counts_the_input_gradient_route_taken(kernel, groups, size, route):
    """``last_stats["flops"]["input_grad"]`` is the route's arithmetic, not the exact transposed conv's."""
    conv = nn.Conv2d(64, 64, kernel, padding=kernel // 2, groups=groups, bias=False)
    model = nn.Sequential(conv)
    handle = engine.compress_model(model, "gradient_filter", layers=["0"], options={"patch": 2})
    layer = handle.layers["0"]
    x = torch.randn(4, 64, size, size)
    out = model(x)
    assert layer.method.input_grad_route(layer, out.shape, x.shape) == route
    flops = layer.last_stats["flops"]
    exact = 2 * 4 * 64 * (64 // groups) * size * size * kernel * kernel
    cells = 4 * (-(-size // 2)) ** 2
    expected = {"pointwise": 2 * cells * 64 * 64,
                "taps": 2 * cells * 64 * 9 * (64 + size * size),
                "grid": 2 * cells * 64 * 1 * 4 * 4,
                "broadcast": exact}[route]
    assert flops["input_grad"] == expected
    assert flops["forward"] == exact


@pytest.mark.parametrize("input_needs_grad", [True, False], ids=["input_grad_too", "weight_grad_only"])
def test_one_backward_pools_the_output_gradient_once(monkeypatch, input_needs_grad):
    """dX (first) leaves G's patch sums for dW of the same backward: one pass over G; dW alone computes them.
    The gradients equal a backward whose dW pools G itself."""
    torch.manual_seed(7)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(4, 6, 7, 7)
    grads = {}
    for share in (True, False):
        model = nn.Sequential(copy.deepcopy(conv))
        engine.compress_model(model, "gradient_filter", layers=["0"])
        inp = x.clone().requires_grad_(input_needs_grad)
        out = model(inp)
        calls: list = []
        real = simple.patch_sums

        def counted(*args, calls=calls, real=real, **kwargs):
            calls.append(args[0].shape)
            return real(*args, **kwargs)

        def own_sums(self, g, meta, real=real):
            return real(g, (self.patch, self.patch), self._grid(*g.shape[2:]))[0]

        monkeypatch.setattr(simple, "patch_sums", counted)
        if not share:
            monkeypatch.setattr(simple.GradientFilter, "_grad_sums", own_sums)
        out.backward(torch.ones_like(out) * torch.arange(out.numel()).reshape(out.shape).sin())
        monkeypatch.undo()
        if share:
            assert len(calls) == 1, calls
        grads[share] = (model[0].weight.grad, inp.grad)
    assert torch.equal(grads[True][0], grads[False][0])
    if input_needs_grad:
        assert torch.equal(grads[True][1], grads[False][1])
