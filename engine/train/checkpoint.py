"""Checkpoints of a fine-tuning run: what was trained, method state included, and where it stopped.

Contents of ``checkpoint.pt`` (``torch.save`` dict):
    version, method, epoch (next epoch to run), step (global steps done),
    model:        state_dict of the trained model *as compressed* (method buffers: ASI warm factors,
                  LANCE factors) -> used by ``--resume``;
    plain_model:  state_dict of the same weights in the plain backbone (no compression wrappers)
                  -> used by ``lance evaluate``;
    optimizer, scheduler, torch_rng, layers (trained layer names), num_classes, class_names.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

VERSION = 1


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write atomically (tmp file + rename) so a kill never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"version": VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: the run stopped before its first epoch ended; start a new run")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if data.get("version") != VERSION:
        raise ValueError(f"checkpoint {path} has version {data.get('version')}, this engine reads {VERSION}")
    return data
