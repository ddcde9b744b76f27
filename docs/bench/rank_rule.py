"""The one rank rule, before and after: LANCE's training ranks vs `lance calibrate`'s on the same batches.

MCUNet-in3 (ImageNet weights from ../shared), its last 4 compressible layers, 3 seeded CIFAR-10 JPEG
training batches (first 20 images per class), ε 0.8. "now": both code paths as they are
(`engine.methods.calibration.calibrate_layers` → `GramAccumulator.ranks_at`, and
`engine.calibration.calibrate_model`). "before": the two batch-mode rules the code had until the rule
was shared, re-implemented here on the same per-batch spectra — LANCE training took the ceiling of the
mean per-batch rank, `lance calibrate` the rank of the mean normalised spectrum (the other modes were
already the same). Usage: ``PYTHONPATH=. python3 docs/bench/rank_rule.py [BATCH_SIZE=32] [RESOLUTION=160]``;
prints JSON (docs/bench/rank_rule.json is ``32 160``).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from engine.calibration.pipeline import calibrate_model, calibration_batches
from engine.data import get_dataset
from engine.methods.calibration import calibrate_layers
from engine.models import build_backbone
from engine.spectra import eigh_descending, rank_for_energy
from engine.surgery import compressible_layers

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EPS = 0.8


def _old_batch_ranks(batch_inputs: list[torch.Tensor], eps: float) -> tuple[int, int]:
    """(old LANCE training rule, old `lance calibrate` rule) for the batch mode."""
    spectra = []
    for x in batch_inputs:
        flat = x.double().reshape(x.shape[0], -1)
        spectra.append(eigh_descending(flat @ flat.T)[0].numpy())
    per_batch = [rank_for_energy(s, eps) for s in spectra]
    lance = max(1, math.ceil(sum(per_batch) / len(per_batch)))
    width = max(s.size for s in spectra)
    mean_energy = np.mean([np.pad(s / s.sum(), (0, width - s.size)) for s in spectra], axis=0)
    return lance, rank_for_energy(mean_energy, eps)


def main(batch_size: int = 32, resolution: int = 160) -> dict:
    torch.manual_seed(0)
    bb = build_backbone("mcunet-in3", weights="imagenet", num_classes=10, weights_dir=SHARED / "weights" / "mcunet-in3")
    data = get_dataset("cifar10-jpeg", split="train", resolution=resolution, mean=bb.mean, std=bb.std,
                       data_root=SHARED / "datasets", seed=0, augment=False, max_per_class=20)
    batches = calibration_batches(data, 3, batch_size, 0)
    names = compressible_layers(bb.model)[-4:]
    stats = calibrate_layers(bb.model, names, batches)
    trained = {n: list(stats[n].ranks_at(EPS)) for n in names}
    result = calibrate_model(bb.model, batches, names, [EPS])
    reported = {d["name"]: list(d["ranks"][0]) for d in result.layers if d["name"] in names}
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(bb.model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda _m, i, _n=n: inputs[_n].append(i[0].detach()))
             for n in names]
    with torch.no_grad():
        bb.model.eval()
        for x, _ in batches:
            bb.model(x)
    for h in hooks:
        h.remove()
    before_train, before_calibrate = {}, {}
    for n in names:
        old_lance, old_calib = _old_batch_ranks(inputs[n], EPS)
        before_train[n] = [old_lance] + trained[n][1:]
        before_calibrate[n] = [old_calib] + trained[n][1:]
    return {"backbone": "mcunet-in3", "dataset": "cifar10-jpeg", "eps": EPS, "batches": 3, "batch_size": batch_size,
            "resolution": resolution, "layers": names,
            "before": {"lance_train_ranks": before_train, "lance_calibrate_ranks": before_calibrate},
            "now": {"lance_train_ranks": trained, "lance_calibrate_ranks": reported,
                    "equal": trained == reported}}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(main(*args), indent=1))
