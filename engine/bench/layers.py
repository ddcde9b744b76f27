"""`lance bench layers`: every method side by side on real backbones' last four compressible layers.

The table holds the shapes of the last four compressible layers of MCUNet-in3 (176 px), MobileNetV2
and ResNet-18 (224 px) at batch 128 (read off the real models; see ``LAYER_TABLE``). Inputs are
synthetic post-ReLU activations with decaying spectra along every mode (seeded), so the figures do not
depend on a dataset; real-data gradient errors are what `lance calibrate` measures.
For each layer, all methods run in one process, interleaved repeat by repeat; times are medians.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from engine.functional import default_asi_ranks
from engine.matmul import cpu_model, route_name
from engine.memory import SavedBytesMeter
from engine.surgery import compress_model


@dataclass(frozen=True)
class LayerSpec:
    backbone: str
    name: str
    kind: str  # "conv" | "linear"
    in_shape: tuple[int, ...]  # one sample, batch excluded
    out_features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    bias: bool = False

    def build(self) -> nn.Module:
        if self.kind == "conv":
            return nn.Conv2d(self.in_shape[0], self.out_features, self.kernel, self.stride, self.padding,
                             groups=self.groups, bias=self.bias)
        return nn.Linear(self.in_shape[-1], self.out_features, bias=self.bias)

    @property
    def label(self) -> str:
        return f"{self.backbone}:{self.name}"


LAYER_TABLE: tuple[LayerSpec, ...] = (
    LayerSpec("mcunet-in3", "blocks.17.mobile_inverted_conv.inverted_bottleneck.conv", "conv", (96, 6, 6), 480),
    LayerSpec("mcunet-in3", "blocks.17.mobile_inverted_conv.depth_conv.conv", "conv", (480, 6, 6), 480,
              kernel=7, padding=3, groups=480),
    LayerSpec("mcunet-in3", "blocks.17.mobile_inverted_conv.point_linear.conv", "conv", (480, 6, 6), 160),
    LayerSpec("mcunet-in3", "classifier.linear", "linear", (160,), 1000, bias=True),
    LayerSpec("mobilenet_v2", "features.17.conv.1.0", "conv", (960, 7, 7), 960, kernel=3, padding=1, groups=960),
    LayerSpec("mobilenet_v2", "features.17.conv.2", "conv", (960, 7, 7), 320),
    LayerSpec("mobilenet_v2", "features.18.0", "conv", (320, 7, 7), 1280),
    LayerSpec("mobilenet_v2", "classifier.1", "linear", (1280,), 1000, bias=True),
    LayerSpec("resnet18", "layer4.0.downsample.0", "conv", (256, 14, 14), 512, stride=2),
    LayerSpec("resnet18", "layer4.1.conv1", "conv", (512, 7, 7), 512, kernel=3, padding=1),
    LayerSpec("resnet18", "layer4.1.conv2", "conv", (512, 7, 7), 512, kernel=3, padding=1),
    LayerSpec("resnet18", "fc", "linear", (512,), 1000, bias=True),
)

METHOD_ORDER = ("vanilla", "gradient_filter", "hosvd", "asi", "lance")


def synthetic_activation(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Post-ReLU activations with a decaying spectrum along every mode: ``shape`` = (B, …)."""
    x = torch.randn(shape, generator=generator)
    for mode in range(x.dim()):
        d = shape[mode]
        decay = 1.0 / (1.0 + torch.arange(d, dtype=torch.float32)) ** 0.9
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        mix = q * decay  # (d, d): columns scaled by a decaying spectrum
        x = torch.movedim(torch.tensordot(x, mix, dims=([mode], [1])), -1, mode)
    x = x / x.std()
    return torch.relu(x + 0.5).contiguous()


def _options(method: str, full_rank: bool, shape: tuple[int, ...]) -> dict:
    if method == "hosvd":
        return {"eps": 1.0 if full_rank else 0.8}
    if method == "asi":
        return {"ranks": tuple(shape)} if full_rank else {}
    if method == "lance":
        return {"ranks": tuple(shape)} if full_rank else {"ranks": _default_ranks(shape)}
    return {}


def _default_ranks(shape):
    return default_asi_ranks(shape, "conv" if len(shape) == 4 else "linear")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_inputs(spec: LayerSpec, batch_size: int, seed: int, device: torch.device):
    """Synthetic ``(x, grad_output, calibration batch)`` for a table row (seeded, built on CPU, moved)."""
    generator = torch.Generator().manual_seed(seed)
    base = spec.build()
    x = synthetic_activation((batch_size,) + spec.in_shape, generator)
    with torch.no_grad():
        out_shape = base(x[:1]).shape[1:]
    grad_output = torch.randn((batch_size,) + tuple(out_shape), generator=generator) / math.sqrt(batch_size)
    return base.to(device), x.to(device), grad_output.to(device), x.to(device)


def bench_layer(spec, batch_size: int = 128, repeats: int = 5, full_rank: bool = False,
                methods=METHOD_ORDER, seed: int = 0, device: str | torch.device = "cpu",
                inputs=None) -> list[dict]:
    """Time, measure and check every method on one layer; one result dict per method.

    ``inputs`` (optional): ``(module, x (B, …), grad_output (B, …), calibration x)`` — the real layers'
    captured tensors (:mod:`engine.bench.real`); default: a synthetic row of ``LAYER_TABLE``.
    Each row carries ``time_ratio_vs_vanilla`` and ``flops_ratio_vs_vanilla`` (the FLOP model's
    prediction: forward + input grad + weight grad + compression work), and ``time_over_flops`` (their
    quotient: ≫ 1 flags a layer slower than its arithmetic says).
    """
    device = torch.device(device)
    base, x, grad_output, calibration_x = inputs if inputs is not None else layer_inputs(spec, batch_size, seed, device)

    models, handles = {}, {}
    for method in methods:
        model = nn.Sequential(copy.deepcopy(base))
        options = _options(method, full_rank, tuple(x.shape))
        calibration = [calibration_x] if method == "lance" else None
        handles[method] = compress_model(model, method, layers=["0"], options=options,
                                         calibration_loader=calibration, calibration_batches=1, seed=seed)
        models[method] = model

    def step(method):
        model = models[method]
        model.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        with SavedBytesMeter(model) as meter:
            out = model(inp)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad_output)
        _sync(device)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, meter

    times = {m: ([], []) for m in methods}
    meters = {}
    for method in methods:  # warm-up (ASI's cold start, allocator) and one measured pass for bytes
        step(method)
    for _ in range(repeats):
        for method in methods:
            fwd, bwd, meter = step(method)
            times[method][0].append(fwd)
            times[method][1].append(bwd)
            meters[method] = meter
    exact = models["vanilla"][0].weight.grad.detach().clone() if "vanilla" in methods else None
    if exact is None:
        reference = copy.deepcopy(base)
        reference(x).backward(grad_output)
        exact = reference.weight.grad

    results = []
    for method in methods:
        layer = handles[method].layers["0"]
        stats = layer.last_stats
        grad = models[method][0].weight.grad
        fwd_ms = statistics.median(times[method][0])
        bwd_ms = statistics.median(times[method][1])
        results.append({
            "layer": spec.label,
            "shape": list(x.shape),
            "method": method,
            "ranks": stats.get("ranks"),
            "fwd_ms": round(fwd_ms, 3),
            "bwd_ms": round(bwd_ms, 3),
            "step_ms": round(fwd_ms + bwd_ms, 3),
            "saved_bytes": int(meters[method].layer_activation_bytes),
            "analytic_bytes": int(stats.get("analytic_bytes", 0)),
            "flops": int(sum(stats.get("flops", {}).values())),
            "grad_rel_error": float((grad - exact).norm() / exact.norm()),
        })
    vanilla = next((r for r in results if r["method"] == "vanilla"), None)
    for r in results:
        if vanilla is not None:
            r["time_ratio_vs_vanilla"] = round(r["step_ms"] / vanilla["step_ms"], 4)
            r["flops_ratio_vs_vanilla"] = round(r["flops"] / vanilla["flops"], 4)
            r["time_over_flops"] = round(r["time_ratio_vs_vanilla"] / max(r["flops_ratio_vs_vanilla"], 1e-9), 3)
    return results


def run(batch_size: int = 128, repeats: int = 5, full_rank: bool = False, methods=METHOD_ORDER,
        layers=LAYER_TABLE, progress=None, device: str | torch.device = "cpu", layer_inputs_fn=None) -> dict:
    """The whole table: ``{"results": [...], "summary": {method: {...ratios...}}, "config": {...}}``.

    ``layer_inputs_fn(spec, batch_size)`` (optional) gives a row's ``(module, x, grad_output, calibration x)``
    (the real layers); default: synthetic inputs for ``LAYER_TABLE``.
    """
    results = []
    for spec in layers:
        inputs = layer_inputs_fn(spec, batch_size) if layer_inputs_fn is not None else None
        rows = bench_layer(spec, batch_size, repeats, full_rank, methods, device=device, inputs=inputs)
        results.extend(rows)
        if progress is not None:
            progress(spec, rows)
    return {
        "config": {"batch_size": batch_size, "repeats": repeats, "full_rank": full_rank, "device": str(device),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": cpu_model(), "matmul": route_name()},
        "results": results,
        "summary": summarize(results, methods),
    }


def summarize(results: list[dict], methods) -> dict:
    """Per method: sums over the layers and their ratios to vanilla's sums, plus the worst layer's time ratio."""
    summary = {}
    totals = {m: {k: sum(r[k] for r in results if r["method"] == m) for k in
                  ("fwd_ms", "bwd_ms", "step_ms", "saved_bytes", "analytic_bytes", "flops")} for m in methods}
    base = totals.get("vanilla")
    for method in methods:
        t = totals[method]
        rows = [r for r in results if r["method"] == method]
        worst = max(rows, key=lambda r: r.get("time_ratio_vs_vanilla", 0.0))
        summary[method] = {
            "step_ms": round(t["step_ms"], 3),
            "saved_bytes": t["saved_bytes"],
            "step_ratio_vs_vanilla": round(t["step_ms"] / base["step_ms"], 4) if base else None,
            "memory_ratio_vs_vanilla": round(t["saved_bytes"] / base["saved_bytes"], 6) if base else None,
            "flops_ratio_vs_vanilla": round(t["flops"] / base["flops"], 4) if base else None,
            "max_layer_time_ratio": worst.get("time_ratio_vs_vanilla"),
            "max_layer": worst["layer"],
            "max_grad_rel_error": max(r["grad_rel_error"] for r in rows),
        }
    return summary


def run_batch_sizes(batch_sizes, repeats: int = 5, full_rank: bool = False, methods=METHOD_ORDER,
                    layers=LAYER_TABLE, progress=None, device: str | torch.device = "cpu",
                    layer_inputs_fn=None) -> dict:
    """:func:`run` once per batch size: ``{"config": {...}, "by_batch_size": {"32": report, …}}``."""
    reports = {}
    for batch_size in batch_sizes:
        reports[str(batch_size)] = run(batch_size, repeats, full_rank, methods, layers, progress, device,
                                       layer_inputs_fn)
    return {
        "config": {"batch_sizes": list(batch_sizes), "repeats": repeats, "full_rank": full_rank,
                   "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu": cpu_model(), "matmul": route_name(),
                   "inputs": "synthetic" if layer_inputs_fn is None else "real"},
        "by_batch_size": reports,
    }
