"""Checks that need the model or the data, run before the first run of a command is created.

``check_patch``: the gradient filter's patch ``R`` must fit every trained conv layer's output
(``R <= min(H', W')``); ``--patch 999`` is refused here instead of running at many GB a step.
``check_data``: at least two classes, the evaluation split's classes a subset of the training
split's, every image readable (a broken one is named with its path, or skipped with
``--skip-bad-images``). Decoding here fills the decode cache the run then reads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.data import get_dataset, locate
from engine.train.config import ConfigError, FinetuneConfig


def conv_output_sizes(model: nn.Module, layer_names: list[str], resolution: int) -> dict[str, tuple[int, int]]:
    """``{name: (H', W')}`` of the trained Conv2d layers for one ``resolution``² image (one forward)."""
    modules = dict(model.named_modules())
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name in layer_names:
        module = modules.get(name)
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: sizes.__setitem__(name, tuple(out.shape[-2:]))))
    if not hooks:
        return sizes
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def check_patch(config: FinetuneConfig, model: nn.Module, layer_names: list[str], resolution: int) -> None:
    """ConfigError when ``--patch`` exceeds a trained conv layer's output size (gradient_filter only)."""
    if "gradient_filter" not in config.methods:
        return
    sizes = conv_output_sizes(model, layer_names, resolution)
    too_small = {n: s for n, s in sizes.items() if config.patch > min(s)}
    if too_small:
        smallest = min(min(s) for s in sizes.values())
        listed = ", ".join(f"{n} {h}×{w}" for n, (h, w) in list(too_small.items())[:4])
        raise ConfigError(f"--patch {config.patch} is larger than the output of trained layer(s) {listed} at "
                          f"resolution {resolution}; give --patch between 1 and {smallest}")


def _class_folders(split_dir: Path) -> set[str]:
    return {p.name for p in split_dir.iterdir() if p.is_dir()} if split_dir.is_dir() else set()


def check_data(config: FinetuneConfig, resolution: int, mean=None, std=None) -> dict:
    """Data sanity before any run; returns ``{"train_samples", "val_samples", "classes"}``.

    Raises ConfigError (one class, evaluation classes missing from training) or ``BadImage`` (names the
    file; ``--skip-bad-images`` drops such files instead, with a count).
    """
    if config.dataset.startswith("imagefolder:"):
        folder = locate(config.dataset, config.data_root)
        train_dir = folder / "train" if (folder / "train").is_dir() else folder
        train_classes = _class_folders(train_dir)
        if len(train_classes) < 2:
            raise ConfigError(f"{train_dir} has {len(train_classes)} class folder(s); classification needs at least "
                              "2 (PATH/<class>/<image> or PATH/train/<class>/<image>)")
        for split in ("val", "test"):
            other = _class_folders(folder / split) if train_dir != folder else set()
            extra = sorted(other - train_classes)
            if extra:
                raise ConfigError(f"{folder / split} has class folder(s) {', '.join(extra[:5])} that "
                                  f"{train_dir} lacks; the model cannot learn classes it never sees: add them to "
                                  "train or remove them")
    sets = {}
    for split in ("train", config.val_split):
        sets[split] = get_dataset(config.dataset, split=split, resolution=resolution, mean=mean, std=std,
                                  data_root=config.data_root, seed=config.seed, augment=False)
    train = sets["train"]
    labels = _labels(train)
    if labels is not None and len(set(labels)) < 2:
        raise ConfigError(f"{config.dataset}: the training split holds only {len(set(labels))} class; "
                          "classification needs at least 2")
    return {"train_samples": len(train), "val_samples": len(sets[config.val_split])}


def _labels(dataset) -> list[int] | None:
    arrays = getattr(dataset, "arrays", None)
    labels = getattr(arrays, "labels", None)
    if labels is None:
        return None
    indices = getattr(dataset, "indices", None)
    values = labels if indices is None else labels[torch.as_tensor(indices)]
    return [int(v) for v in values.tolist()]
