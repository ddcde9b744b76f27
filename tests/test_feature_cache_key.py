"""The feature cache keys on what the data and weights are, not on how their paths are spelled."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.data import get_dataset
from engine.data.feature_cache import cached_features, canonical_key, feature_key
from engine.data.paths import cache_dir


def _folder(root, seed: int):
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _features(path_text, prefix):
    data = get_dataset(f"imagefolder:{path_text}", split="trainval", resolution=8)
    key = feature_key("tiny", "imagenet:" + str(path_text) + "/w.pth", f"imagefolder:{path_text}", "trainval", 8, 1,
                      data_root=str(path_text))
    cached_features(prefix, data, key, use_disk=True)
    return {p.name for p in cache_dir("features").glob("*.npy")}


def test_two_spellings_of_one_folder_share_one_entry_and_new_pixels_make_another(tmp_path, monkeypatch):
    torch.manual_seed(0)
    prefix = nn.Conv2d(3, 2, 3, padding=1)
    folder = _folder(tmp_path / "imgs", seed=0)
    monkeypatch.chdir(tmp_path / "imgs")
    first = _features(folder, prefix)                                   # absolute spelling
    again = _features(os.path.join("..", "imgs"), prefix)               # relative spelling, same files
    assert len(first) == 2 and again == first                           # features + labels, one entry
    other = _folder(tmp_path / "other" / "imgs", seed=1)                # same names and labels, new pixels
    assert len(_features(other, prefix)) == 4


def test_canonical_key_resolves_paths_and_drops_weight_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    a = canonical_key({"dataset": "imagefolder:d", "weights": "imagenet:../w/x.pth", "data_root": "d"})
    b = canonical_key({"dataset": f"imagefolder:{tmp_path}/d/../d", "weights": f"imagenet:{tmp_path}/w/x.pth",
                       "data_root": str(tmp_path / "d")})
    assert a == b and a["dataset"] == f"imagefolder:{tmp_path.resolve()}/d"
    assert canonical_key({"weights": "none"})["weights"] == "none"
