"""Evaluate a stored fine-tuning run on any dataset with the same classes (``lance evaluate``)."""
from __future__ import annotations

from typing import Any

from engine.data import get_dataset
from engine.models import build_backbone
from engine.train.checkpoint import load_checkpoint
from engine.train.config import ConfigError
from engine.train.data import DatasetBatches, seeded_subset
from engine.train.loop import evaluate


def load_trained_model(store, run_ref: str):
    """(run record, plain backbone with the run's last checkpointed weights, Backbone, checkpoint)."""
    run = store.find_run(run_ref)
    if run["kind"] != "finetune":
        raise ConfigError(f"run {run['id']} is a {run['kind']} run; lance evaluate reads fine-tuning runs")
    ckpt = load_checkpoint(store.checkpoint_path(run["id"]))
    config = run["config"]
    backbone = build_backbone(config["backbone"], weights="none", num_classes=int(ckpt["num_classes"]))
    backbone.model.load_state_dict(ckpt["plain_model"])
    return run, backbone, ckpt


def evaluate_run(store, run_ref: str, dataset: str, split: str = "test", data_root: str | None = None,
                 limit: int | None = None, batch_size: int = 256, device: str = "cpu") -> dict[str, Any]:
    """Top-1 accuracy (percent) and mean loss of the run's model on ``dataset``/``split``.

    The dataset must have the run's classes (same number; same names where both have names).
    """
    run, backbone, ckpt = load_trained_model(store, run_ref)
    config = run["config"]
    resolution = config.get("resolution") or backbone.resolution
    data = get_dataset(dataset, split=split, resolution=resolution, mean=backbone.mean, std=backbone.std,
                       data_root=data_root, seed=int(config.get("seed", 0)), augment=False)
    names = getattr(data, "classes", None)
    trained_names = ckpt.get("class_names")
    if names is not None and len(names) != ckpt["num_classes"]:
        raise ConfigError(f"{dataset} has {len(names)} classes, run {run['id']} was trained on "
                          f"{ckpt['num_classes']}; evaluate on a dataset with the same classes")
    if names is not None and trained_names and list(names) != list(trained_names):
        raise ConfigError(f"{dataset}'s classes {list(names)[:6]}... differ from the run's "
                          f"{list(trained_names)[:6]}...; "
                          "evaluate on a dataset with the same classes in the same order")
    data = seeded_subset(data, limit, int(config.get("seed", 0)) + 2)
    model = backbone.model.to(device)
    result = evaluate(model, DatasetBatches(data, batch_size, shuffle=False)(0), device)
    return {"run_id": run["id"], "method": run["method"], "backbone": config.get("backbone"), "dataset": dataset,
            "split": split, "accuracy": result["acc"], "loss": result["loss"], "samples": result["samples"]}
