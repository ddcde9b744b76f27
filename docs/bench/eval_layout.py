"""Evaluation forward of the continual nets (test batch 256, 32 px, 1 thread): NCHW against channels_last.

    python3 docs/bench/eval_layout.py [--repeats 9] [--json docs/bench/eval_layout.json]

Each net is the learner's packed LANCE model in eval mode (what ``ContinualLearner.evaluate`` runs), fed the
same random batch in both layouts, interleaved; medians. ``max_logit_diff``: the largest difference of the two
layouts' logits (float rounding: different summation orders).
"""
from __future__ import annotations

import torch

from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import interleaved_ms
from engine.continual.learner import ContinualConfig, ContinualLearner, eval_layout
from engine.malloc import tune_malloc
from engine.models.cl_nets import build_multihead
from engine.packing import pack_region


def main() -> None:
    parser = bench_parser(__doc__, 9)
    parser.add_argument("--nets", default="alexnet-cl,resnet18-reduced")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tune_malloc()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    out = {"batch": args.batch, "threads": 1, "repeats": args.repeats, "nets": {}}
    for net in args.nets.split(","):
        learner = ContinualLearner(build_multihead(net, [2] * 5, 32, seed=0), ContinualConfig(method="lance"))
        pack_region(learner.model)
        model = learner.model.eval()
        inputs = {"nchw": x, "channels_last": eval_layout(x)}
        with torch.no_grad():
            diff = float((model(inputs["nchw"], 0) - model(inputs["channels_last"], 0)).abs().max())
            calls = {k: (lambda inp=inp, model=model: model(inp, 0)) for k, inp in inputs.items()}
            ms = interleaved_ms(calls, args.repeats)
        ms = {k: round(v, 1) for k, v in ms.items()}
        out["nets"][net] = {"forward_ms": ms, "ratio": round(ms["channels_last"] / ms["nchw"], 3),
                            "max_logit_diff": diff}
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
