"""docs/CONTRACTS.md stays true: every name it gives exists, every path it gives is there."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from engine.store import RunStore
from engine.surgery import CompressionHandle

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "docs" / "CONTRACTS.md").read_text()
CODE = "\n".join(re.findall(r"```python\n(.*?)```", TEXT, flags=re.S))
SPANS = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", TEXT, flags=re.S))
DOTTED = re.compile(r"\b(?:engine|lance_app)(?:\.[A-Za-z_]\w*)+")
NAMES = sorted({m for text in (*SPANS, CODE) for m in DOTTED.findall(text)})
PATHS = sorted({s for s in SPANS if re.fullmatch(r"(engine|lance_app|pages|tests|docs)/[\w/.]*", s)})
CALLS = sorted({("store", m) for m in re.findall(r"(?<![\w.])store\.(\w+)\(", CODE + " ".join(SPANS))}
               | {("handle", m) for m in re.findall(r"(?<![\w.])handle\.(\w+)", CODE + " ".join(SPANS))})


def resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_file_names_enough_to_be_checked():
    assert len(NAMES) > 60 and len(PATHS) > 15 and len(CALLS) > 15
    assert "engine.surgery.compress_model" in NAMES and ("store", "log_metrics") in CALLS


@pytest.mark.parametrize("dotted", NAMES)
def test_every_dotted_name_exists(dotted):
    resolve(dotted)


@pytest.mark.parametrize("path", PATHS)
def test_every_path_exists(path):
    assert (REPO / path).exists(), path


@pytest.mark.parametrize("owner, attr", CALLS)
def test_every_store_and_handle_call_exists(owner, attr):
    cls = {"store": RunStore, "handle": CompressionHandle}[owner]
    assert hasattr(cls, attr) or attr in getattr(cls, "__dataclass_fields__", {}), f"{owner}.{attr}"


def test_a_name_that_does_not_exist_is_caught():
    with pytest.raises((AttributeError, ModuleNotFoundError)):
        resolve("engine.tensor_ops.fold")
    with pytest.raises((AttributeError, ModuleNotFoundError)):
        resolve("engine.flops.count")
