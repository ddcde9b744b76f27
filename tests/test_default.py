"""The built-in default: small-cnn-digits (bundled weights, pretrained on digits 0-4) fine-tuned on digits 5-9."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.data import get_dataset
from engine.models import build_backbone, bundled_weights
from engine.models.pretrain_default import DEFAULT_FILE, RECIPE, pretrain
from engine.train.config import DEFAULT_BACKBONE, DEFAULT_DATASET

REPO = Path(__file__).resolve().parents[1]
COMMITTED_SHA256 = "3f79387d23434787ea5ae55e7dfac690ee9e0d2c155e7d7ce07ebde8a83fad06"


def _predictions(model, dataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(dataset.batch(range(len(dataset)))[0]).argmax(1)


def test_bundled_weights_are_the_committed_file_and_installed_with_the_package():
    path = bundled_weights(DEFAULT_BACKBONE)
    assert path == DEFAULT_FILE and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == COMMITTED_SHA256
    assert path.stat().st_size < 200_000
    assert COMMITTED_SHA256 in (REPO / "data" / "README.md").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"engine.models" = ["pretrained/*.pt"]' in pyproject  # package data: `pip install .` ships it


def test_default_backbone_knows_digits_0_to_4_and_gets_a_fresh_head():
    pre = build_backbone(DEFAULT_BACKBONE, weights="bundled")          # the pretraining head, 5 classes
    test = get_dataset("digits-0to4", split="test", resolution=32, mean=pre.mean, std=pre.std)
    accuracy = float((_predictions(pre.model, test) == test.targets).float().mean())
    assert accuracy > 0.97
    torch.manual_seed(0)
    tuned = build_backbone(DEFAULT_BACKBONE, num_classes=5)            # default weights, fresh seeded head
    assert tuned.weights == str(DEFAULT_FILE)
    assert not torch.equal(tuned.model.classifier.weight, pre.model.classifier.weight)
    assert torch.equal(tuned.model.block1.conv.weight, pre.model.block1.conv.weight)
    # the fine-tune task is the five other digits: no class and no image in common
    assert get_dataset(DEFAULT_DATASET, split="train").classes == ["5", "6", "7", "8", "9"]


def test_pretrain_script_reproduces_the_bundled_network():
    """The committed recipe retrained here predicts like the committed file (bitwise equality would
    depend on the CPU's kernels, agreement on what it predicts does not)."""
    torch.set_num_threads(1)
    state, report = pretrain(RECIPE, log=lambda line: None)
    assert report["images"] == 901 and report["train_acc_last_epoch"] > 97
    fresh = build_backbone("small-cnn", weights="none", num_classes=5).model
    fresh.load_state_dict(state)
    bundled = build_backbone(DEFAULT_BACKBONE, weights="bundled").model
    images = get_dataset("digits-0to4", split="trainval", resolution=32)
    agree = float((_predictions(fresh, images) == _predictions(bundled, images)).float().mean())
    assert agree > 0.97


@pytest.mark.slow
def test_default_finetune_learns_and_asi_lance_stay_close_at_a_tenth_of_the_bytes(tmp_path):
    """`lance finetune --method vanilla,asi,lance`, nothing else: the issue's acceptance check."""
    out = tmp_path / "default.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine", "finetune", "--method", "vanilla,asi,lance",
                           "--quiet", "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["method"]: r for r in json.loads(out.read_text())["runs"]}
    assert all(r["status"] == "completed" for r in runs.values())
    vanilla = runs["vanilla"]
    assert vanilla["val_acc"] >= 85.0
    for method in ("asi", "lance"):
        assert runs[method]["val_acc"] >= vanilla["val_acc"] - 5.0, (method, runs[method]["val_acc"])
        ratio = vanilla["layer_activation_bytes"] / runs[method]["layer_activation_bytes"]
        assert ratio >= 10.0, (method, ratio)


@pytest.mark.parametrize("preset", sorted((REPO / "data" / "presets").glob("*.json")), ids=lambda p: p.stem)
def test_presets_parse_and_validate(preset):
    from engine.cli import build_parser
    from engine.cli.finetune import config_from_args
    from engine.train.config import validate

    data = json.loads(preset.read_text())
    assert data["description"] and data["argv"][0] in ("finetune", "continual")
    args = build_parser().parse_args(data["argv"])
    if data["argv"][0] == "finetune":
        missing = [need for need in data.get("needs", []) if not (REPO / need).exists()]
        if missing:
            pytest.skip(f"{preset.name} needs {', '.join(missing)} (../shared is only on developer/CI machines)")
        validate(config_from_args(args))


def test_cli_defaults_are_the_bundled_default():
    from engine.cli import build_parser
    from engine.cli.finetune import config_from_args

    config = config_from_args(build_parser().parse_args(["finetune", "--method", "vanilla,asi,lance"]))
    assert (config.backbone, config.dataset, config.weights) == ("small-cnn-digits", "digits-5to9", None)
    assert config.eps_for("lance") == 0.95
