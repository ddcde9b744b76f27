"""NCHW against channels_last for the trained suffix, per method, on real cached features.

    python3 -m engine.bench.formats --limit 256 --threads 1 --repeats 3 --json docs/bench/formats_mcunet_in3.json

MCUNet-in3 (ImageNet weights, 10-class head, 176 px): the frozen prefix runs once over ``--limit``
real CIFAR-10 training images (from ``../shared`` or ``$LANCE_SHARED``); then for every method the
last ``--layers`` layers are compressed (``engine.compress_model``, packing on, as ``lance finetune``
does) and one epoch of SGD steps (batch ``--batch-size``) is timed in each memory format, formats
interleaved repeat by repeat, each from the same weights and seed. Per method: the median epoch
seconds per format, their ratio, and the largest difference between the two formats' per-step losses
and trained weights (float32 rounding only: the formats compute the same numbers).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

from engine.bench.real import missing_reason, shared_root
from engine.data import get_dataset
from engine.data.feature_cache import cached_features, feature_key
from engine.models import build_backbone, split_at_stage, stage_of_layer
from engine.surgery import compress_model, compressible_layers

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _epoch(suffix: nn.Module, handle, params, feats, labels, batch_size: int, fmt, seed: int):
    """(seconds, per-step losses (S,), trained weights): one epoch of SGD in memory format ``fmt``."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    handle.train_mode()
    losses = []
    start = time.perf_counter()
    for i in range(0, len(labels), batch_size):
        x = feats[i:i + batch_size].contiguous(memory_format=fmt)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(suffix(x), labels[i:i + batch_size])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return time.perf_counter() - start, torch.stack(losses), [p.detach().clone().contiguous() for p in params]


def compare_method(model: nn.Module, cut: int, layers: list[str], method: str, feats, labels, batch_size: int,
                   repeats: int) -> dict:
    times = {k: [] for k in FORMATS}
    outcome = {}
    for _ in range(repeats):
        for name, fmt in FORMATS.items():
            m = copy.deepcopy(model)
            _, suffix = split_at_stage(m, cut)
            calib = [feats[i:i + batch_size] for i in range(0, min(len(labels), 4 * batch_size), batch_size)]
            kwargs = {}
            if method == "lance":
                kwargs = {"calibration_loader": calib, "calibration_forward": lambda _m, b, s=suffix: s(b)}
            handle = compress_model(m, method, layers=layers, seed=0, **kwargs)
            suffix.to(memory_format=fmt)
            params = [p for p in m.parameters() if p.requires_grad]
            seconds, losses, weights = _epoch(suffix, handle, params, feats, labels, batch_size, fmt, seed=0)
            times[name].append(seconds)
            outcome[name] = (losses, weights)
    (la, wa), (lb, wb) = outcome["nchw"], outcome["channels_last"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"epoch_s": {k: round(v, 4) for k, v in med.items()},
            "channels_last_speedup": round(med["nchw"] / med["channels_last"], 2),
            "loss_max_abs_diff": float((la - lb).abs().max()),
            "weight_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(wa, wb)),
            "allclose": bool(torch.allclose(la, lb, rtol=1e-4, atol=1e-5)
                             and all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(wa, wb)))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="vanilla,gradient_filter,hosvd,asi,lance")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = shared_root()
    reason = missing_reason(root)
    if reason:
        print(f"skipped: {reason}", file=sys.stderr)
        return 0
    torch.manual_seed(0)
    bb = build_backbone("mcunet-in3", weights="imagenet", num_classes=10, weights_dir=root / "weights")
    full = get_dataset("cifar10-jpeg", "train", bb.resolution, bb.mean, bb.std, data_root=str(root / "datasets"))
    data = full.subset(np.sort(np.random.default_rng(0).choice(len(full), args.limit, replace=False)))
    model = bb.model.eval()
    layers = compressible_layers(model)[-args.layers:]
    cut = stage_of_layer(model, layers[0])
    prefix, _ = split_at_stage(model, cut)
    feats_ds = cached_features(prefix, data, feature_key("mcunet-in3", bb.weights, "cifar10-jpeg", "train",
                                                         bb.resolution, cut, limit=args.limit))
    feats, labels = feats_ds.batch(np.arange(len(feats_ds)))
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        results[method] = compare_method(model, cut, layers, method, feats, labels, args.batch_size, args.repeats)
        print(method, json.dumps(results[method]), flush=True)
    out = {"command": "python3 -m engine.bench.formats " + " ".join(argv if argv is not None else sys.argv[1:]),
           "backbone": "mcunet-in3", "layers": layers, "feature_shape": list(feats.shape[1:]),
           "images": args.limit, "batch_size": args.batch_size, "threads": args.threads,
           "load_average": os.getloadavg()[0], "methods": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
