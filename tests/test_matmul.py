"""engine.matmul: oneDNN products equal ``a @ b`` and stay out of autograd; the route is off on Intel CPUs."""
import pytest
import torch

from engine import matmul
from engine.layers import CompressedLayer
from engine.methods import make_method

needs_onednn = pytest.mark.skipif(not matmul._ONEDNN, reason="this PyTorch build has no oneDNN")


@pytest.fixture
def onednn_on(monkeypatch):
    """The oneDNN route as on a non-Intel CPU, whatever this machine is."""
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", True)


@needs_onednn
@pytest.mark.parametrize("layout", ["transposed_view", "row_major"])
@pytest.mark.parametrize("m,k,n", [(64, 2048, 512), (32, 256, 256), (128, 960, 160)])
def test_onednn_route_matches_mm(m, k, n, layout, onednn_on):
    torch.manual_seed(0)
    a = torch.randn(m, k)
    b = torch.randn(n, k).t() if layout == "transposed_view" else torch.randn(k, n)
    assert matmul.onednn_fits(a, b) and matmul.uses_onednn(a, b)
    got = matmul.mm(a, b)
    want = (a.double() @ b.double()).float()
    assert got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * k ** 0.5)


@needs_onednn
def test_strided_left_operand(onednn_on):
    torch.manual_seed(1)
    g, x = torch.randn(64, 2048), torch.randn(64, 1024)
    assert matmul.onednn_fits(g.T, x)
    torch.testing.assert_close(matmul.mm(g.T, x), (g.T.double() @ x.double()).float(), rtol=1e-5, atol=1e-3)


@needs_onednn
def test_tall_thin_products_go_to_onednn_whatever_their_size(onednn_on):
    """A mode product onto a small spatial mode, (53760, 7) @ (7, 4): 1.5 M MACs, below MIN_MACS, but tall."""
    torch.manual_seed(3)
    a, b = torch.randn(matmul.MIN_ROWS_TALL, 7), torch.randn(7, 4)
    assert a.shape[0] * 7 * 4 < matmul.MIN_MACS and matmul.onednn_fits(a, b)
    torch.testing.assert_close(matmul.mm(a, b), (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)
    assert not matmul.onednn_fits(torch.randn(matmul.MIN_ROWS_TALL - 1, 7), b)


@needs_onednn
def test_small_float64_and_autograd_stay_on_mm(onednn_on):
    assert not matmul.onednn_fits(torch.randn(64, 64), torch.randn(64, 64))  # below MIN_MACS
    assert not matmul.onednn_fits(torch.randn(1, 2048), torch.randn(2048, 2048))  # one row, strided weight
    double = torch.float64
    assert not matmul.onednn_fits(torch.randn(64, 2048, dtype=double), torch.randn(2048, 512, dtype=double))
    a = torch.randn(64, 2048, requires_grad=True)
    assert not matmul.onednn_fits(a, torch.randn(2048, 512))
    with torch.no_grad():
        assert matmul.onednn_fits(a, torch.randn(2048, 512))


@needs_onednn
def test_linear_under_autograd_keeps_gradients(onednn_on):
    torch.manual_seed(2)
    x = torch.randn(64, 1024, requires_grad=True)
    w = torch.randn(512, 1024, requires_grad=True)
    b = torch.randn(512, requires_grad=True)
    matmul.linear(x, w, b).square().sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(x2, w2, b2).square().sum().backward()
    for got, want in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        out = matmul.linear(x.view(8, 8, 1024), w, b)
    assert out.shape == (8, 8, 512)
    torch.testing.assert_close(out, torch.nn.functional.linear(x.view(8, 8, 1024), w, b), rtol=1e-5, atol=1e-3)


@needs_onednn
def test_compressed_vanilla_linear_on_the_onednn_route_matches_autograd(onednn_on):
    """A 2048 → 2048 layer at batch 64: forward, input and weight gradients all take the oneDNN route."""
    torch.manual_seed(3)
    ref = torch.nn.Linear(2048, 2048)
    layer = CompressedLayer(torch.nn.Linear(2048, 2048), make_method("vanilla", "fc"), "fc")
    layer.weight.data.copy_(ref.weight.data)
    layer.bias.data.copy_(ref.bias.data)
    x = torch.randn(64, 2048)
    g = torch.randn(64, 2048)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = layer(xa), ref(xb)
    (out_a * g).sum().backward()
    (out_b * g).sum().backward()
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-3)


LAYOUTS = {
    "b row slice": lambda: (torch.randn(64, 2048), torch.randn(4096, 3000)[:2048, :700]),
    "b column slice view": lambda: (torch.randn(64, 2048), torch.randn(3000, 4096)[:700, :2048].t()),
    "a slice with offset": lambda: (torch.randn(300, 3000)[10:74, 5:2053], torch.randn(2048, 512)),
    "a expanded (stride 0)": lambda: (torch.randn(2048).expand(64, 2048), torch.randn(2048, 512)),
    "b expanded (stride 0)": lambda: (torch.randn(64, 2048), torch.randn(2048, 1).expand(2048, 512)),
    "a step 2": lambda: (torch.randn(64, 4096)[:, ::2], torch.randn(2048, 512)),
    "b step 2": lambda: (torch.randn(64, 2048), torch.randn(2048, 1024)[:, ::2]),
}


@needs_onednn
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_strided_and_expanded_operands(name, onednn_on):
    """oneDNN reads operands by their strides: views, slices and stride-0 expansions give a @ b too."""
    torch.manual_seed(4)
    a, b = LAYOUTS[name]()
    assert matmul.onednn_fits(a, b)
    want = (a.double() @ b.double()).float()
    torch.testing.assert_close(matmul.mm(a, b), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


CPUINFO = {
    "intel": "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n",
    "amd": "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n",
}


@pytest.mark.parametrize("cpu", list(CPUINFO))
def test_cpu_vendor_is_read_from_cpuinfo(cpu, tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO[cpu])
    assert matmul.cpu_vendor(path) == {"intel": "GenuineIntel", "amd": "AuthenticAMD"}[cpu]
    assert matmul.cpu_model(path) == {"intel": "Intel(R) Xeon(R) Processor", "amd": "AMD EPYC"}[cpu]


def test_onednn_route_is_off_on_intel_and_on_elsewhere(monkeypatch):
    """MKL has AVX-512 kernels on Intel CPUs (mm as fast or faster), only a generic path on AMD ones (oneDNN ≈2×)."""
    monkeypatch.setattr(matmul, "_ONEDNN", True)
    assert not matmul.prefers_onednn("GenuineIntel")
    assert matmul.prefers_onednn("AuthenticAMD") and matmul.prefers_onednn("")
    assert matmul.prefers_onednn("GenuineIntel", override="onednn")
    assert not matmul.prefers_onednn("AuthenticAMD", override="mm")
    with pytest.raises(ValueError, match="LANCE_MATMUL must be 'onednn' or 'mm'"):
        matmul.prefers_onednn("AuthenticAMD", override="blas")
    monkeypatch.setattr(matmul, "_ONEDNN", False)  # a build without oneDNN never prefers it
    assert not matmul.prefers_onednn("AuthenticAMD") and not matmul.prefers_onednn("", override="onednn")


def test_mm_off_the_onednn_route_is_torch_mm(monkeypatch):
    monkeypatch.setattr(matmul, "PREFER_ONEDNN", False)
    a, b = torch.randn(64, 2048), torch.randn(2048, 512)
    assert matmul.onednn_fits(a, b) == matmul._ONEDNN and not matmul.uses_onednn(a, b)
    assert torch.equal(matmul.mm(a, b), a @ b)
