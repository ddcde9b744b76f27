"""Markdown table of a fine-tuning sweep's JSON (`lance sweep --json`), with per-seed paired deltas.

    python3 docs/bench/sweep_table.py docs/bench/sweep_mcunet_cifar10_10k.json

Each seed draws its own training subset, so the seed-to-seed spread mixes data and initialisation;
the paired delta (method minus vanilla of the same seed, mean ± sample sd over seeds) removes it.
"""
from __future__ import annotations

import json
import statistics
import sys


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.2f} ± {sd:.2f}"


def table(path: str) -> str:
    data = json.load(open(path))
    configs = data["configurations"]
    vanilla = next(c for c in configs if c["method"] == "vanilla")
    base_acc = dict(zip(vanilla["seeds"], vanilla["metrics"]["accuracy"]["values"]))
    base_bytes = vanilla["metrics"]["peak_layer_activation_bytes"]["mean"]
    lines = ["| configuration | seeds | test acc % (mean ± sd) | per seed | Δ vs vanilla, paired by seed | "
             "layer bytes (measured, mean) | × below vanilla | region bytes | step ms | FLOPs/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        m = c["metrics"]
        acc = m["accuracy"]
        deltas = [a - base_acc[s] for s, a in zip(c["seeds"], acc["values"])]
        layer = m["peak_layer_activation_bytes"]["mean"]
        lines.append(
            f"| {c['label']} | {acc['n']} | {acc['mean']:.2f} ± {acc['std']:.2f} | "
            f"{' · '.join(f'{v:.1f}' for v in acc['values'])} | {_fmt(deltas)} | {layer / 1e3:,.1f} kB | "
            f"{base_bytes / layer:.1f}× | {m['peak_region_activation_bytes']['mean'] / 1e6:.2f} MB | "
            f"{m['step_ms']['mean']:.0f} | {m['flops']['mean'] / 1e9:.2f} G |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
