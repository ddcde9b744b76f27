"""Continual-learning task splits (task-incremental: one head per task, labels 0..k-1 per task).

Benchmarks:
- ``split-cifar10``: 5 tasks x 2 classes of CIFAR-10 (or ``dataset``: any 10-class dataset, e.g.
  ``imagefolder:../shared/datasets/cifar10-jpeg``);
- ``split-cifar100``: 10 tasks x 10 classes of CIFAR-100 (or any 100-class ``dataset``);
- ``split-digits``: 5 tasks x 2 classes of scikit-learn's digits (always available);
- ``5-datasets``: one 10-class task each of CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST (all
  parts must be present; ``dataset`` replaces the CIFAR-10 part).
The class order (and the order of the 5 datasets) is a permutation seeded by ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import get_dataset, locate, num_classes
from .arrays import ArrayImageDataset
from .errors import DatasetMissing

BENCHMARKS = {
    "split-cifar10": ("cifar10", 5, 2),
    "split-cifar100": ("cifar100", 10, 10),
    "split-digits": ("digits", 5, 2),
    "5-datasets": (None, 5, 10),
}
FIVE_DATASETS = ["cifar10", "mnist", "svhn", "fashion-mnist", "notmnist"]
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass
class Task:
    """One task: ``classes`` are the original labels (task label i = classes[i]); datasets serve
    (x: (3, R, R) float32, y in 0..len(classes)-1)."""

    index: int
    name: str
    dataset: str
    classes: list[int]
    class_names: list[str]
    train: ArrayImageDataset
    val: ArrayImageDataset
    test: ArrayImageDataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _select(ds: ArrayImageDataset, classes: list[int]) -> ArrayImageDataset:
    targets = ds.targets.numpy()
    positions = np.flatnonzero(np.isin(targets, classes))
    label_map = {old: new for new, old in enumerate(classes)}
    return ds.subset(positions, label_map=label_map, classes=[ds.classes[c] for c in classes])


def _class_split(name: str, n_tasks: int, per_task: int, data_root, resolution, seed, mean, std, augment,
                 max_per_class) -> list[Task]:
    total = num_classes(name, data_root)
    if total != n_tasks * per_task:
        raise ValueError(f"{name} has {total} classes; this benchmark needs {n_tasks * per_task} "
                         f"({n_tasks} tasks x {per_task})")
    splits = {s: get_dataset(name, s, resolution, mean, std, data_root, seed, augment if s == "train" else False,
                             max_per_class) for s in ("train", "val", "test")}
    order = np.random.default_rng(seed).permutation(total).tolist()
    tasks = []
    for t in range(n_tasks):
        classes = order[t * per_task:(t + 1) * per_task]
        parts = {s: _select(ds, classes) for s, ds in splits.items()}
        tasks.append(Task(t, f"task {t}: {', '.join(parts['train'].classes)}", name, classes,
                          parts["train"].classes, parts["train"], parts["val"], parts["test"]))
    return tasks


def task_splits(benchmark: str, dataset: str | None = None, data_root=None, resolution: int = 32, seed: int = 0,
                mean=None, std=None, augment: bool = False, max_per_class: int | None = None) -> list[Task]:
    """The tasks of ``benchmark`` in training order. Raises DatasetMissing when data is absent."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}")
    default, n_tasks, per_task = BENCHMARKS[benchmark]
    mean, std = mean or CIFAR_MEAN, std or CIFAR_STD
    if benchmark != "5-datasets":
        return _class_split(dataset or default, n_tasks, per_task, data_root, resolution, seed, mean, std, augment,
                            max_per_class)
    parts = [dataset or "cifar10"] + FIVE_DATASETS[1:]
    missing = []
    for part in parts:
        try:
            locate(part, data_root)
        except DatasetMissing as error:
            missing.append(error)
    if missing:
        lines = "\n".join(f"- {e.name}: looked in {', '.join(e.looked_in)}; {e.how}" for e in missing)
        raise DatasetMissing("5-datasets", [p for e in missing for p in e.looked_in],
                             "every part must be present:\n" + lines,
                             f"missing parts: {', '.join(e.name for e in missing)}")
    order = np.random.default_rng(seed).permutation(len(parts)).tolist()
    tasks = []
    for t, p in enumerate(order):
        part = parts[p]
        splits = {s: get_dataset(part, s, resolution, mean, std, data_root, seed, augment if s == "train" else False,
                                 max_per_class) for s in ("train", "val", "test")}
        classes = list(range(10))
        tasks.append(Task(t, f"task {t}: {part}", part, classes, splits["train"].classes, splits["train"],
                          splits["val"], splits["test"]))
    return tasks
