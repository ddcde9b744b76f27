"""Shared test fixtures: where ../shared is, a per-test run store, deterministic torch."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: no spinning OpenMP threads

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LANCE_SHARED", REPO_ROOT.parent / "shared"))
CIFAR10_JPEG = SHARED / "datasets" / "cifar10-jpeg"
MCUNET_IN3_DIR = SHARED / "weights" / "mcunet-in3"

needs_cifar10_jpeg = pytest.mark.skipif(
    not (CIFAR10_JPEG / "train").is_dir(),
    reason=f"real CIFAR-10 JPEGs not found at {CIFAR10_JPEG} (../shared is only on developer/CI machines)",
)
needs_mcunet_weights = pytest.mark.skipif(
    not (MCUNET_IN3_DIR / "mcunet-in3_imagenet.pth").is_file(),
    reason=f"MCUNet-in3 ImageNet weights not found at {MCUNET_IN3_DIR} (../shared is only on developer/CI machines)",
)


@pytest.fixture(autouse=True)
def _lance_home(tmp_path, monkeypatch):
    """Every test gets its own run store so tests never see each other's runs."""
    monkeypatch.setenv("LANCE_HOME", str(tmp_path / "lance_home"))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """Small nets run fastest single-threaded on a shared CPU (2 threads oversubscribe it):
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
