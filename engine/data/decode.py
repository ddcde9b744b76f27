"""Decoding image files to uint8 arrays, and the on-disk cache of decoded arrays (npz).

Decoding 58,000 small JPEGs takes tens of seconds on a busy 2-core machine; the cache under
``<cache>/decoded/`` makes every later load a single ``np.load`` (well under a second).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from engine.phases import PhaseCallback, report

from .arrays import ImageArrays
from .errors import BadImage
from .paths import cache_dir

SKIP_BAD_IMAGES_ENV = "LANCE_SKIP_BAD_IMAGES"  # "1": leave unreadable images out (``--skip-bad-images``)


def skip_bad_images() -> bool:
    return os.environ.get(SKIP_BAD_IMAGES_ENV, "").strip() in ("1", "true", "yes")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def _decode_one(path: Path, store_size: int | None) -> np.ndarray:
    """(H, W, 3) uint8; with ``store_size``: shorter side resized to it, then centre-cropped square.

    Raises ``BadImage`` (naming ``path``) for a file PIL cannot decode (truncated, corrupt, not an image).
    """
    try:
        return _decode_image(path, store_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(path, exc) from None


def readable_images(paths: list[Path]) -> tuple[list[int], list[Path]]:
    """(indices of the files PIL decodes fully, paths of those it cannot)."""
    good, bad = [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.load()
            good.append(i)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            bad.append(path)
    return good, bad


def _decode_image(path: Path, store_size: int | None) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if store_size:
            w, h = image.size
            scale = store_size / min(w, h)
            new_w, new_h = max(store_size, round(w * scale)), max(store_size, round(h * scale))
            image = image.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
            left, top = (new_w - store_size) // 2, (new_h - store_size) // 2
            image = image.crop((left, top, left + store_size, top + store_size))
        return np.asarray(image, dtype=np.uint8)


def image_sizes_uniform(paths: list[Path], sample: int = 64) -> tuple[int, int] | None:
    """The common (W, H) of the images if a spread sample of headers agrees, else None."""
    if not paths:
        return None
    step = max(1, len(paths) // sample)
    sizes = set()
    for path in paths[::step][:sample] + [paths[-1]]:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
        except (OSError, SyntaxError, ValueError):
            return None  # an unreadable header: decode_files names it
    return sizes.pop() if len(sizes) == 1 else None


def decode_files(paths: list[Path], store_size: int | None = None, workers: int | None = None,
                 on_phase: PhaseCallback | None = None) -> torch.Tensor:
    """Decode images to (N, 3, H, W) uint8. Without ``store_size`` all images must share one size.

    Reports ``("decoding", done, N)`` to ``on_phase`` (default: the installed ``engine.phases`` callback).
    """
    if not paths:
        return torch.zeros((0, 3, store_size or 1, store_size or 1), dtype=torch.uint8)
    workers = workers or min(4, os.cpu_count() or 1)
    total = len(paths)
    arrays = []
    report("decoding", 0, total, on_phase)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        for array in pool.map(lambda p: _decode_one(p, store_size), paths, chunksize=256):
            arrays.append(array)
            if len(arrays) % 64 == 0 or len(arrays) == total:
                report("decoding", len(arrays), total, on_phase)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:4]}…; decode them with a store_size")
    stacked = np.stack(arrays)  # (N, H, W, 3)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def cache_key(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_arrays(label: str, key_parts: dict, build: Callable[[], ImageArrays]) -> ImageArrays:
    """Load ``<cache>/decoded/<label>-<hash>.npz`` or build it with ``build()`` and save it."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
    path = cache_dir("decoded") / f"{safe}-{cache_key(key_parts)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                return ImageArrays(torch.from_numpy(data["images"].copy()), torch.from_numpy(data["labels"].copy()),
                                   [str(c) for c in data["classes"]])
        except (OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # a torn write: rebuild
    arrays = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=arrays.images.numpy(), labels=arrays.labels.numpy(), classes=np.array(arrays.classes))
    os.replace(tmp, path)
    return arrays


def folder_fingerprint(folder: Path) -> dict:
    """Cheap identity of a folder tree for cache keys: path, mtime of the folder and its children."""
    folder = Path(folder).resolve()
    children = sorted(folder.iterdir()) if folder.is_dir() else []
    return {"path": str(folder), "mtime": [int(c.stat().st_mtime) for c in children][:2000],
            "names": [c.name for c in children][:2000]}
