"""Bad input is refused before the first run exists: budgets, eps, patch, data sanity, broken JPEGs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["finetune", "--backbone", "small-cnn", "--epochs", "1", "--quiet", "--batch-size", "8"]


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def image_folder(root: Path, classes=("cat", "dog"), test_classes=None, per_class: int = 6) -> Path:
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(1000 * c + 10 * i + (split == "test")))
    return root


def no_runs() -> bool:
    return RunStore().list_runs() == []


@pytest.mark.parametrize("argv,needle", [
    (["--dataset", "digits", "--method", "asi", "--budget", "1e300GB"], "more than 1e+18 bytes"),
    (["--dataset", "digits", "--method", "asi", "--budget", ""], "--budget is empty"),
    (["--dataset", "digits", "--method", "asi", "--budget=-3MB"], "cannot read the budget"),
    (["--dataset", "digits", "--method", "hosvd", "--eps", "nan"], "--eps for hosvd must be in (0, 1]"),
    (["--dataset", "digits", "--method", "hosvd", "--eps", ""], "--eps is empty"),
    (["--dataset", "digits", "--method", "gradient_filter", "--patch", "999"], "give --patch between 1 and 8"),
    (["--dataset", "digits", "--method", "gradient_filter", "--patch", "0"], "--patch must be a whole number"),
])
def test_bad_arguments_exit_2_with_the_reason_and_create_no_run(argv, needle, capsys):
    assert main(SMALL + argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert no_runs()


def test_truncated_and_corrupt_jpegs_are_named_or_skipped(tmp_path, capsys, monkeypatch):
    root = image_folder(tmp_path / "imgs")
    truncated = root / "train" / "cat" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])  # a real JPEG cut short
    garbage = root / "train" / "dog" / "5.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    dataset = ["--dataset", f"imagefolder:{root}", "--method", "vanilla", "--val-split", "test"]
    assert main(SMALL + dataset) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and ("0.jpg" in err or "5.jpg" in err) and str(root) in err
    assert "--skip-bad-images" in err and "Traceback" not in err
    assert no_runs()

    monkeypatch.delenv("LANCE_SKIP_BAD_IMAGES", raising=False)
    assert main(SMALL + dataset + ["--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 unreadable image(s)" in err
    (run,) = RunStore().list_runs()
    assert run["status"] == "completed" and run["config"]["train_samples"] == 8  # 10 readable, 2 held out as val


def test_one_class_and_unseen_test_classes_are_refused(tmp_path, capsys):
    one = image_folder(tmp_path / "one", classes=("cat",))
    assert main(SMALL + ["--dataset", f"imagefolder:{one}", "--method", "vanilla"]) == 2
    assert "at least 2" in capsys.readouterr().err
    unseen = image_folder(tmp_path / "unseen", classes=("cat", "dog"), test_classes=("cat", "dog", "owl"))
    assert main(SMALL + ["--dataset", f"imagefolder:{unseen}", "--method", "vanilla", "--val-split", "test"]) == 2
    assert "owl" in capsys.readouterr().err
    assert no_runs()


def test_json_output_into_the_store_is_refused_before_any_run(capsys):
    home = RunStore().root
    db_head = (home / "runs.sqlite").read_bytes()[:16]
    for command in (SMALL + ["--dataset", "digits", "--method", "vanilla"],
                    ["continual", "--benchmark", "split-digits", "--quiet"]):
        assert main(command + ["--json", str(home / "runs.sqlite")]) == 2
        assert "inside the run store" in capsys.readouterr().err
    assert (home / "runs.sqlite").read_bytes()[:16] == db_head == b"SQLite format 3\x00" and no_runs()
