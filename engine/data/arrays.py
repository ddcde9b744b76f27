"""In-memory image datasets: uint8 arrays, resized and normalised per batch.

:class:`ImageArrays` holds decoded images ``(N, 3, H, W) uint8`` and labels ``(N,) int64``.
:class:`ArrayImageDataset` serves ``(x, y)`` with ``x: (3, R, R) float32`` normalised by mean/std.
It implements ``__getitems__``, so a ``DataLoader`` fetches a whole batch at once and resizes it with
one ``torch.nn.functional.interpolate`` call (the fast path); ``transform_batch`` does the same for
callers that index the arrays directly (the feature cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset


@dataclass
class ImageArrays:
    """Decoded images of one official split: images (N, 3, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices) -> "ImageArrays":
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageArrays(self.images[index], self.labels[index], list(self.classes))


def resize_normalize(images_uint8: torch.Tensor, resolution: int | None, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, R, R) float32, bilinear (antialiased when shrinking), normalised.

    resolution None: no resize."""
    x = images_uint8.float().div_(255.0)
    if resolution and x.shape[-2:] != (resolution, resolution):
        shrink = x.shape[-1] > resolution or x.shape[-2] > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def augment_batch(images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding of H/8 px) and horizontal flip, per image; (B, 3, H, W) uint8."""
    b, _, h, w = images_uint8.shape
    pad = max(1, h // 8)
    padded = F.pad(images_uint8, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(images_uint8)
    for i in range(b):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


class ArrayImageDataset(Dataset):
    """(x: (3, R, R) float32, y: int) from uint8 arrays; labels optionally remapped by ``label_map``.

    Attributes: ``classes`` (names, in label order), ``targets`` (N,) int64 labels as served,
    ``resolution``, ``mean``, ``std``, ``augment``, ``name``.
    """

    def __init__(self, arrays: ImageArrays, resolution: int | None = None, mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5), augment: bool = False, name: str = "", indices=None,
                 label_map: dict[int, int] | None = None, classes: list[str] | None = None):
        self.arrays = arrays
        self.indices = None if indices is None else torch.as_tensor(np.asarray(indices, dtype=np.int64))
        h, w = arrays.images.shape[-2:]
        # None: serve the stored size (square images: resolution = that side; others: not resized)
        self.resolution = int(resolution) if resolution else (int(h) if h == w else None)
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.name = name
        self.label_map = dict(label_map) if label_map else None
        base = arrays.labels if self.indices is None else arrays.labels[self.indices]
        if self.label_map:
            lookup = torch.full((int(base.max()) + 1 if len(base) else 1,), -1, dtype=torch.int64)
            for old, new in self.label_map.items():
                if old < len(lookup):
                    lookup[old] = new
            base = lookup[base]
            if (base < 0).any():
                raise ValueError("label_map does not cover every label of the selected images")
        self.targets = base
        self.classes = classes if classes is not None else list(arrays.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def raw_images(self, positions) -> torch.Tensor:
        """(B, 3, H, W) uint8 images at dataset positions ``positions``."""
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        index = pos if self.indices is None else self.indices[pos]
        return self.arrays.images[index]

    def transform_batch(self, images_uint8: torch.Tensor, augment: bool | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, R, R) float32 (augmented when ``augment``)."""
        if self.augment if augment is None else augment:
            images_uint8 = augment_batch(images_uint8)
        return resize_normalize(images_uint8, self.resolution, self.mean, self.std)


    def batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """(x: (B, 3, R, R) float32, y: (B,) int64) for dataset positions ``positions``."""
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return self.transform_batch(self.raw_images(pos)), self.targets[pos]

    def __getitem__(self, position: int):
        x, y = self.batch([int(position)])
        return x[0], int(y[0])

    def __getitems__(self, positions):
        x, y = self.batch(list(positions))
        return [(x[i], int(y[i])) for i in range(len(y))]

    def subset(self, positions, label_map: dict[int, int] | None = None, classes: list[str] | None = None,
               augment: bool | None = None) -> "ArrayImageDataset":
        """A view on some positions (storage shared), labels remapped by ``label_map`` (old -> new)."""
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        index = pos if self.indices is None else self.indices[pos]
        if self.label_map and label_map:
            label_map = {old: label_map[new] for old, new in self.label_map.items() if new in label_map}
        elif self.label_map:
            label_map = self.label_map
        return ArrayImageDataset(self.arrays, self.resolution, self.mean, self.std,
                                 self.augment if augment is None else augment, self.name, index, label_map,
                                 classes if classes is not None else self.classes)

    def with_transform(self, resolution: int | None = None, mean=None, std=None,
                       augment: bool | None = None) -> "ArrayImageDataset":
        """Same images and labels, another resolution / normalisation / augmentation."""
        return ArrayImageDataset(self.arrays, resolution or self.resolution, mean or self.mean, std or self.std,
                                 self.augment if augment is None else augment, self.name, self.indices,
                                 self.label_map, self.classes)

    def __repr__(self) -> str:
        return (f"ArrayImageDataset({self.name!r}, n={len(self)}, classes={len(self.classes)}, "
                f"resolution={self.resolution}, augment={self.augment})")
