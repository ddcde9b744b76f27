"""The Tucker compression's fast routes against the plain ones, 1 thread, interleaved medians (ms).

    python3 docs/bench/tucker_routes.py [--repeats 15] [--json docs/bench/tucker_routes.json]

- ``batch_factor``: the randomized range finder (its n×k Gaussian draw and three passes) against the exact
  ``B×B`` Gram and its eigenvectors, on ``(B, n)`` unfoldings of the benchmark layers' activations, r = 8;
- ``pair_product``: both spatial modes of a small map in one Kronecker product against two mode products;
- ``pair_gram``: the joint spatial Gram (which gives both mode Grams) against one mode Gram;
- ``depthwise_lift``: a depthwise conv's weight-gradient lift of the core (channels first against spatial first);
- ``tall_product``: ``(53760, 7) @ (7, 4)`` (a mode product onto a 7-wide spatial mode) on MKL's ``mm`` and on
  oneDNN (``engine.matmul`` now routes tall products there whatever their size).
Each row also gives the largest difference between the two results (or subspaces), to show they agree.
"""
from __future__ import annotations

import torch

from engine import tensor_ops as T
from engine.bench.output import bench_parser, emit_json
from engine.bench.timing import pair_ms
from engine.malloc import tune_malloc
from engine.matmul import mm
from engine.methods import base


def _range_finder(m: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    omega = torch.randn(m.shape[1], rank, generator=generator)
    q = T.orth(mm(m, omega))
    return T.orth(mm(m, mm(m.T, q)))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


def _pair_rows(x: torch.Tensor, u_h: torch.Tensor, u_w: torch.Tensor, repeats: int) -> list[dict]:
    def sequential():
        return T.mode_product(T.mode_product(x, u_h, 2), u_w, 3)

    def paired():
        return T.pair_product(x, u_h, u_w)

    plain, fast = pair_ms(sequential, paired, repeats)
    rows = [{"route": "pair_product", "shape": list(x.shape), "plain_ms": plain, "fast_ms": fast,
             "max_abs_diff": float((sequential() - paired()).abs().max())}]
    plain, fast = pair_ms(lambda: T.mode_gram(x, 2), lambda: T.pair_gram(x), repeats)
    rows.append({"route": "pair_gram (both mode Grams) vs mode_gram (one)", "shape": list(x.shape),
                 "plain_ms": plain, "fast_ms": fast})
    return rows


def main() -> None:
    parser = bench_parser(__doc__, 15)
    args = parser.parse_args()
    tune_malloc()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch, n in ((16, 47040), (32, 47040), (64, 47040), (128, 47040), (32, 17280), (128, 5760)):
        m = torch.randn(batch, n).relu()
        plain, fast = pair_ms(lambda m=m: _range_finder(m, 8, generator),
                              lambda m=m: base.batch_factor(m, 8, oversample=0)[0], args.repeats)
        gap = _gap(_range_finder(m, 8, generator), torch.linalg.svd(m, full_matrices=False)[0][:, :8])
        rows.append({"route": "batch_factor", "shape": [batch, n], "plain_ms": plain, "fast_ms": fast,
                     "range_finder_subspace_gap_to_svd": round(gap, 4),
                     "gram_subspace_gap_to_svd": round(_gap(base.batch_factor(m, 8, oversample=0)[0],
                                                            torch.linalg.svd(m, full_matrices=False)[0][:, :8]), 6)})
    for shape, (r_h, r_w) in (((8, 960, 7, 7), (4, 4)), ((32, 480, 6, 6), (3, 3)), ((128, 960, 7, 7), (4, 4))):
        rows += _pair_rows(torch.randn(shape).relu(), T.orth(torch.randn(shape[2], r_h)),
                           T.orth(torch.randn(shape[3], r_w)), args.repeats)
    core = torch.randn(8, 120, 4, 4)
    u_c, u_h, u_w = T.orth(torch.randn(960, 120)), T.orth(torch.randn(9, 4)), T.orth(torch.randn(9, 4))
    spatial_first = lambda: T.mode_expand(T.mode_expand(T.mode_expand(core, u_h, 2), u_w, 3), u_c, 1)  # noqa: E731
    channels_first = lambda: T.mode_expand(T.mode_expand(T.mode_expand(core, u_c, 1), u_h, 2), u_w, 3)  # noqa: E731
    plain, fast = pair_ms(spatial_first, channels_first, args.repeats)
    rows.append({"route": "depthwise_lift (spatial first vs channels first)", "shape": [8, 120, 4, 4],
                 "plain_ms": plain, "fast_ms": fast,
                 "max_abs_diff": float((spatial_first() - channels_first()).abs().max())})
    a, b = torch.randn(53760, 7), torch.randn(7, 4)
    plain, fast = pair_ms(lambda: a @ b, lambda: mm(a, b), args.repeats)
    rows.append({"route": "tall_product (mm vs engine.matmul.mm)", "shape": [53760, 7, 4], "plain_ms": plain,
                 "fast_ms": fast, "max_abs_diff": float((a @ b - mm(a, b)).abs().max())})
    for row in rows:
        print(f"{row['route']:50s} {str(row['shape']):18s} plain {row['plain_ms']:8.3f} ms  "
              f"fast {row['fast_ms']:8.3f} ms")
    emit_json({"config": {"threads": 1, "repeats": args.repeats, "torch": torch.__version__}, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
