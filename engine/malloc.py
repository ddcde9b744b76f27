"""Keep freed tensor memory in the process instead of handing it back to the kernel each step (glibc, Linux).

glibc serves every allocation above its mmap threshold (128 KiB, raised on the fly to at most 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` on free. A training step allocates and frees the same large
activations every time, so each step page-faults them in again: 15,000-36,000 minor faults and 12-75 ms of
kernel time per alexnet-cl step at batch 64 here (``python3 docs/bench/malloc_faults.py``), against a step of
140-200 ms. Evaluation at batch 256 allocates blocks above 32 MiB, which glibc always maps: 161,000 faults and
0.3 s of kernel time per evaluation of one split-CIFAR-10 test set (1.62 s → 1.25 s without them).

:func:`tune_malloc` serves every block from the heap (``M_MMAP_MAX = 0``; the threshold raised to glibc's
maximum, 32 MiB, for good measure) and keeps up to 256 MiB of free memory at the top of the heap before
trimming it: freed blocks are reused. The cost: the process's resident size stays near its peak heap until
it exits, as with PyTorch's CUDA caching allocator or jemalloc; the bytes that the engine measures (saved
tensors, allocator peaks) do not change.

Off with ``LANCE_MALLOC_TUNING=0``, and when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_MAX_`` (theirs win). A no-op off glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
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
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = [bool(mallopt(option, value)) for option, value in
          ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (M_MMAP_MAX, 0))]
    return all(ok)
