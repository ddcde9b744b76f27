"""``--resume``: the stored config of a run, its end-of-epoch checkpoint, and loading it back.

``resume_config(store, run_id, epochs)`` checks up front that a run can be continued (a clear
ConfigError when not); ``save_epoch`` writes the checkpoint after every epoch
(engine.train.checkpoint: tensors and plain data only); ``restore`` loads one into a fresh trainable.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

import engine
from engine.train.checkpoint import load_checkpoint, save_checkpoint
from engine.train.config import ConfigError, FinetuneConfig
from engine.train.loop import LoopState
from engine.train.prepare import Workbench
from engine.train.trainable import Trainable


def resume_config(store, run_id: str, epochs: int | None = None) -> FinetuneConfig:
    """The stored config of ``run_id`` (optionally with more epochs), for ``--resume``."""
    run = store.find_run(run_id)
    if run["kind"] != "finetune":
        raise ConfigError(f"run {run['id']} is a {run['kind']} run; --resume continues fine-tuning runs")
    config = FinetuneConfig.from_dict(run["config"])
    config.methods = [run["method"]]
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"--epochs must be a whole number >= 1, got {epochs!r}")
        config.epochs = epochs
    if run["status"] == "running":
        raise ConfigError(f"run {run['id']} is still running (pid {run['pid']}); stop it first")
    if run["status"] == "completed" and (run.get("summary") or {}).get("epochs_done", 0) >= config.epochs:
        raise ConfigError(f"run {run['id']} already completed its {config.epochs} epochs; "
                          "give --epochs N with a larger N to train it further")
    if not (store.checkpoint_path(run["id"])).is_file():
        raise ConfigError(f"run {run['id']} has no checkpoint (it stopped before its first epoch ended); "
                          "start a new run instead")
    ckpt = load_checkpoint(store.checkpoint_path(run["id"]))  # refuses a foreign or planted file up front
    done = int(ckpt.get("epoch", 0))
    if config.epochs <= done:
        stored = int(run["config"].get("epochs", config.epochs))
        raise ConfigError(f"run {run['id']} has finished {done} of its {stored} epochs; --epochs {config.epochs} "
                          f"would train none. Give --epochs N with N > {done} (or leave it out to finish the "
                          f"stored {stored})")
    return config


def save_epoch(path: Path, bench: Workbench, method: str, trainable: Trainable, optimizer, scheduler,
               state: LoopState) -> None:
    """The checkpoint after an epoch: the compressed model (resume) and the plain one (``lance evaluate``)."""
    plain = copy.deepcopy(trainable.wrapper.model)
    engine.restore_model(plain)
    config = bench.config
    save_checkpoint(path, {
        "method": method, "epoch": state.epoch, "step": state.step,
        "model": trainable.wrapper.state_dict(), "plain_model": plain.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "layers": bench.layer_names,
        "num_classes": bench.num_classes, "class_names": bench.class_names,
        "backbone": config.backbone, "weights": config.weights,
    })


def restore(path: Path, trainable: Trainable, optimizer, scheduler, epochs: int) -> LoopState:
    """Load the checkpoint at ``path`` into a freshly built trainable, its optimizer and schedule
    (stretched to ``epochs``); returns where the loop goes on."""
    ckpt = load_checkpoint(path)
    trainable.wrapper.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.T_max = epochs
    torch.set_rng_state(ckpt["torch_rng"])
    return LoopState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]))
