"""What a run's frozen config records about where it ran: package versions, git commit, device."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("lance-lab", "torch", "torchvision", "numpy", "pillow", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path = REPO_ROOT) -> dict[str, str | bool | None]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout the engine runs from."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
        dirty = None
        if sha:
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout
            dirty = bool(status.strip())
        return {"commit": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info(device: str) -> dict[str, str | int | None]:
    info: dict[str, str | int | None] = {"device": device, "threads": torch.get_num_threads(),
                                         "platform": platform.platform(), "cpu": platform.processor() or None}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def provenance(device: str) -> dict:
    return {"versions": package_versions(), "git": git_commit(), "device": device_info(device),
            "argv": list(sys.argv)}
