"""What every method of one fine-tuning command shares: the seeded backbone, the data, the cut, the feature cache.

The frozen-prefix feature cache: everything before the stage that holds the first trained layer is
frozen and its BatchNorms are in eval mode, so (without augmentation) it gives the same output every
epoch. It runs once per command over the train and validation sets; the methods then train the
remaining stages (``engine.train.trainable.SuffixModel``) from those features. ``feature_cache=False``
runs whole images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from engine.data import get_dataset
from engine.data import num_classes as dataset_classes
from engine.data.feature_cache import feature_key
from engine.models import WeightsMissing, backbone_spec, build_backbone, split_at_stage, stage_of_layer
from engine.surgery import compressible_layers
from engine.train import preflight
from engine.train.config import ConfigError, FinetuneConfig
from engine.train.data import DatasetBatches, frozen_features, seeded_subset


@dataclass
class Workbench:
    """What every method of one command shares: pristine backbone, data, the cut, the feature cache."""

    config: FinetuneConfig
    model: nn.Module                  # pristine backbone, head already replaced (seeded)
    resolution: int
    num_classes: int
    class_names: list[str] | None
    layer_names: list[str]            # trained layers, names in the full model
    cut: int                          # first stage that runs during training
    train: Callable                   # epoch -> (x, y) batches
    val: Callable                     # () -> (x, y) batches
    steps_per_epoch: int
    train_samples: int
    val_samples: int
    input_shape: list[int]            # shape of one training input (features or image)
    prepare_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The run config's description of what it trained on (stored with ``store.update_config``)."""
        return {"num_classes": self.num_classes, "class_names": self.class_names, "layer_names": self.layer_names,
                "resolution": self.resolution, "cut_stage": self.cut,
                "input": "features" if self.cut > 0 else "images", "input_shape": self.input_shape,
                "train_samples": self.train_samples, "val_samples": self.val_samples,
                "steps_per_epoch": self.steps_per_epoch, "prepare_s": round(self.prepare_s, 3), **self.info}


def load_backbone(config: FinetuneConfig):
    """(model, Backbone, trained layer names): the seeded backbone with the dataset's head.

    Fast (no data): run before anything else so missing weights or too many layers fail at once.
    Raises ConfigError (weights missing, --layers too large).
    """
    classes = int(dataset_classes(config.dataset, data_root=config.data_root))
    torch.manual_seed(config.seed)
    try:
        backbone = build_backbone(config.backbone, weights=config.weights, num_classes=classes)
    except WeightsMissing as exc:
        raise ConfigError(str(exc)) from None
    names = list(compressible_layers(backbone.model))
    if config.layers > len(names):
        raise ConfigError(f"--layers {config.layers}: {config.backbone} has only {len(names)} compressible layers")
    return backbone.model, backbone, names[-config.layers:]


def resolution_of(config: FinetuneConfig) -> int:
    """``--resolution`` when given, else the backbone's own."""
    return config.resolution if config.resolution is not None else backbone_spec(config.backbone).resolution


def check_before_runs(config: FinetuneConfig) -> tuple[list[str], int]:
    """(trained layer names, resolution) once weights, ``--layers``, the patch and the data are checked:
    bad arguments fail (ConfigError) before any run exists."""
    model, backbone, layer_names = load_backbone(config)
    resolution = resolution_of(config) or backbone.resolution
    preflight.check_patch(config, model, layer_names, resolution)
    preflight.check_data(config, resolution, backbone.mean, backbone.std)
    return layer_names, resolution


def _class_names(dataset) -> list[str] | None:
    while dataset is not None and not hasattr(dataset, "classes") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return list(names) if names is not None else None


def prepare(config: FinetuneConfig, log: Callable[[str], None] = lambda s: None) -> Workbench:
    """Build the backbone (seeded head), load the data, cut the model and cache the prefix features."""
    start = time.perf_counter()
    model, backbone, layer_names = load_backbone(config)
    resolution = resolution_of(config) or backbone.resolution
    data = {"resolution": resolution, "mean": backbone.mean, "std": backbone.std, "data_root": config.data_root,
            "seed": config.seed, "augment": False}
    train_set = get_dataset(config.dataset, split="train", **data)
    val_set = get_dataset(config.dataset, split=config.val_split, **data)
    class_names = _class_names(train_set)
    num_classes = backbone.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ConfigError(f"{config.dataset}: {len(class_names)} class folders but {num_classes} classes expected")
    train_set = seeded_subset(train_set, config.limit_train, config.seed)
    val_set = seeded_subset(val_set, config.limit_val, config.seed + 1)
    cut = stage_of_layer(model, layer_names[0]) if config.feature_cache else 0
    info: dict[str, Any] = {"weights_source": backbone.weights}
    if cut > 0:
        prefix, _ = split_at_stage(model, cut)
        prefix = prefix.to(config.device)
        log(f"frozen-prefix features (stages 0..{cut - 1}) of {len(train_set)} train and {len(val_set)} "
            f"{config.val_split} images: computing once (or reading the feature cache)")
        key = (config.backbone, backbone.weights, config.dataset)
        layout = None if config.channels_last else False  # None: channels_last on CPU (engine.train.data)
        train_data, s_train = frozen_features(prefix, train_set, feature_key(
            *key, "train", resolution, cut, limit=config.limit_train, subset_seed=config.seed,
            data_root=config.data_root), config.device, channels_last=layout)
        val_data, s_val = frozen_features(prefix, val_set, feature_key(
            *key, config.val_split, resolution, cut, limit=config.limit_val, subset_seed=config.seed + 1,
            data_root=config.data_root), config.device, channels_last=layout)
        model.cpu()
        info["feature_cache_s"] = round(s_train + s_val, 3)
        input_shape = list(train_data[0][0].shape)
    else:
        train_data, val_data = train_set, val_set
        input_shape = list(train_set[0][0].shape)
    train = DatasetBatches(train_data, config.batch_size, seed=config.seed)
    val_source = DatasetBatches(val_data, config.batch_size, shuffle=False)
    return Workbench(config=config, model=model, resolution=resolution, num_classes=num_classes,
                     class_names=class_names, layer_names=layer_names, cut=cut, train=train,
                     val=lambda: val_source(0), steps_per_epoch=len(train), train_samples=len(train_set),
                     val_samples=len(val_set), input_shape=input_shape,
                     prepare_s=time.perf_counter() - start, info=info)
