"""Where pretrained weights come from: a local folder, the torch hub cache, or a download.

Search order for a backbone's ImageNet weights:
1. ``weights_dir`` argument, else ``$LANCE_WEIGHTS_DIR``, else ``$LANCE_HOME/weights`` (default
   ``<user data dir>/lance-lab/weights``); files directly in it or in ``<dir>/<backbone>/``;
2. the torch hub cache (``torch.hub.get_dir()/checkpoints``) for torchvision weights;
3. a download from the upstream URL into ``<dir>/<backbone>/`` when a network is there
   (never when ``$LANCE_OFFLINE=1``). A download whose file name has a recorded SHA-256
   (``KNOWN_SHA256``) is checked before it is put in place; a mismatch is deleted and refused.
If all fail, :class:`WeightsMissing` says which files were looked for, where, and how to get them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import torch

from engine.home import lance_home


class WeightsMissing(FileNotFoundError):
    """Pretrained weights not found locally and not downloadable (message says what to do)."""


class WeightsChecksumError(WeightsMissing):
    """A weights file whose SHA-256 is not the recorded one (damaged or not the published file)."""


# SHA-256 of published weight files, by file name (computed from the files themselves).
KNOWN_SHA256: dict[str, str] = {
    # MCUNet-in3 ImageNet weights (mit-han-lab/mcunet release mcunet-in3 / ../shared/weights/mcunet-in3)
    "mcunet-in3_imagenet.pth": "c0d4ccf4bb8ba93ef69a609c60ca053be2c6bab3b4ece19d9b7e66cec8a485e5",
    "mcunet-in3_imagenet.json": "ad1315f4d8fe035ae71f1c28fce395ea42d15a00d5d3c1b42347c410baf3412e",
}


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected_hex: str) -> None:
    """Raise ``WeightsChecksumError`` unless the file's SHA-256 is ``expected_hex`` (case-insensitive)."""
    expected = str(expected_hex).strip().lower()
    got = sha256_of(path)
    if got != expected:
        raise WeightsChecksumError(
            f"{path}: SHA-256 {got} does not match the recorded {expected}; the file is damaged or not the "
            "published weights. Delete it and download it again (or pass --weights PATH to a file you trust)."
        )


def expected_sha256(filename: str) -> str | None:
    """The recorded SHA-256 of a published weights file name, or None when none is recorded."""
    return KNOWN_SHA256.get(Path(filename).name)



def weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The local weights folder: argument > ``$LANCE_WEIGHTS_DIR`` > ``$LANCE_HOME/weights``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("LANCE_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    return lance_home() / "weights"


def offline() -> bool:
    return os.environ.get("LANCE_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def find_local(backbone: str, filenames: list[str], folder: Path) -> Path | None:
    """First of ``folder/f`` or ``folder/backbone/f`` that exists, for f in ``filenames``."""
    for name in filenames:
        for candidate in (folder / name, folder / backbone / name):
            if candidate.is_file():
                return candidate
    return None


def download(url: str, target: Path, timeout_s: float = 20.0, sha256: str | None = None) -> Path:
    """Download ``url`` to ``target`` atomically; raises OSError when there is no network.

    ``sha256`` (default: the recorded hash of ``target``'s file name, if any) is checked on the temporary
    file; a mismatch deletes it and raises ``WeightsChecksumError``, so a bad file never lands in place.
    """
    if offline():
        raise OSError("LANCE_OFFLINE is set")
    expected = sha256 or expected_sha256(target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (fixed https URLs)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(response, tmp)
    try:
        if expected:
            verify_sha256(tmp.name, expected)
    except BaseException:
        os.unlink(tmp.name)
        raise
    os.replace(tmp.name, target)
    return target


def missing_message(backbone: str, filenames: list[str], looked_in: list[Path], url: str | None,
                    reason: str | None = None) -> str:
    where = "\n".join(f"  - {p}" for p in looked_in)
    lines = [f"ImageNet weights for backbone {backbone!r} not found.",
             f"Looked for {', '.join(filenames)} in:", where]
    if url:
        lines.append(f"Download could not run ({reason or 'no network'}): {url}")
        lines.append(f"Fix: download that file on a machine with internet and put it in {looked_in[0]}/{backbone}/ "
                     f"(or point LANCE_WEIGHTS_DIR / --weights-dir at the folder holding it), "
                     f"pass --weights PATH to a state_dict file, or use --weights none for random init.")
    else:
        lines.append("Fix: pass --weights PATH to a state_dict file, or use --weights none for random init.")
    return "\n".join(lines)


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Load a state_dict from ``path``; unwraps ``{"state_dict": …}`` / ``{"model": …}`` checkpoints."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"weights file {path} does not exist; pass an existing state_dict file, "
                             f"'imagenet', or 'none'")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}
