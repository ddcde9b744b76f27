"""Untrusted files: planted pickles as checkpoints, old checkpoints, weights checked against SHA-256."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import MCUNET_IN3_DIR, needs_mcunet_weights

from engine.cli import main
from engine.models.weights import (
    KNOWN_SHA256,
    WeightsChecksumError,
    WeightsMissing,
    download,
    sha256_of,
    verify_sha256,
)
from engine.store import RunStore
from engine.train.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint


class Planted:
    """Pickles to "run os.system(...)": loading it with weights_only=False would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "payload": Planted(marker)}, path)


def test_the_planted_pickle_really_runs_code_when_unpickled(tmp_path):
    """Guard for the tests below: the file is a real exploit (full unpickling creates the marker)."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_planted_checkpoint_is_refused_by_resume_evaluate_and_continual(tmp_path, capsys):
    marker = tmp_path / "pwned"
    store = RunStore()
    ft = store.create_run("finetune", "vanilla", {"backbone": "small-cnn", "dataset": "digits", "methods": ["vanilla"],
                                                   "epochs": 3})
    store.set_status(ft, "interrupted", "stopped")
    cl = store.create_run("continual", "finetune", {"benchmark": "split-digits"})
    store.set_status(cl, "interrupted", "stopped")
    for run_id, fmt in ((ft, "lance-finetune"), (cl, "lance-continual")):
        plant(store.checkpoint_path(run_id), marker, version=2, format=fmt, epoch=1, step=1)
    commands = [["finetune", "--resume", ft, "--quiet"],
                ["evaluate", "--run", ft, "--dataset", "digits"],
                ["continual", "--resume", cl, "--quiet"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refusing to load" in err and "could run code" in err and "Traceback" not in err
    assert not marker.exists()
    assert store.get_run(ft)["status"] == "interrupted"  # refused before the run was claimed


def test_old_or_foreign_checkpoints_get_a_clear_refusal(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"version": 1, "model": {"w": torch.zeros(2)}}, old)
    with pytest.raises(CheckpointRefused, match="older or foreign"):
        load_checkpoint(old)
    foreign = tmp_path / "foreign.pt"
    torch.save([torch.zeros(1)], foreign)
    with pytest.raises(CheckpointRefused, match="not a lance checkpoint"):
        load_checkpoint(foreign)
    torn = tmp_path / "torn.pt"
    save_checkpoint(torn, {"model": {"w": torch.ones(3)}})
    torn.write_bytes(torn.read_bytes()[:40])
    with pytest.raises(CheckpointRefused, match="damaged"):
        load_checkpoint(torn)


def test_checkpoints_round_trip_tensors_and_plain_data(tmp_path):
    path = tmp_path / "ok.pt"
    rng = torch.get_rng_state()
    save_checkpoint(path, {"method": "asi", "epoch": 2, "step": 7, "torch_rng": rng, "class_names": ["a", "b"],
                           "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).state_dict()})
    data = load_checkpoint(path)
    assert data["epoch"] == 2 and data["class_names"] == ["a", "b"] and torch.equal(data["torch_rng"], rng)
    assert data["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_verify_sha256_accepts_the_right_hash_and_names_a_wrong_one(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    verify_sha256(f, sha256_of(f).upper())
    with pytest.raises(WeightsChecksumError, match="does not match the recorded"):
        verify_sha256(f, "0" * 64)


@needs_mcunet_weights
def test_recorded_hash_is_the_real_mcunet_in3_file():
    verify_sha256(MCUNET_IN3_DIR / "mcunet-in3_imagenet.pth", KNOWN_SHA256["mcunet-in3_imagenet.pth"])


def test_download_with_a_wrong_hash_never_lands(tmp_path, monkeypatch):
    monkeypatch.delenv("LANCE_OFFLINE", raising=False)
    bad = tmp_path / "served.pth"
    bad.write_bytes(b"not the published weights")
    target = tmp_path / "weights" / "mcunet-in3" / "mcunet-in3_imagenet.pth"
    with pytest.raises(WeightsChecksumError):
        download(bad.as_uri(), target)  # the recorded hash of that file name is checked
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert isinstance(WeightsChecksumError("x"), WeightsMissing)  # reported like missing weights
    good = tmp_path / "other.pth"
    good.write_bytes(b"abc")
    assert download(good.as_uri(), tmp_path / "w2" / "x.pth", sha256=sha256_of(good)).read_bytes() == b"abc"
