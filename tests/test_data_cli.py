"""`lance backbones` / `lance datasets`: what exists, what is here, how to get the rest."""
from __future__ import annotations

import json

import torch

from engine.cli import main
from engine.models import backbone_spec, build_backbone


def test_lance_backbones_json_lists_local_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "weights" / "resnet18"
    folder.mkdir(parents=True)
    filename = backbone_spec("resnet18").weights.file_names[0]
    torch.save(build_backbone("resnet18", weights="none").model.state_dict(), folder / filename)
    assert main(["backbones", "--json", "--weights-dir", str(tmp_path / "weights")]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["backbones"]}
    assert {"mcunet-in3", "mobilenet_v2", "resnet18", "resnet34", "swin_t", "vit-tiny", "small-cnn", "alexnet-cl",
            "resnet18-reduced"} <= set(rows)
    assert rows["resnet18"]["available"] and rows["resnet18"]["imagenet_weights"].endswith(filename)
    assert not rows["resnet34"]["available"] and str(tmp_path / "weights") in rows["resnet34"]["how_to_get"]
    assert rows["small-cnn"]["available"] and not rows["small-cnn"]["pretrained"]
    assert rows["vit-tiny"]["linear_input"] == "3-D" and rows["swin_t"]["linear_input"] == "4-D"
    assert main(["backbones"]) == 0
    assert "mcunet-in3" in capsys.readouterr().out


def test_lance_datasets_json_and_table(tmp_path, capsys):
    (tmp_path / "cifar10-jpeg" / "train" / "cat").mkdir(parents=True)
    assert main(["datasets", "--json", "--data-root", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["datasets"]}
    assert out["data_roots"] == [str(tmp_path)]
    assert rows["digits"]["available"] and rows["cifar10-jpeg"]["available"]
    assert not rows["cifar10"]["available"] and "lance datasets --download cifar10" in rows["cifar10"]["how_to_get"]
    assert rows["cifar10"]["looked_in"] == [str(tmp_path / "cifar-10-batches-py")]
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "MISSING" in table and "imagefolder:PATH" in table


def test_lance_datasets_download_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LANCE_OFFLINE", "1")
    assert main(["datasets", "--download", "cifar10", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "download of cifar10 failed" in err and "LANCE_OFFLINE" in err
    assert main(["datasets", "--download", "notmnist", "--data-root", str(tmp_path)]) == 1
    assert "cannot be downloaded automatically" in capsys.readouterr().err
