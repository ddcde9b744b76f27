"""Where one training step's time goes on a GPU: wall time, kernels launched, device-busy time, top host ops.

    python3 docs/bench/gpu_profile.py --device cuda --batch-sizes 128,1024 --json docs/bench/gpu_profile.json

For a few rows of ``engine.bench.layers.LAYER_TABLE`` and every method: the median wall time of a step
(forward + backward, synchronized, no byte meter), and from one step under ``torch.profiler``: the number of
device kernels, the sum of their durations (``device_busy_ms``: what the GPU computed), the host-to-device
synchronizations (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaMemcpy`` calls, which a
QR or an eigh on the GPU makes) and the five ops with the most self host time. ``device_busy_ms`` far below
``step_ms`` means the step is bound by launches and host work, not by arithmetic. Runs on the CPU too
(no device kernels then), for a dry run.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from engine.bench.layers import LAYER_TABLE, METHOD_ORDER, _options, layer_inputs
from engine.bench.output import bench_parser, emit_json
from engine.surgery import compress_model

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
              "cudaEventSynchronize")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_layer(spec, batch_size: int, repeats: int, device: torch.device, methods) -> list[dict]:
    base, x, grad_output, calibration_x = layer_inputs(spec, batch_size, 0, device)
    models = {}
    for method in methods:
        model = nn.Sequential(copy.deepcopy(base))
        compress_model(model, method, layers=["0"], options=_options(method, False, tuple(x.shape)),
                       calibration_loader=[calibration_x] if method == "lance" else None, calibration_batches=1,
                       seed=0)
        models[method] = model

    def step(method):
        model = models[method]
        model.zero_grad(set_to_none=True)
        model(x.detach().requires_grad_(True)).backward(grad_output)

    walls = {m: [] for m in methods}
    for method in methods:
        step(method)
        step(method)
    for _ in range(repeats):
        for method in methods:
            _sync(device)
            t0 = time.perf_counter()
            step(method)
            _sync(device)
            walls[method].append((time.perf_counter() - t0) * 1e3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for method in methods:
        with profile(activities=activities) as prof:
            step(method)
            _sync(device)
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        host = prof.key_averages()
        top = sorted(host, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
        rows.append({
            "layer": spec.label, "batch_size": batch_size, "method": method,
            "step_ms": round(statistics.median(walls[method]), 3),
            "kernels": len(kernels),
            "device_busy_ms": round(sum(e.device_time for e in kernels) / 1e3, 3),
            "host_syncs": int(sum(e.count for e in host if e.key in SYNC_CALLS)),
            "top_host_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
                             for e in top],
        })
    return rows


def main() -> None:
    parser = bench_parser(__doc__, repeats=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="128,1024")
    parser.add_argument("--layers", default="0,4,9", help="rows of LAYER_TABLE (default: MCUNet 1x1 conv, "
                        "MobileNetV2 3x3 depthwise, ResNet-18 3x3 conv)")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    args = parser.parse_args()
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    for index in [int(i) for i in args.layers.split(",")]:
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            rows.extend(profile_layer(LAYER_TABLE[index], batch_size, args.repeats, device, methods))
    for r in rows:
        print(f"{r['layer'][-36:]:36s} B={r['batch_size']:5d} {r['method']:16s} step {r['step_ms']:8.3f} ms  "
              f"kernels {r['kernels']:4d}  device busy {r['device_busy_ms']:8.3f} ms  syncs {r['host_syncs']}")
    config = {"device": str(device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    emit_json({"config": config, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
