"""Datasets on the real on-disk formats (files written here), splits, the decoded cache, errors."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DatasetMissing, dataset_status, get_dataset, num_classes
from engine.data import decode as decode_module
from engine.data.decode import IMAGE_EXTENSIONS
from engine.data.sources import image_files_under

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # x == pixel / 255


pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(ds, positions) -> np.ndarray:
    """Served images back to uint8 (B, H, W, 3) (valid with IDENTITY normalisation at native size)."""
    x, _ = ds.batch(positions)
    return np.round(x.numpy() * 255).astype(np.uint8).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ digits
def test_digits_splits_are_seeded_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    sets = {s: get_dataset("digits", s, resolution=32) for s in ("train", "val", "test", "trainval")}
    assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == 1797
    assert len(sets["trainval"]) == len(sets["train"]) + len(sets["val"])
    idx = {s: set(d.indices.tolist()) for s, d in sets.items()}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]
    assert 0.18 < len(sets["test"]) / 1797 < 0.22 and 0.08 < len(sets["val"]) / 1797 < 0.12
    assert set(sets["test"].targets.tolist()) == set(range(10))
    x, y = sets["train"][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    # the pixels are sklearn's (0..16 scaled to 0..255), grey in 3 channels
    native = get_dataset("digits", "test", **IDENTITY)
    raw = load_digits().images[native.indices[:5].numpy()]
    got = _pixels(native, range(5))
    assert np.array_equal(got[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
    assert np.array_equal(got[..., 0], got[..., 2])
    # test split fixed across seeds, validation split seeded
    other = {s: get_dataset("digits", s, seed=1) for s in ("val", "test")}
    assert torch.equal(other["test"].indices, sets["test"].indices)
    assert not torch.equal(other["val"].indices, sets["val"].indices)
    assert torch.equal(get_dataset("digits", "val", seed=0).indices, sets["val"].indices)
    with pytest.raises(ValueError, match="unknown split"):
        get_dataset("digits", "training")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("imagenet")


def test_resize_normalise_and_dataloader_batches_match_items():
    ds = get_dataset("digits", "train", resolution=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 24, 24) and yb.dtype == torch.int64
    for i in (0, 7, 15):
        x, y = ds[i]
        assert torch.allclose(x, xb[i]) and y == int(yb[i])
    # normalisation: channel c = (pixel/255 - mean_c) / std_c
    raw = ds.raw_images([0]).float() / 255
    up = torch.nn.functional.interpolate(raw, size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(xb[0, 1], (up[0, 1] - 0.4) / 0.25, atol=1e-5)
    aug = get_dataset("digits", "train", resolution=24, augment=True)
    torch.manual_seed(0)
    xa = torch.stack([aug[3][0] for _ in range(6)])
    assert xa.shape == (6, 3, 24, 24) and (xa[1:] - xa[0]).abs().amax() > 0.1  # random crops / flips differ


# ------------------------------------------------------------------------------------------ CIFAR
def _write_cifar10(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name.encode(), "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return written


def test_cifar10_python_batches(tmp_path):
    written = _write_cifar10(tmp_path)
    ds = get_dataset("cifar10", "trainval", data_root=tmp_path, **IDENTITY)
    assert len(ds) == 20 and ds.classes[3] == "cat" and ds.resolution == 32
    data, labels = written["data_batch_2"]
    expected = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes R, G, B of 32x32, row-major
    assert np.array_equal(_pixels(ds, range(4, 8)), expected)
    assert ds.targets[4:8].tolist() == labels
    test = get_dataset("cifar10", "test", data_root=tmp_path, resolution=16)
    assert len(test) == 4 and test.targets.tolist() == written["test_batch"][1] and test[0][0].shape == (3, 16, 16)
    train, val = get_dataset("cifar10", "train", data_root=tmp_path), get_dataset("cifar10", "val", data_root=tmp_path)
    assert len(train) + len(val) == 20 and not set(train.indices.tolist()) & set(val.indices.tolist())
    assert num_classes("cifar10") == 10 and dataset_status("cifar10", tmp_path)["available"]


def test_cifar100_python_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 300), ("test", 100)):
        fine = [i % 100 for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"filenames": [b"x.png"] * n, "batch_label": b"b", "fine_labels": fine,
                         "coarse_labels": [v // 5 for v in fine],
                         "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f)
    test = get_dataset("cifar100", "test", data_root=tmp_path)
    assert len(test) == 100 and test.classes[42] == "fine42" and test.targets[:3].tolist() == [0, 1, 2]
    assert num_classes("cifar100") == 100
    assert len(get_dataset("cifar100", "train", data_root=tmp_path, max_per_class=2)) <= 200


# ------------------------------------------------------------------------------------------ image folders
def _png(path, color, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_split_layout_values_and_decoded_cache(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    colors = {"cats": (200, 10, 30), "dogs": (5, 120, 250), "owls": (60, 60, 60)}
    for split, n in (("train", 5), ("test", 2)):
        for cls, color in colors.items():
            for i in range(n):
                _png(root / split / cls / f"{i:03d}.png", color)
    name = f"imagefolder:{root}"
    test = get_dataset(name, "test", **IDENTITY)
    assert test.classes == ["cats", "dogs", "owls"] and test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    px = _pixels(test, range(6))
    assert px.shape == (6, 10, 12, 3)  # uniform sizes kept native (H=10, W=12)
    assert tuple(px[2, 4, 5]) == colors["dogs"] and tuple(px[5, 0, 0]) == colors["owls"]
    assert num_classes(name) == 3
    # second load comes from the npz cache, without decoding a file
    monkeypatch.setattr(decode_module, "decode_files", lambda *a, **k: pytest.fail("decoded again"))
    again = get_dataset(name, "test", resolution=8)
    assert len(again) == 6 and again[0][0].shape == (3, 8, 8)
    train = get_dataset(name, "train")
    assert len(train) + len(get_dataset(name, "val")) == 15


def test_imagefolder_flat_layout_and_mixed_sizes(tmp_path):
    root = tmp_path / "flat"
    for cls in ("a", "b"):
        for i in range(10):
            _png(root / cls / f"{i}.jpg", (i * 20, 0, 0) if cls == "a" else (0, i * 20, 0), size=(40 + i, 30))
    train = get_dataset(f"imagefolder:{root}", "train", resolution=20)
    test = get_dataset(f"imagefolder:{root}", "test", resolution=20)
    assert len(train) + len(test) + len(get_dataset(f"imagefolder:{root}", "val", resolution=20)) == 20
    assert len(test) == 4 and sorted(test.targets.tolist()) == [0, 0, 1, 1]
    assert train.raw_images([0]).shape == (1, 3, 20, 20)  # shorter side to 20, centre crop


def test_missing_datasets_say_which_where_and_how(tmp_path):
    with pytest.raises(DatasetMissing) as info:
        get_dataset("cifar10", data_root=tmp_path / "nowhere")
    text = str(info.value)
    assert "'cifar10'" in text and str(tmp_path / "nowhere" / "cifar-10-batches-py") in text
    assert "lance datasets --download cifar10" in text
    with pytest.raises(DatasetMissing, match="no such folder"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissing, match="no class folders"):
        get_dataset(f"imagefolder:{tmp_path / 'empty'}")
    status = dataset_status("pets", tmp_path)
    assert status["available"] is False and status["looked_in"] == [str(tmp_path / "oxford-iiit-pet")]


# ------------------------------------------------------------------------------------------ Pets / Flowers / CUB
def _jpeg(path, color, size=(48, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=95)


def test_oxford_pets_layout(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1, 1, 1), ("american_bulldog_10", 2, 2, 1), ("Abyssinian_2", 1, 1, 1)],
            "test": [("american_bulldog_3", 2, 2, 1), ("Abyssinian_7", 1, 1, 1)]}
    (base / "annotations").mkdir(parents=True)
    for split, items in rows.items():
        lines = ["#Image CLASS-ID SPECIES BREED ID"] if split == "test" else []
        lines += [f"{n} {c} {s} {b}" for n, c, s, b in items]
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
        for name, c, _, _ in items:
            _jpeg(base / "images" / f"{name}.jpg", (250, 0, 0) if c == 1 else (0, 0, 250), size=(60 + c * 10, 40))
    train = get_dataset("pets", "trainval", resolution=32, data_root=tmp_path, **IDENTITY)
    assert train.targets.tolist() == [0, 1, 0] and train.classes[:2] == ["Abyssinian", "American Bulldog"]
    x, y = train[1]
    assert x.shape == (3, 32, 32) and x[2].mean() > 0.9 and x[0].mean() < 0.1
    assert get_dataset("pets", "test", data_root=tmp_path).targets.tolist() == [1, 0]
    assert num_classes("pets") == 37


def test_flowers102_layout(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    labels = np.array([1, 2, 1, 3, 2, 3, 1, 2])  # 1-based classes of image_00001..8
    savemat(base / "imagelabels.mat" if base.mkdir() is None else None, {"labels": labels[None, :]})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2, 4]]), "valid": np.array([[3, 5]]),
                                 "tstid": np.array([[6, 7, 8]])})
    for i, label in enumerate(labels, start=1):
        _jpeg(base / "jpg" / f"image_{i:05d}.jpg", (label * 80, 10, 10), size=(50, 40 + i))
    splits = {s: get_dataset("flowers102", s, resolution=24, data_root=tmp_path) for s in ("train", "val", "test")}
    assert splits["train"].targets.tolist() == [0, 1, 2] and splits["val"].targets.tolist() == [0, 1]
    assert splits["test"].targets.tolist() == [2, 0, 1]
    assert len(get_dataset("flowers102", "trainval", resolution=24, data_root=tmp_path)) == 5
    assert num_classes("flowers102") == 102


def test_cub200_layout(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    items = [(1, classes[0], 1), (2, classes[0], 0), (3, classes[1], 1), (4, classes[1], 0), (5, classes[1], 1)]
    base.mkdir()
    (base / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    (base / "images.txt").write_text("".join(f"{i} {c}/img_{i}.jpg\n" for i, c, _ in items))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {classes.index(c) + 1}\n" for i, c, _ in items))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in items))
    for i, c, _ in items:
        _jpeg(base / "images" / c / f"img_{i}.jpg", (0, 200, 0), size=(30 + i, 20))
    train = get_dataset("cub200", "trainval", resolution=16, data_root=tmp_path)
    assert train.targets.tolist() == [0, 1, 1] and train.classes[1] == "002.Laysan_Albatross"
    assert get_dataset("cub200", "test", resolution=16, data_root=tmp_path).targets.tolist() == [0, 1]
    assert num_classes("cub200") == 200


# ------------------------------------------------------------------------------------------ 5-datasets parts
def _write_idx(path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_five_dataset_parts(root, per_class=3):
    """MNIST + Fashion-MNIST (gzipped idx), SVHN (.mat), notMNIST (png folders): tiny but real formats."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for folder in ("MNIST/raw", "FashionMNIST/raw"):
        for prefix, n in (("train", 10 * per_class), ("t10k", 10 * per_class)):
            _write_idx(root / folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
            _write_idx(root / folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    (root / "SVHN").mkdir()
    for split in ("train", "test"):
        n = 10 * per_class
        savemat(root / "SVHN" / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                                        "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})
    for letter in "ABCDEFGHIJ":
        for i in range(2 * per_class):
            img = Image.fromarray(rng.integers(0, 256, (28, 28)).astype(np.uint8), mode="L")
            (root / "notMNIST_small" / letter).mkdir(parents=True, exist_ok=True)
            img.save(root / "notMNIST_small" / letter / f"{i}.png")


def test_mnist_svhn_notmnist_formats(tmp_path):
    write_five_dataset_parts(tmp_path)
    mnist = get_dataset("mnist", "test", data_root=tmp_path, **IDENTITY)
    assert len(mnist) == 30 and mnist.targets[:12].tolist() == list(range(10)) + [0, 1]
    assert mnist.resolution == 28 and torch.equal(mnist.raw_images([0])[:, 0], mnist.raw_images([0])[:, 2])
    svhn = get_dataset("svhn", "trainval", data_root=tmp_path)
    assert svhn.targets[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # label 10 means digit 0
    notmnist = get_dataset("notmnist", "test", data_root=tmp_path, resolution=32)
    assert notmnist.classes == list("ABCDEFGHIJ") and notmnist[0][0].shape == (3, 32, 32)
    assert get_dataset("fashion-mnist", "train", data_root=tmp_path).classes[0] == "T-shirt/top"


def test_image_files_under_keeps_the_order_of_sorted_rglob(tmp_path):
    """Names that sort differently as strings and as path components ('a-b' < 'a/b' as text, 'a/…' first
    by components), upper case, nested folders, non-images, a folder named like an image, a symlinked
    file (kept) and a symlinked folder (not followed, as rglob does)."""
    root = tmp_path / "cls"
    for rel in ["a/b.png", "a-b.png", "a/c/d.JPG", "B.jpeg", "b.png", "z.txt", "a0.png", "a/c.png/inner.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"x")
    os.symlink(outside / "o.png", root / "link.png")
    os.symlink(outside, root / "linked_dir")
    expected = [f for f in sorted(root.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    got = image_files_under(root)
    assert got == expected
    assert [str(p.relative_to(root)) for p in got] == [
        "B.jpeg", "a/b.png", "a/c/d.JPG", "a/c.png/inner.png", "a-b.png", "a0.png", "b.png", "link.png"]
