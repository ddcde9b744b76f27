"""channels_last where it is faster (CPU: the feature cache's prefix; a trained suffix of a method in
``CHANNELS_LAST_METHODS``, none by default now): the same numbers as NCHW, the layout really used, and
``--no-channels-last`` / ``LANCE_CHANNELS_LAST=0`` turn it off."""
from __future__ import annotations

import pytest
import torch

from engine.data import get_dataset
from engine.data.feature_cache import cached_features, feature_key, use_channels_last
from engine.models import build_backbone, split_at_stage
from engine.store import RunStore
from engine.train import data as train_data
from engine.train.config import FinetuneConfig
from engine.train.data import suffix_channels_last
from engine.train.prepare import prepare
from engine.train.session import run_finetune
from engine.train.trainable import build_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(backbone="small-cnn", dataset="digits", layers=3, epochs=2, batch_size=32, limit_train=128,
              limit_val=64, seed=5)


def test_the_layout_rule(monkeypatch):
    monkeypatch.delenv("LANCE_CHANNELS_LAST", raising=False)
    assert use_channels_last("cpu") and not use_channels_last("cuda")
    assert train_data.CHANNELS_LAST_METHODS == ()  # every trained suffix is NCHW by default (docs/speed.md)
    assert not suffix_channels_last("vanilla", "cpu")
    monkeypatch.setattr(train_data, "CHANNELS_LAST_METHODS", ("vanilla",))
    assert suffix_channels_last("vanilla", "cpu") and not suffix_channels_last("vanilla", "cpu", enabled=False)
    assert not suffix_channels_last("asi", "cpu") and not suffix_channels_last("lance", "cpu")
    monkeypatch.setenv("LANCE_CHANNELS_LAST", "0")
    assert not use_channels_last("cpu") and not suffix_channels_last("vanilla", "cpu")
    monkeypatch.setenv("LANCE_CHANNELS_LAST", "1")
    assert use_channels_last("cuda")


def test_prefix_features_agree_in_both_layouts():
    torch.manual_seed(0)
    bb = build_backbone("small-cnn", weights=None, num_classes=10)
    data = get_dataset("digits", "train", bb.resolution, bb.mean, bb.std)
    prefix, _ = split_at_stage(bb.model.eval(), 2)
    key = feature_key("small-cnn", "none", "digits", "train", bb.resolution, 2)
    nchw = cached_features(prefix, data, key, channels_last=False, use_disk=False).features
    last = cached_features(prefix, data, key, channels_last=True, use_disk=False).features
    assert nchw.shape[1:] == last.shape[1:] and nchw.dim() == 4 and nchw.abs().max() > 0
    assert torch.allclose(nchw, last, rtol=1e-5, atol=1e-6)
    assert all(p.is_contiguous() for p in prefix.parameters())  # the prefix is handed back as it came


def test_vanilla_trains_the_same_in_channels_last_and_uses_it(monkeypatch):
    """The suffix mechanism, with vanilla put in ``CHANNELS_LAST_METHODS``: same numbers, the layout really used."""
    monkeypatch.setattr(train_data, "CHANNELS_LAST_METHODS", ("vanilla",))
    store = RunStore()
    runs = {}
    for layout in (True, False):
        runs[layout] = run_finetune(FinetuneConfig(methods=["vanilla"], channels_last=layout, **CONFIG), store=store)[0]
    a, b = runs[True].summary, runs[False].summary
    assert runs[True].status == runs[False].status == "completed"
    assert a["val_acc"] == b["val_acc"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    losses = {k: [r["value"] for r in store.metrics(v.run_id) if r["key"] == "loss" and r["split"] == "train"]
              for k, v in runs.items()}
    assert len(losses[True]) == 2 * 4 and losses[True] == pytest.approx(losses[False], rel=1e-5)

    bench = prepare(FinetuneConfig(methods=["vanilla", "asi"], **CONFIG))
    vanilla = build_trainable(bench, "vanilla")
    convs = [p for p in vanilla.params if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert vanilla.wrapper.memory_format == torch.channels_last
    asi = build_trainable(bench, "asi")
    assert asi.wrapper.memory_format == torch.contiguous_format
    assert all(p.is_contiguous() for p in asi.params)
    off = build_trainable(prepare(FinetuneConfig(methods=["vanilla"], channels_last=False, **CONFIG)), "vanilla")
    assert off.wrapper.memory_format == torch.contiguous_format
    monkeypatch.setattr(train_data, "CHANNELS_LAST_METHODS", ())
    default = build_trainable(prepare(FinetuneConfig(methods=["vanilla"], **CONFIG)), "vanilla")
    assert default.wrapper.memory_format == torch.contiguous_format
