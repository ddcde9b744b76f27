"""One helper each: the home folder (engine.home), bytes for people (engine.units), the layer choice
(engine.surgery.resolve_layers); every user goes through it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from engine.calibration import cache as calibration_cache
from engine.data.paths import cache_dir, data_roots
from engine.home import cache_root, lance_home
from engine.models.weights import weights_dir
from engine.store import RunStore
from engine.surgery import resolve_layers
from engine.units import format_bytes
from lance_app.jobs import JobRunner

REPO = Path(__file__).resolve().parents[1]


def test_every_folder_follows_lance_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LANCE_HOME", str(home))
    for name in ("LANCE_CACHE_DIR", "LANCE_WEIGHTS_DIR", "LANCE_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    assert lance_home() == home and cache_root() == home / "cache"
    assert RunStore().root == home
    assert JobRunner().home == home
    assert weights_dir() == home / "weights"
    assert data_roots() == [home / "datasets"]
    assert cache_dir("features") == home / "cache" / "features"
    assert calibration_cache.cache_dir() == home / "cache" / "calibration"
    monkeypatch.setenv("LANCE_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir("decoded") == tmp_path / "c" / "decoded"
    assert calibration_cache.cache_dir() == tmp_path / "c" / "calibration"


def test_lance_home_without_the_variable_is_the_user_data_dir(monkeypatch):
    monkeypatch.delenv("LANCE_HOME")
    assert lance_home().name == "lance-lab" and lance_home().is_absolute()


VARS = r"[\"'](LANCE_HOME|LANCE_CACHE_DIR)[\"']"
READ = re.compile(rf"environ\.get\(\s*{VARS}|environ\[{VARS}\](?!\s*=)")  # setting one (lance app --home) is fine


def test_only_engine_home_reads_the_home_and_cache_variables():
    readers = []
    for path in [*REPO.glob("engine/**/*.py"), *REPO.glob("lance_app/**/*.py"), *REPO.glob("pages/*.py")]:
        text = path.read_text()
        if READ.search(text) or "user_data_dir(" in text:
            readers.append(str(path.relative_to(REPO)))
    assert readers == ["engine/home.py"]


@pytest.mark.parametrize("n, kwargs, text", [
    (524288, {}, "524.3 kB"), (999, {}, "999 B"), (2_500_000, {}, "2.5 MB"), (3e9, {}, "3.0 GB"),
    (1536, {"binary": True}, "1.5 KiB"), (1023, {"binary": True}, "1023 B"), (3 * 2**20, {"binary": True}, "3.0 MiB"),
    (None, {}, "-"), (float("nan"), {"missing": "–"}, "–"), (float("inf"), {}, "-"),
])
def test_format_bytes(n, kwargs, text):
    assert format_bytes(n, **kwargs) == text


MODEL = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("kwargs, expected", [
    ({"last_k": 2}, ["2", "4"]), ({"layers": 2}, ["2", "4"]), ({"layers": "2"}, ["2", "4"]),
    ({"layers": "all"}, ["0", "2", "4"]), ({"layers": 0}, []), ({"layers": ["4", "0", "4"]}, ["0", "4"]),
])
def test_resolve_layers_choices(kwargs, expected):
    assert resolve_layers(MODEL, **kwargs) == expected
    assert resolve_layers(["0", "2", "4"], **kwargs) == expected  # the same rule on listed names


@pytest.mark.parametrize("kwargs, message", [
    ({}, "not both/neither"), ({"layers": ["0"], "last_k": 1}, "not both/neither"),
    ({"last_k": 4}, "between 0 and 3"), ({"layers": -1}, "between 0 and 3"), ({"layers": True}, "between 0 and 3"),
    ({"layers": "last"}, "a count K or 'all'"), ({"layers": ["1"]}, "not compressible layers"),
])
def test_resolve_layers_refuses_with_reasons(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(MODEL, **kwargs)
