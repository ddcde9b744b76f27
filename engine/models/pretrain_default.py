"""Reproduce the default backbone ``small-cnn-digits``: ``python -m engine.models.pretrain_default``.

Recipe (fixed; the committed file ``engine/models/pretrained/small-cnn-digits.pt`` came from it):
``small-cnn`` (widths 16-32-64, 5-class head) trained from seed 0 on **all 901 images of digits 0-4**
(``digits-0to4``; the fine-tune task ``digits-5to9`` holds the other classes, so no image is shared),
at 32 px, normalised with mean = std = 0.5, random shifts of up to ±3 px (zero fill) as the only
augmentation, AdamW (lr 3e-3, weight decay 1e-4), batch 64, 12 epochs, cosine schedule, BatchNorm in
train mode, one thread, deterministic. Takes about 15 s on one CPU core.

What it prints: JSON with the training accuracy of the last epoch, the file written and its SHA-256.
The head is replaced by a fresh, seeded one whenever the backbone is fine-tuned (``fresh_head``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from engine.data import get_dataset
from engine.models.small_cnn import SmallCNN

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_FILE = PRETRAINED_DIR / "small-cnn-digits.pt"
RECIPE = {"dataset": "digits-0to4", "split": "all images", "resolution": 32, "mean": 0.5, "std": 0.5,
          "shift_px": 3, "optimizer": "AdamW", "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64,
          "epochs": 12, "schedule": "cosine per step", "seed": 0}


def shift_batch(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> the same shape, each image moved by up to ±max_shift px (zero fill)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def pretrain(recipe: dict = RECIPE, log=print) -> tuple[dict, dict]:
    """(state_dict, report) of ``small-cnn`` trained on ``recipe`` (deterministic for a given recipe)."""

    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    mean = (recipe["mean"],) * 3
    std = (recipe["std"],) * 3
    data = get_dataset(recipe["dataset"], split="trainval", resolution=recipe["resolution"], mean=mean, std=std)
    test = get_dataset(recipe["dataset"], split="test", resolution=recipe["resolution"], mean=mean, std=std)
    x_all = torch.cat([data.batch(range(len(data)))[0], test.batch(range(len(test)))[0]])
    y_all = torch.cat([data.targets, test.targets])
    # the shift pads with the normalised zero (black background) by shifting (x - mean) / std + offset
    background = (0.0 - recipe["mean"]) / recipe["std"]
    model = SmallCNN(num_classes=len(data.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(y_all) / recipe["batch_size"])
    total = steps_per_epoch * recipe["epochs"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    correct = seen = 0
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(y_all), generator=generator)
        correct = seen = 0
        for start in range(0, len(order), recipe["batch_size"]):
            index = order[start:start + recipe["batch_size"]]
            x = shift_batch(x_all[index] - background, recipe["shift_px"], generator) + background
            y = y_all[index]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        log(f"epoch {epoch + 1}/{recipe['epochs']}: loss {float(loss.detach()):.4f}, "
            f"train acc {100 * correct / seen:.2f} %")
    report = {"recipe": recipe, "images": int(len(y_all)), "train_acc_last_epoch": round(100 * correct / seen, 2),
              "params": sum(p.numel() for p in model.parameters())}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.models.pretrain_default", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_FILE), help=f"where to write the weights (default {DEFAULT_FILE})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    state, report = pretrain(log=lambda line: print(line, file=sys.stderr))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    report["file"] = str(out)
    report["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
