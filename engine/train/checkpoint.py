"""Checkpoints: tensors and plain data only, loaded with ``torch.load(..., weights_only=True)``.

A checkpoint never holds pickled objects, so loading one cannot run code: a file that does (a planted
pickle, a checkpoint from an older lance or another program) is refused with ``CheckpointRefused``
before anything in it is used.

Contents of a fine-tuning ``checkpoint.pt`` (``torch.save`` dict):
    version (2), format ("lance-finetune"), method, epoch (next epoch to run), step (global steps done),
    model:        state_dict of the trained model *as compressed* (method buffers: ASI warm factors,
                  LANCE factors) -> used by ``--resume``;
    plain_model:  state_dict of the same weights in the plain backbone (no compression wrappers)
                  -> used by ``lance evaluate``;
    optimizer, scheduler (their state dicts), torch_rng (uint8 tensor), layers (trained layer names),
    num_classes, class_names, backbone, weights.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from engine.train.config import ConfigError

VERSION = 2
FORMAT = "lance-finetune"


class CheckpointRefused(ConfigError):
    """A checkpoint that is not a lance checkpoint of the expected version (message says what to do)."""


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write atomically (tmp file + rename) so a kill never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"version": VERSION, "format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_tensors_only(path: Path, fmt: str, version: int, what: str = "checkpoint") -> dict:
    """``torch.load(path, weights_only=True)``; refuse anything but a dict of the given format/version.

    Raises ``CheckpointRefused`` for a file holding pickled objects (it is never executed), a
    different ``format``/``version``, or a damaged file.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(
            f"refusing to load {what} {path}: it holds Python objects, not only tensors and plain data "
            f"(loading it could run code). It was not written by this lance ({fmt} v{version}); start a new "
            f"run instead. Detail: {str(exc).splitlines()[0][:200]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointRefused(f"cannot read {what} {path}: {type(exc).__name__}: {str(exc)[:200]}; the file "
                                "is damaged or not a checkpoint; start a new run") from None
    if not isinstance(data, dict):
        raise CheckpointRefused(f"{what} {path} is not a lance checkpoint (it holds a {type(data).__name__}); "
                                "start a new run")
    if data.get("format") != fmt or data.get("version") != version:
        raise CheckpointRefused(
            f"{what} {path} has format {data.get('format')!r} version {data.get('version')!r}; this lance reads "
            f"{fmt!r} version {version} (an older or foreign checkpoint). Its metrics stay in the store; "
            "start a new run to train again")
    return data


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: the run stopped before its first epoch ended; start a new run")
    return load_tensors_only(path, FORMAT, VERSION)
