"""Batch sources for fine-tuning: seeded subsets, per-epoch seeded order, the frozen-prefix features.

Every source is a callable ``epoch -> iterable of (x, y)``: the order of epoch ``e`` depends only on
(seed, e), so methods run one after another see identical batches and a resumed run continues with
the batches it would have seen. Epoch ``-1`` is the calibration order (LANCE, budgets).
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from engine.data.feature_cache import cached_features, use_channels_last
from engine.phases import PhaseCallback

CALIBRATION_EPOCH = -1
# methods whose trained suffix runs channels_last on CPU: none since the depthwise weight gradient of 10+ taps went
# to engine.depthwise's taps route (the ATen NCHW path that channels_last had sped up is no longer taken). A
# vanilla suffix step at batch 64, NCHW against channels_last (python3 docs/bench/suffix_layout.py): MCUNet-in3
# 29.1 / 37.7 ms, MobileNetV2 137 / 140 ms, ResNet-18 656 / 729 ms; the compressed methods gained nothing either
# (python3 -m engine.bench.formats: 0.79-0.99x). The mechanism stays for a method that gains.
CHANNELS_LAST_METHODS: tuple[str, ...] = ()
DISK_CACHE_FROM_BYTES = 16 * 2**20


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_919 * (int(epoch) + 2))


def seeded_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """The items at the first ``limit`` positions of a seeded permutation, in their original order
    (all of ``dataset`` when limit is None). Keeps the engine's array datasets as array datasets."""
    n = len(dataset)
    if limit is None or limit >= n:
        return dataset
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 12_345))[:limit]
    positions = sorted(order.tolist())
    if hasattr(dataset, "subset"):
        return dataset.subset(positions)
    return Subset(dataset, positions)


def get_batch(dataset, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``positions`` of ``dataset`` as one batch ``(x: (B, ...), y: (B,) int64)``.

    Vectorised through ``dataset.batch(positions)`` where the dataset has it (the engine's array and
    feature datasets), item by item otherwise.
    """
    positions = torch.as_tensor(positions, dtype=torch.int64)
    if hasattr(dataset, "batch"):
        x, y = dataset.batch(positions.numpy())
        return x, torch.as_tensor(y).long()
    items = [dataset[int(i)] for i in positions]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


class DatasetBatches:
    """Batches of a dataset (images or cached features) in a seeded per-epoch order.

    ``source(epoch)`` yields ``(x, y)``; the order depends only on (seed, epoch); the last batch may
    be smaller (never dropped).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, int(batch_size), seed, shuffle

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __call__(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield get_batch(self.dataset, order[start:start + self.batch_size])


class TensorPairs(Dataset):
    """``(x[i], y[i])`` of two tensors, with a vectorised ``batch``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows, y has {len(y)}")
        self.x, self.y = x, torch.as_tensor(y).long()

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, positions):
        pos = torch.as_tensor(positions, dtype=torch.int64)
        return self.x[pos], self.y[pos]

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@torch.no_grad()
def compute_features(prefix: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu") -> TensorPairs:
    """Run every item of ``dataset`` through the frozen ``prefix`` (eval mode) once, in memory."""
    was_training = prefix.training
    prefix.eval()
    xs, ys = [], []
    n = len(dataset)
    try:
        for start in range(0, n, batch_size):
            x, y = get_batch(dataset, torch.arange(start, min(n, start + batch_size)))
            xs.append(prefix(x.to(device)).float().cpu())
            ys.append(y)
    finally:
        prefix.train(was_training)
    if not xs:
        raise ValueError("the dataset is empty: nothing to fine-tune on")
    return TensorPairs(torch.cat(xs), torch.cat(ys))


def suffix_channels_last(method: str, device: str, enabled: bool = True) -> bool:
    """Whether ``method``'s trained suffix runs channels_last: ``enabled`` (``--no-channels-last`` turns
    it off), a method of ``CHANNELS_LAST_METHODS`` and :func:`engine.data.feature_cache.use_channels_last`."""
    return bool(enabled) and method in CHANNELS_LAST_METHODS and use_channels_last(device)


def frozen_features(prefix: nn.Module, dataset: Dataset, key: dict, device: str = "cpu",
                    on_phase: PhaseCallback | None = None, channels_last: bool | None = None):
    """``prefix``'s outputs for ``dataset``: through the engine's feature cache (memory, or a reusable
    file under $LANCE_HOME/cache/features when large) where available; returns ``(features dataset, seconds)``.
    Reports ``("caching", images done, N)`` to ``on_phase`` (default: the installed ``engine.phases`` one).
    ``channels_last`` None: on CPU (:func:`engine.data.feature_cache.use_channels_last`)."""
    start = time.perf_counter()
    # beyond a few MB the features go to a reusable file (a rerun of the same setup skips the prefix)
    return (cached_features(prefix, dataset, key, device=device, in_memory_max_bytes=DISK_CACHE_FROM_BYTES,
                            on_phase=on_phase, channels_last=channels_last),
            time.perf_counter() - start)
