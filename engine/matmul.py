"""Dense float32 matrix products on the CPU through oneDNN where that is faster than the BLAS.

PyTorch's CPU ``mm`` calls MKL, which takes its slow generic path on AMD CPUs (no AVX-512 kernels: about
60 GFLOP/s on one core of this machine). oneDNN picks its kernels from the CPU's instruction set, not its
vendor: its inner product (``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` fuses linears into)
runs the same product about 2× faster from a few rows up (``python3 docs/bench/matmul_routes.py``). It has a
fixed cost of ≈ 20 µs and reorders its weight operand each call, so small products, and small row counts
whose weight operand is transposed (the reorder is then a strided copy), stay on ``mm``.

On Intel CPUs MKL runs its own AVX-512 kernels: there ``mm`` is as fast as oneDNN on large products and faster
on small ones and on transposed left operands (a Gram ``MᵀM``: 2× — oneDNN copies the operand first), so the
oneDNN route is only taken where the CPU is not an Intel one (:data:`PREFER_ONEDNN`; ``LANCE_MATMUL=onednn`` or
``=mm`` overrides it, for benchmarks).

Only for tensors outside autograd (inside a custom Function's forward or backward, or under no-grad): the
oneDNN op has no derivative.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: at or above this many multiply-adds (M·K·N) a product may go to oneDNN
MIN_MACS = 1 << 21
#: … or at or above this many rows whatever its size: MKL is slowest on tall thin products (a mode product
#: onto a small spatial mode, (53760, 7) @ (7, 4): 0.80 ms on ``mm``, 0.16 ms on oneDNN)
MIN_ROWS_TALL = 8192
#: rows of the left operand from which oneDNN wins when the right operand ``b`` is a transposed view
MIN_ROWS = 4
#: … and when ``b`` is a row-major (K, N) matrix, whose (N, K) view oneDNN must reorder by strides
MIN_ROWS_STRIDED = 32

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpuinfo_field(name: str, cpuinfo: Path) -> str | None:
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, …) from ``cpuinfo`` (Linux), else what
    :func:`platform.processor` says; ``""`` when neither tells."""
    vendor = _cpuinfo_field("vendor_id", cpuinfo)
    if vendor is not None:
        return vendor
    return "GenuineIntel" if "intel" in platform.processor().lower() else ""


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (for benchmark reports), ``platform.processor()`` or ``"unknown"`` off Linux."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown"


def route_name() -> str:
    """Which product route this process takes: ``"onednn"`` or ``"mm"`` (for benchmark reports)."""
    return "onednn" if PREFER_ONEDNN else "mm"


def prefers_onednn(vendor: str, override: str | None = None) -> bool:
    """Whether the products go to oneDNN where they fit (:func:`onednn_fits`): not on Intel CPUs (MKL is as fast
    or faster there, ``python3 docs/bench/matmul_routes.py``); ``override`` (``$LANCE_MATMUL``): ``"onednn"`` or
    ``"mm"`` decides instead."""
    if override:
        if override not in ("onednn", "mm"):
            raise ValueError(f"LANCE_MATMUL must be 'onednn' or 'mm', got {override!r}")
        return override == "onednn" and _ONEDNN
    return _ONEDNN and vendor != "GenuineIntel"


#: whether this process sends fitting products to oneDNN (decided once, at import)
PREFER_ONEDNN = prefers_onednn(cpu_vendor(), os.environ.get("LANCE_MATMUL") or None)


def uses_onednn(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`mm` sends ``a (M, K) @ b (K, N)`` to oneDNN: :data:`PREFER_ONEDNN` and :func:`onednn_fits`."""
    return PREFER_ONEDNN and onednn_fits(a, b)


def onednn_fits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a (M, K) @ b (K, N)`` is a product that oneDNN runs faster than a slow MKL (the shape rule)."""
    if not (_ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32):
        return False
    if a.dim() != 2 or b.dim() != 2 or a.requires_grad and torch.is_grad_enabled():
        return False
    m, k = a.shape
    n = b.shape[1]
    if m * k * n < MIN_MACS and m < MIN_ROWS_TALL:
        return False
    weight_contiguous = b.stride(0) == 1 and b.stride(1) == k  # bᵀ is a plain (N, K) matrix
    return m >= (MIN_ROWS if weight_contiguous else MIN_ROWS_STRIDED)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``a (M, K)``, ``b (K, N)`` → ``(M, N)``; oneDNN where :func:`uses_onednn`, else ``a @ b``."""
    if uses_onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` (x ``(…, F)``, weight ``(F', F)`` → ``(…, F')``), through :func:`mm` when no autograd records it."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias is not None and bias.requires_grad):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if not uses_onednn(rows, weight.t()):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], weight.shape[0])
