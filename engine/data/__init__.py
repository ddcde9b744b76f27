"""Datasets as ``(x: (3, R, R) float32, y: int)`` at a backbone's resolution and normalisation.

``get_dataset(name, split, resolution, mean, std, data_root=None, seed=0, augment=False)`` returns an
:class:`ArrayImageDataset` (decoded uint8 arrays in memory, cached on disk as npz; resized per batch).
Names: ``digits`` (bundled), ``cifar10``, ``cifar100``, ``cifar10-jpeg``, ``pets``, ``flowers102``,
``cub200``, ``mnist``, ``fashion-mnist``, ``svhn``, ``notmnist``, ``imagefolder:PATH``.

Splits: ``test`` is the official test split (datasets without one: a fixed stratified 20 % of all
images, the same for every seed); ``val`` is the official validation split where there is one (Flowers),
else a seeded stratified 10 % of the training images; ``train`` is the rest; ``trainval`` both.
"""
from __future__ import annotations

import numpy as np
import torch

from .arrays import ArrayImageDataset, ImageArrays, resize_normalize
from .errors import DatasetMissing
from .paths import cache_dir, data_roots
from .registry import SPECS, download, get_spec, locate, num_classes

VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
SPLITS = ("train", "val", "test", "trainval")


def available_datasets() -> list[str]:
    """Every dataset name ``get_dataset`` knows (plus ``imagefolder:PATH``), present here or not."""
    return list(SPECS)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) index arrays; ``round(fraction · n_c)`` (at least 1 if n_c > 1) of each class held out."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        index = index[rng.permutation(len(index))]
        n_held = int(round(fraction * len(index)))
        if len(index) > 1:
            n_held = min(max(n_held, 1), len(index) - 1)
        else:
            n_held = 0
        held.append(index[:n_held])
        kept.append(index[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def _concat(a: ImageArrays, b: ImageArrays) -> ImageArrays:
    if a.images.shape[1:] != b.images.shape[1:]:
        raise ValueError("cannot join splits with different image sizes")
    return ImageArrays(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes)


def load_split_arrays(name: str, split: str, data_root=None, seed: int = 0, store_size: int | None = None,
                      max_per_class: int | None = None) -> tuple[ImageArrays, np.ndarray | None]:
    """(arrays, indices or None) of ``split``; the decoded arrays are shared between splits."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    spec = get_spec(name)
    folder = locate(name, data_root)
    official = spec.splits_of(folder)

    def load(official_split):
        return spec.load(folder, official_split, store_size, max_per_class)

    if "all" in official:
        arrays = load("all")
        pool, test = stratified_split(arrays.labels.numpy(), TEST_FRACTION, seed=0)
        if split == "test":
            return arrays, test
        train, val = stratified_split(arrays.labels.numpy()[pool], VAL_FRACTION / (1 - TEST_FRACTION), seed)
        return arrays, {"train": pool[train], "val": pool[val], "trainval": pool}[split]
    if split == "test":
        if "test" not in official:
            raise DatasetMissing(name, [folder], spec.how_to_get, "it has no test split")
        return load("test"), None
    if "val" in official:
        if split == "trainval":
            return _concat(load("train"), load("val")), None
        return load(split), None
    arrays = load("train")
    if split == "trainval":
        return arrays, None
    train, val = stratified_split(arrays.labels.numpy(), VAL_FRACTION, seed)
    return arrays, train if split == "train" else val


def get_dataset(name: str, split: str = "train", resolution: int | None = None, mean=None, std=None,
                data_root=None, seed: int = 0, augment: bool = False, max_per_class: int | None = None,
                download_if_missing: bool = False) -> ArrayImageDataset:
    """The dataset ``name``/``split`` serving (x: (3, R, R) float32 normalised, y: int).

    resolution None: the images' stored size. mean/std None: (0.5, 0.5, 0.5). ``max_per_class`` keeps
    the first N images of each class of each official split (quick runs). ``download_if_missing``
    downloads with torchvision when the dataset is absent (needs a network).
    Raises :class:`DatasetMissing` (which, where it looked, how to get it).
    """
    try:
        arrays, indices = load_split_arrays(name, split, data_root, seed, resolution, max_per_class)
    except DatasetMissing:
        if not download_if_missing:
            raise
        download(name, data_root)
        arrays, indices = load_split_arrays(name, split, data_root, seed, resolution, max_per_class)
    return ArrayImageDataset(arrays, resolution, mean or (0.5, 0.5, 0.5), std or (0.5, 0.5, 0.5), augment,
                             name=f"{name}/{split}", indices=indices)


def dataset_status(name: str, data_root=None) -> dict:
    """{name, description, classes, available, path, looked_in, how_to_get} without decoding anything."""
    spec = get_spec(name)
    status = {"name": name, "description": spec.description, "classes": spec.num_classes, "available": True,
              "path": None, "looked_in": [], "how_to_get": spec.how_to_get}
    if spec.builtin:
        status["path"] = "(bundled)"
        return status
    try:
        status["path"] = str(locate(name, data_root))
        if status["classes"] is None:
            status["classes"] = num_classes(name, data_root)
    except DatasetMissing as error:
        status.update(available=False, looked_in=error.looked_in)
    return status


__all__ = [
    "ArrayImageDataset", "DatasetMissing", "ImageArrays", "SPLITS", "available_datasets", "cache_dir",
    "data_roots", "dataset_status", "download", "get_dataset", "get_spec", "load_split_arrays", "locate",
    "num_classes", "resize_normalize", "stratified_split",
]
