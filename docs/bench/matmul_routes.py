"""CPU float32 products ``a (M, K) @ b (K, N)``: PyTorch's ``mm`` (MKL here) against oneDNN's inner product
(``engine.matmul``), both operand layouts, 1 thread, interleaved medians.

    python3 docs/bench/matmul_routes.py [--repeats 15] [--json docs/bench/matmul_routes.json]

``b`` is a transposed view of a row-major (N, K) matrix (a linear layer's forward, ``Gᵀ X``) or a row-major
(K, N) matrix (a linear layer's input gradient ``G W``); ``route`` is what ``engine.matmul.mm`` picks.
"""
from __future__ import annotations

import torch

from engine import matmul
from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import pair_ms

SHAPES = [(1, 2048, 2048), (8, 512, 512), (8, 2048, 2048), (16, 960, 160), (32, 256, 256), (64, 64, 64),
          (64, 1024, 2048), (64, 2048, 2048), (64, 2048, 2), (128, 960, 160), (256, 2048, 2048)]


def main() -> None:
    parser = bench_parser(__doc__, 15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        a = torch.randn(m, k)
        for layout, b in (("b = Wᵀ view", torch.randn(n, k).t()), ("b row-major", torch.randn(k, n))):
            def mm_fn(a=a, b=b):
                return a @ b

            def onednn_fn(a=a, b=b):
                return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")

            mm_ms, onednn_ms = pair_ms(mm_fn, onednn_fn, args.repeats)
            med = {"mm_ms": mm_ms, "onednn_ms": onednn_ms}
            err = (onednn_fn() - a @ b).abs().max().item() / max(1e-30, (a @ b).abs().max().item())
            rows.append({"m": m, "k": k, "n": n, "layout": layout, **med,
                         "onednn_over_mm": round(med["onednn_ms"] / med["mm_ms"], 3),
                         "route": "onednn" if matmul.uses_onednn(a, b) else "mm", "max_rel_diff": float(f"{err:.2e}")})
    emit_json({"threads": 1, "repeats": args.repeats, "cpu": matmul.cpu_model(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
