"""Epoch time of last-k fine-tuning with and without the frozen-prefix feature cache.

    python3 -m engine.data.cache_bench --backbone mcunet-in3 --dataset cifar10-jpeg \
        --data-root ../shared/datasets --weights-dir ../shared/weights --layers 4 --limit 2000

Trains the last ``--layers`` Conv2d/Linear layers (plain SGD, every BatchNorm in eval mode, the rest
frozen) for one epoch over ``--limit`` training images (seeded subset) on the whole images, then
builds the cache (timed separately: it is one forward pass of the prefix) and trains one epoch from
the cached features. Prints per-epoch times, per-image times and the extrapolation to the full
training split; ``--json FILE`` writes them.
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

from engine.data import get_dataset, num_classes
from engine.data.feature_cache import cached_features, feature_key
from engine.models import build_backbone, split_at_stage, stage_of_layer
from engine.surgery import compressible_layers


def _layer_names(model: nn.Module) -> list[str]:
    return list(compressible_layers(model))


def _epoch(step_inputs, model_fn, params, batches, losses: list | None = None) -> float:
    """Seconds for one epoch of SGD steps; ``step_inputs(positions) -> (input, y)``; each step's loss
    is appended to ``losses`` when given."""
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for positions in batches:
        inputs, y = step_inputs(positions)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model_fn(inputs), y)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(loss.detach())
    return time.perf_counter() - start


def _formatted(fetch, fmt):
    def fetch_formatted(positions):
        x, y = fetch(positions)
        return (x.contiguous(memory_format=fmt) if x.dim() == 4 else x), y
    return fetch_formatted


def compare_formats(suffix: nn.Module, params: list, fetch, batches, repeats: int) -> dict:
    """Cached epochs of ``suffix`` in NCHW and channels_last, interleaved, each from the same weights.

    Returns the median seconds per format, their ratio, and how far the two formats' per-step losses
    and final trained weights are apart (max abs difference; they agree to float32 rounding).
    """
    initial = copy.deepcopy(suffix.state_dict())
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    times: dict[str, list[float]] = {k: [] for k in formats}
    outcome: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, fmt in formats.items():
            suffix.load_state_dict(initial)
            suffix.to(memory_format=fmt)
            losses: list = []
            times[name].append(_epoch(_formatted(fetch, fmt), suffix, params, batches, losses))
            outcome[name] = (torch.stack(losses), [p.detach().clone().contiguous() for p in params])
    suffix.load_state_dict(initial)
    (loss_a, w_a), (loss_b, w_b) = outcome["nchw"], outcome["channels_last"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"cached_epoch_s": {k: round(v, 3) for k, v in med.items()},
            "channels_last_speedup": round(med["nchw"] / med["channels_last"], 2),
            "loss_max_abs_diff": float((loss_a - loss_b).abs().max()),
            "weight_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(w_a, w_b)),
            "weights_allclose": all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(w_a, w_b))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mcunet-in3")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--resolution", type=int, default=None, help="default: the backbone's native resolution")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--limit", type=int, default=2000, help="training images used (0: the whole split)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true",
                        help="run the model and its inputs in channels_last memory format")
    parser.add_argument("--compare-formats", action="store_true",
                        help="time the cached epoch in both memory formats in this process (interleaved, "
                             "--repeats times each, same initial weights) and check their losses agree")
    parser.add_argument("--repeats", type=int, default=1, help="cached epochs per format with --compare-formats")
    parser.add_argument("--no-uncached", action="store_true", help="skip the (slow) epoch on whole images")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)


    classes = num_classes(args.dataset, args.data_root)
    torch.manual_seed(0)
    bb = build_backbone(args.backbone, weights=args.weights, num_classes=classes, weights_dir=args.weights_dir)
    resolution = args.resolution or bb.resolution
    full = get_dataset(args.dataset, "train", resolution, bb.mean, bb.std, data_root=args.data_root)
    n = len(full) if not args.limit else min(args.limit, len(full))
    data = full.subset(np.sort(np.random.default_rng(0).choice(len(full), n, replace=False)))
    model = bb.model
    trained = _layer_names(model)[-args.layers:]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trained:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # BN statistics frozen, as compress_model keeps them
    cut = stage_of_layer(model, trained[0])
    prefix, suffix = split_at_stage(model, cut)
    batches = [range(s, min(n, s + args.batch_size)) for s in range(0, n, args.batch_size)]

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    uncached_s = None if args.no_uncached else _epoch(_formatted(data.batch, fmt), model, params, batches)
    start = time.perf_counter()
    feats = cached_features(prefix, data, feature_key(args.backbone, bb.weights, args.dataset, "train", resolution,
                                                      cut, limit=n), batch_size=128,
                            channels_last=args.channels_last or args.compare_formats)
    build_s = time.perf_counter() - start
    comparison = None
    if args.compare_formats:
        comparison = compare_formats(suffix, params, feats.batch, batches, args.repeats)
        cached_s = comparison["cached_epoch_s"]["channels_last" if args.channels_last else "nchw"]
    else:
        cached_s = _epoch(_formatted(feats.batch, fmt), suffix, params, batches)
    scale = len(full) / n
    result = {
        "command": "python3 -m engine.data.cache_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "backbone": args.backbone, "dataset": args.dataset, "resolution": resolution, "layers": trained,
        "cut_stage": suffix.names[0], "feature_shape": list(feats.feature_shape), "images": n,
        "full_split_images": len(full), "batch_size": args.batch_size, "threads": args.threads,
        "channels_last": bool(args.channels_last),
        "load_average": os.getloadavg()[0],
        "uncached_epoch_s": None if uncached_s is None else round(uncached_s, 2), "cache_build_s": round(build_s, 2),
        "cached_epoch_s": round(cached_s, 3),
        "cached_ms_per_image": round(1000 * cached_s / n, 4),
        "full_split_cached_epoch_s_extrapolated": round(cached_s * scale, 1),
        "full_split_cache_bytes": int(np.prod(feats.feature_shape)) * 4 * len(full),
    }
    if uncached_s is not None:
        result.update({"uncached_ms_per_image": round(1000 * uncached_s / n, 3),
                       "speedup": round(uncached_s / cached_s, 1),
                       "full_split_uncached_epoch_s_extrapolated": round(uncached_s * scale, 1)})
    if comparison is not None:
        comparison["full_split_cached_epoch_s_extrapolated"] = {
            k: round(v * scale, 1) for k, v in comparison["cached_epoch_s"].items()}
        result["formats"] = comparison
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
