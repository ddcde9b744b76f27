"""A vanilla trained suffix (last 4 layers) step, NCHW against channels_last, per backbone (1 thread, batch 64).

    python3 docs/bench/suffix_layout.py [--repeats 7] [--json docs/bench/suffix_layout.json]

Random weights and random prefix features (the layout question does not depend on them): each backbone's last
4 compressible layers are compressed with ``vanilla`` (what ``lance finetune`` trains), the suffix and its input
are put in each layout, and one forward + cross-entropy backward is timed, interleaved; medians in ms. This is the
measurement behind ``engine.train.data.CHANNELS_LAST_METHODS`` being empty.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.malloc import tune_malloc
from engine.models import build_backbone, split_at_stage, stage_of_layer
from engine.surgery import compress_model, compressible_layers

BACKBONES = ("mcunet-in3", "mobilenet_v2", "resnet18")
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def suffix_steps(name: str, batch: int) -> tuple[tuple[int, ...], dict]:
    """(prefix feature shape, {layout: one-step callable}) for backbone ``name``."""
    torch.manual_seed(0)
    bb = build_backbone(name, weights="none", num_classes=10)
    model = bb.model.eval()
    layers = compressible_layers(model)[-4:]
    cut = stage_of_layer(model, layers[0])
    prefix, _ = split_at_stage(model, cut)
    with torch.no_grad():
        features = prefix(torch.randn(batch, 3, bb.resolution, bb.resolution))
    labels = torch.randint(0, 10, (batch,))
    steps = {}
    for layout, fmt in FORMATS.items():
        m = copy.deepcopy(model)
        _, suffix = split_at_stage(m, cut)
        compress_model(m, "vanilla", layers=layers).train_mode()
        suffix.to(memory_format=fmt)
        x = features.contiguous(memory_format=fmt)

        def step(m=m, suffix=suffix, x=x):
            m.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(suffix(x), labels).backward()

        steps[layout] = step
    return tuple(features.shape), steps


def main() -> None:
    parser = bench_parser(__doc__, 7)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_malloc()
    rows = {}
    for name in BACKBONES:
        shape, steps = suffix_steps(name, args.batch)
        ms = interleaved_ms(steps, args.repeats)
        rows[name] = {"features": list(shape), "step_ms": ms,
                      "channels_last_speedup": round(ms["nchw"] / ms["channels_last"], 3)}
    emit_json({"threads": 1, "batch": args.batch, "repeats": args.repeats, "backbones": rows}, args.json)


if __name__ == "__main__":
    main()
