"""Cache of a frozen prefix's outputs: compute once, train the last layers from them.

With no augmentation, and the frozen part in eval mode (BN running statistics, no dropout), the
layers before the first trained one give the same output every epoch. ``cached_features`` runs the
prefix once over a dataset and returns a :class:`FeatureDataset` of ``(features, label)``; train the
suffix on it. Keyed by (backbone, weights, dataset, split, resolution, cut) plus a fingerprint of
the prefix's parameters and of the dataset's labels, so a changed prefix never reuses stale features.

Storage: in memory when the features fit ``in_memory_max_bytes`` (default 256 MB), else a ``.npy``
file under ``$LANCE_HOME/cache/features/`` (memory-mapped, reused by later runs).

Typical use (last-k fine-tuning)::

    cut = first_trainable_stage(model)            # after compress_model / freezing
    prefix, suffix = split_at_stage(model, cut)
    train_feats = cached_features(prefix, train_set, feature_key("mcunet-in3", "imagenet",
                                  "cifar10-jpeg", "train", 176, cut))
    for f, y in DataLoader(train_feats, batch_size=128, shuffle=True): loss = ce(suffix(f), y) …
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine.models.stages import first_trainable_stage, split_at_stage  # noqa: F401  (re-exported)
from engine.phases import PhaseCallback, report

from .paths import cache_dir

CHANNELS_LAST_ENV = "LANCE_CHANNELS_LAST"  # "0": NCHW everywhere; "1": channels_last everywhere


class FeatureDataset(Dataset):
    """(features: tensor of shape ``feature_shape``, label: int); batch fetch via ``__getitems__``."""

    def __init__(self, features, targets: torch.Tensor, path: Path | None = None):
        self.features = features  # torch.Tensor (in memory) or np.memmap (on disk)
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.path = path

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.features.shape)) * 4

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        pos = np.asarray(positions, dtype=np.int64)
        if isinstance(self.features, torch.Tensor):
            feats = self.features[torch.from_numpy(pos)]
        else:
            order = np.argsort(pos)  # sorted reads from the memory map are much faster
            feats = np.empty((len(pos),) + self.feature_shape, dtype=np.float32)
            feats[order] = self.features[pos[order]]
            feats = torch.from_numpy(feats)
        return feats, self.targets[torch.from_numpy(pos)]

    def __getitem__(self, position: int):
        f, y = self.batch([int(position)])
        return f[0], int(y[0])

    def __getitems__(self, positions):
        f, y = self.batch(list(positions))
        return [(f[i], int(y[i])) for i in range(len(y))]


def feature_key(backbone: str, weights: str, dataset: str, split: str, resolution: int, cut: int | str,
                **extra) -> dict:
    """The readable part of a cache key; ``cached_features`` adds prefix and label fingerprints."""
    return {"backbone": backbone, "weights": str(weights), "dataset": dataset, "split": split,
            "resolution": int(resolution), "cut": cut, **extra}


def canonical_key(key: dict) -> dict:
    """``key`` without spelling: image-folder paths and data roots resolved, weight paths reduced to
    their kind (the prefix fingerprint already covers the weights' content), so ``../shared/x`` and
    ``/abs/shared/x`` share one cache entry."""
    out = dict(key)
    dataset = out.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("imagefolder:"):
        out["dataset"] = "imagefolder:" + str(Path(dataset.split(":", 1)[1]).expanduser().resolve())
    if out.get("data_root"):
        out["data_root"] = os.pathsep.join(str(Path(p).expanduser().resolve())
                                           for p in str(out["data_root"]).split(os.pathsep) if p)
    weights = str(out.get("weights", ""))
    if weights not in ("", "none", "imagenet", "bundled", "None"):
        out["weights"] = "imagenet" if weights.startswith("imagenet") else "file"
    return out


def content_fingerprint(dataset, max_images: int = 4096) -> str | None:
    """sha1 of up to ``max_images`` evenly spaced raw images of ``dataset`` (its pixels, not its path),
    or None when the dataset cannot serve raw images."""
    raw = getattr(dataset, "raw_images", None)
    n = len(dataset)
    if raw is None or n == 0:
        return None
    positions = np.unique(np.linspace(0, n - 1, num=min(n, max_images)).round().astype(np.int64))
    images = raw(positions)
    return hashlib.sha1(np.ascontiguousarray(images.numpy()).tobytes()).hexdigest()[:16]


def module_fingerprint(module: nn.Module) -> str:
    """sha1 of every parameter and buffer (names, shapes, bytes): changes whenever the prefix does."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _batches(dataset, batch_size: int):
    """Yield (x, y) batches in order, through the dataset's fast ``batch`` path when it has one."""
    n = len(dataset)
    if hasattr(dataset, "batch") and hasattr(dataset, "transform_batch"):
        for start in range(0, n, batch_size):
            yield dataset.batch(range(start, min(n, start + batch_size)))
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _run_prefix(prefix: nn.Module, dataset, batch_size: int, device, sink,
                on_phase: PhaseCallback | None = None, channels_last: bool = False) -> None:
    was_training = prefix.training
    prefix.eval()
    total = len(dataset)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        prefix.to(memory_format=fmt)
    try:
        with torch.no_grad():
            start = 0
            report("caching", 0, total, on_phase)
            for x, y in _batches(dataset, batch_size):
                x = x.to(device)
                out = prefix(x.contiguous(memory_format=fmt) if x.dim() == 4 else x).float().cpu()
                out = out.contiguous()  # stored NCHW whatever the format it was computed in
                sink(start, out, torch.as_tensor(y))
                start += len(out)
                report("caching", start, total, on_phase)
    finally:
        prefix.train(was_training)
        if channels_last:
            prefix.to(memory_format=torch.contiguous_format)


def use_channels_last(device) -> bool:
    """The default memory format choice: channels_last on CPU, where it is faster for these nets
    (MCUNet-in3's 7x7 depthwise backward 2-3x, docs/speed.md), NCHW elsewhere. ``LANCE_CHANNELS_LAST=0``
    turns it off everywhere (``1`` forces it on)."""
    env = os.environ.get(CHANNELS_LAST_ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return torch.device(device).type == "cpu"


def cached_features(prefix: nn.Module, dataset, key: dict, batch_size: int = 256,
                    in_memory_max_bytes: int = 256 * 2**20, device="cpu", use_disk: bool | None = None,
                    on_phase: PhaseCallback | None = None, channels_last: bool | None = None) -> FeatureDataset:
    """Features ``prefix(x)`` for every item of ``dataset`` (in order), computed once per key.

    ``prefix`` runs in eval mode under no_grad. ``dataset`` must not augment (else the features
    would differ each epoch): a dataset with ``augment=True`` is an error.
    use_disk None: disk when the features exceed ``in_memory_max_bytes``; True/False forces it.
    Reports ``("caching", images done, N)`` to ``on_phase`` while it computes (nothing on a cache hit).
    channels_last None: :func:`use_channels_last` for ``device``; the prefix runs in that memory format
    (the features are stored NCHW either way and agree to float32 rounding).
    """
    if channels_last is None:
        channels_last = use_channels_last(device)
    if getattr(dataset, "augment", False):
        raise ValueError("the feature cache needs a dataset without augmentation (augment=False): "
                         "augmented inputs give different frozen-prefix outputs every epoch")
    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    targets_digest = hashlib.sha1(np.asarray(targets).tobytes()).hexdigest()[:16] if targets is not None else str(n)
    full_key = {**canonical_key(key), "n": n, "labels": targets_digest, "prefix": module_fingerprint(prefix),
                "pixels": content_fingerprint(dataset),
                "transform": [getattr(dataset, a, None) for a in ("resolution", "mean", "std")]}
    digest = hashlib.sha1(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = cache_dir("features")
    path, labels_path, meta_path = folder / f"{digest}.npy", folder / f"{digest}.labels.npy", folder / f"{digest}.json"
    if path.is_file() and labels_path.is_file():
        return FeatureDataset(np.load(path, mmap_mode="r"), torch.from_numpy(np.load(labels_path)), path)

    # probe the feature shape on one item, then decide where to keep them
    first_x, _ = next(iter(_batches(dataset, 1)))
    prefix_was_training = prefix.training
    prefix.eval()
    with torch.no_grad():
        shape = tuple(prefix(first_x.to(device)).shape[1:])
    prefix.train(prefix_was_training)
    total_bytes = n * int(np.prod(shape)) * 4
    on_disk = total_bytes > in_memory_max_bytes if use_disk is None else use_disk
    labels = torch.empty(n, dtype=torch.int64)
    if not on_disk:
        feats = torch.empty((n,) + shape, dtype=torch.float32)

        def sink(start, out, y):
            feats[start:start + len(out)] = out
            labels[start:start + len(out)] = y

        _run_prefix(prefix, dataset, batch_size, device, sink, on_phase, channels_last)
        return FeatureDataset(feats, labels)
    tmp = folder / f"{digest}.tmp{os.getpid()}.npy"
    writer = {"array": np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n,) + shape)}

    def sink(start, out, y):
        writer["array"][start:start + len(out)] = out.numpy()
        labels[start:start + len(out)] = y

    _run_prefix(prefix, dataset, batch_size, device, sink, on_phase, channels_last)
    writer.pop("array").flush()  # and close the write mapping
    np.save(labels_path, labels.numpy())
    meta_path.write_text(json.dumps({**full_key, "shape": [n, *shape], "bytes": total_bytes}, default=str, indent=1))
    os.replace(tmp, path)
    return FeatureDataset(np.load(path, mmap_mode="r"), labels, path)


def cache_model_features(model: nn.Module, dataset, key: dict, stage_index: int | None = None, **kwargs):
    """(FeatureDataset, prefix, suffix, stage_index): cut ``model`` at ``stage_index`` (default: the first
    stage with a trainable parameter), cache the prefix's outputs, return the suffix to train."""
    index = first_trainable_stage(model) if stage_index is None else stage_index
    prefix, suffix = split_at_stage(model, index)
    feats = cached_features(prefix, dataset, {**key, "cut": index, "cut_stage": suffix.names[0]}, **kwargs)
    return feats, prefix, suffix, index
