"""Continual-learning task splits and the frozen-prefix feature cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.data import DatasetMissing, get_dataset
from engine.data.continual import task_splits
from engine.data.feature_cache import FeatureDataset, cache_model_features, cached_features, feature_key
from engine.models import build_backbone, split_at_stage

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_digits_tasks_are_disjoint_seeded_and_remapped():
    tasks = task_splits("split-digits", resolution=32, seed=0)
    assert len(tasks) == 5 and all(t.num_classes == 2 for t in tasks)
    assert sorted(c for t in tasks for c in t.classes) == list(range(10))
    full_test = get_dataset("digits", "test")
    for t in tasks:
        assert set(t.train.targets.tolist()) == {0, 1} and set(t.test.targets.tolist()) == {0, 1}
        # a task's test images are exactly the test images of its original classes, labels remapped
        originals = full_test.targets.numpy()
        expected = int(np.isin(originals, t.classes).sum())
        assert len(t.test) == expected
        raw = full_test.targets[np.isin(originals, t.classes)]
        assert t.test.targets.tolist() == [t.classes.index(int(c)) for c in raw]
        assert t.train[0][0].shape == (3, 32, 32)
    again = task_splits("split-digits", seed=0)
    other = task_splits("split-digits", seed=1)
    assert [t.classes for t in again] == [t.classes for t in tasks]
    assert [t.classes for t in other] != [t.classes for t in tasks]


def test_split_cifar10_from_an_image_folder_and_cifar100_from_pickles(tmp_path):
    import pickle

    root = tmp_path / "cifar10-like"
    for split, n in (("train", 3), ("test", 2)):
        for c in range(10):
            for i in range(n):
                (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (c * 25, i * 60, 0)).save(root / split / f"class{c}" / f"{i}.png")
    tasks = task_splits("split-cifar10", dataset=f"imagefolder:{root}", seed=3)
    assert len(tasks) == 5 and [len(t.test) for t in tasks] == [4] * 5
    assert sorted(c for t in tasks for c in t.classes) == list(range(10))
    t0 = tasks[0]
    assert t0.class_names == [f"class{c}" for c in t0.classes]
    # images keep the folder order (by original class); labels are positions in t0.classes
    expected = [0, 0, 1, 1] if t0.classes[0] < t0.classes[1] else [1, 1, 0, 0]
    assert t0.test.targets.tolist() == expected
    x, y = t0.test[0]
    assert x.shape == (3, 32, 32)
    raw = t0.test.raw_images([0])[0, :, 0, 0].tolist()
    assert raw[0] == 25 * t0.classes[y]  # red channel encodes the original class

    folder = tmp_path / "c100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 300), ("test", 100)):
        with open(folder / name, "wb") as f:
            pickle.dump({"fine_labels": [i % 100 for i in range(n)], "coarse_labels": [0] * n,
                         "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    tasks100 = task_splits("split-cifar100", data_root=tmp_path / "c100")
    assert len(tasks100) == 10 and all(len(t.classes) == 10 and len(t.test) == 10 for t in tasks100)
    assert sorted(c for t in tasks100 for c in t.classes) == list(range(100))
    with pytest.raises(ValueError, match="has 10 classes; this benchmark needs 100"):
        task_splits("split-cifar100", dataset=f"imagefolder:{root}")
    with pytest.raises(ValueError, match="unknown benchmark"):
        task_splits("split-mnist")


def test_five_datasets_present_and_missing(tmp_path):
    from test_data import write_five_dataset_parts

    with pytest.raises(DatasetMissing) as info:
        task_splits("5-datasets", data_root=tmp_path)
    text = str(info.value)
    for part in ("cifar10", "mnist", "svhn", "fashion-mnist", "notmnist"):
        assert f"- {part}:" in text
    write_five_dataset_parts(tmp_path)
    cifar = tmp_path / "c10"
    for split in ("train", "test"):
        for c in range(10):
            (cifar / split / str(c)).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (c, i, 9)).save(cifar / split / str(c) / f"{i}.png")
    with pytest.raises(DatasetMissing, match="missing parts: cifar10"):
        task_splits("5-datasets", data_root=tmp_path)
    tasks = task_splits("5-datasets", dataset=f"imagefolder:{cifar}", data_root=tmp_path, seed=0)
    assert sorted(t.dataset for t in tasks) == sorted(["fashion-mnist", "imagefolder:" + str(cifar), "mnist",
                                                       "notmnist", "svhn"])
    assert all(t.num_classes == 10 and t.test[0][0].shape == (3, 32, 32) for t in tasks)


# ------------------------------------------------------------------------------------------ feature cache
def _frozen_small_cnn():
    torch.manual_seed(0)
    model = build_backbone("small-cnn", weights="none", num_classes=10).model
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.block3.parameters():
        p.requires_grad_(True)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def test_feature_cache_same_loss_memory_and_disk(tmp_path):
    model = _frozen_small_cnn()
    data = get_dataset("digits", "train", resolution=32)
    key = feature_key("small-cnn", "none", "digits", "train", 32, None)
    feats, prefix, suffix, cut = cache_model_features(model, data, key)
    assert cut == 2 and suffix.names == ["block3", "head"] and isinstance(feats.features, torch.Tensor)
    assert feats.feature_shape == (32, 16, 16) and len(feats) == len(data)
    on_disk = cached_features(prefix, data, {**key, "cut": cut}, use_disk=True)
    assert on_disk.path is not None and on_disk.path.is_file() and not isinstance(on_disk.features, torch.Tensor)
    model.train()  # BN of the frozen prefix stays put only in eval mode: the cache runs the prefix in eval
    loader = torch.utils.data.DataLoader(data, batch_size=50, shuffle=False)
    x, y = next(iter(loader))
    prefix.eval()
    suffix.train()
    loss_full = nn.functional.cross_entropy(suffix(prefix(x)), y)
    for cache in (feats, on_disk):
        f, y_cached = next(iter(torch.utils.data.DataLoader(cache, batch_size=50, shuffle=False)))
        assert torch.equal(y, y_cached)
        loss_cached = nn.functional.cross_entropy(suffix(f), y_cached)
        assert torch.allclose(loss_full, loss_cached, atol=1e-6)
    # a later run with the same key reads the file; a changed prefix gets a new entry
    again = cached_features(prefix, data, {**key, "cut": cut}, use_disk=True)
    assert again.path == on_disk.path
    with torch.no_grad():
        model.block1.conv.weight.mul_(1.5)
    changed = cached_features(prefix, data, {**key, "cut": cut}, use_disk=True)
    assert changed.path != on_disk.path
    assert not torch.allclose(changed.batch([0])[0], on_disk.batch([0])[0])


def test_feature_cache_training_matches_uncached_training():
    """Three SGD steps on the suffix from cached features == three steps on the full model."""
    data = get_dataset("digits", "val", resolution=32)
    results = []
    for use_cache in (False, True):
        model = _frozen_small_cnn()
        prefix, suffix = split_at_stage(model, 2)
        feats = cached_features(prefix, data, feature_key("small-cnn", "none", "digits", "val", 32, 2))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.eval()  # BN statistics frozen everywhere (what compress_model's train_mode does for frozen parts)
        for step in range(3):
            positions = range(step * 32, step * 32 + 32)
            if use_cache:
                f, y = feats.batch(positions)
                out = suffix(f)
            else:
                x, y = data.batch(positions)
                out = model(x)
            opt.zero_grad()
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
        results.append(model.classifier.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_feature_cache_refuses_augmented_data():
    model = _frozen_small_cnn()
    prefix, _ = split_at_stage(model, 2)
    with pytest.raises(ValueError, match="without augmentation"):
        cached_features(prefix, get_dataset("digits", "train", augment=True), {"k": 1})
    assert isinstance(cached_features(prefix, get_dataset("digits", "val", resolution=32), {"k": 1}), FeatureDataset)
