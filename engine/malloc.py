"""Keep freed tensor memory in the process instead of handing it back to the kernel each step (glibc, Linux).

glibc serves every allocation above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` on free. A training step allocates and frees the same large
activations every time, so each step page-faults them in again: 15,000-36,000 minor faults and 12-75 ms of
kernel time per alexnet-cl step at batch 64 here (``python3 docs/bench/malloc_faults.py``), against a step of
140-200 ms. :func:`tune_malloc` raises the mmap threshold to glibc's maximum (32 MiB) and the trim threshold
to 256 MiB: freed blocks go back to the heap and are reused. Peak RSS grows by at most the trim threshold;
the bytes that the engine measures (saved tensors, allocator peaks) do not change.

Off with ``LANCE_MALLOC_TUNING=0``, and when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (theirs win). A no-op off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); above it mallopt refuses
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

_state: dict = {"tuned": None}


def tune_malloc() -> bool:
    """Apply the thresholds once per process; True when they are in force (now or from an earlier call)."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    _state["tuned"] = _apply()
    return _state["tuned"]


def _apply() -> bool:
    if os.environ.get("LANCE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return mmap_ok and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
