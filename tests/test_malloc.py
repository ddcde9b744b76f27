"""engine.malloc: a freed 64 MiB tensor is reused from the heap, not page-faulted in again (Linux, glibc)."""
import json
import os
import subprocess
import sys

import pytest

from engine import malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")

PROBE = """
import json, resource, torch
from engine.malloc import tune_malloc
tuned = tune_malloc()
def touch():
    torch.empty(16 * 1024 * 1024).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold
for _ in range(3):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
print(json.dumps({"tuned": tuned, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10}))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_reuses_large_blocks():
    on, off = _probe(LANCE_MALLOC_TUNING="1"), _probe(LANCE_MALLOC_TUNING="0")
    assert on["tuned"] is True and off["tuned"] is False
    assert off["faults"] > 10_000  # 64 MiB / 4 KiB pages = 16,384 faults per allocation with glibc's defaults
    assert on["faults"] < 200


def test_users_glibc_settings_win():
    assert _probe(LANCE_MALLOC_TUNING="1", MALLOC_MMAP_THRESHOLD_="131072")["tuned"] is False


def test_tune_malloc_is_idempotent():
    first = malloc.tune_malloc()
    assert malloc.tune_malloc() is first
