"""CPU training and glibc's malloc (ARCHITECTURE.md: the engine, "CPU memory").

A training step on the CPU frees and allocates the same large activations (logits, their gradients) every
step. glibc serves blocks above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) with a fresh
mmap() each time, and hands the top of the heap back to the kernel whenever more than the trim threshold is
free there; either way the next step page-faults those pages in and zeroes them again. On the demo model that
churn is ~12 % of a step (BENCHMARKS.md, "CPU allocator"). Raising both thresholds lets the heap keep the
freed blocks for the next step, as torch's caching allocator does on a GPU. The cost: the process keeps its
step peak resident between steps instead of dropping back after each one.

Only glibc is tuned, and never over the user's own choice: a MALLOC_*_ variable, a glibc.malloc tunable or a
preloaded allocator (jemalloc, tcmalloc, mimalloc) leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Large enough for the logits of the demo model and of GPT-2 124M at small CPU batches; a block above it is
# still mmap()ed, so a one-off huge buffer goes back to the kernel when freed.
KEEP_BYTES = 1 << 30

_USER_CHOICE_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: bool | None = None


def user_chose_allocator(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """The environment already says how malloc should behave: tuned glibc, or another allocator."""
    if any(name in environ for name in _USER_CHOICE_VARIABLES):
        return True
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = environ.get("LD_PRELOAD", "")
    return any(name in preload for name in _OTHER_ALLOCATORS)


def keep_freed_memory_for_reuse() -> bool:
    """Raise glibc's trim and mmap thresholds for this process, once; True when they are raised."""
    global _applied
    if _applied is None:
        _applied = _raise_thresholds()
    return _applied


def _raise_thresholds() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # Both, and the mmap threshold too: setting only the trim threshold turns off glibc's dynamic mmap
    # threshold, which leaves every block over 128 KiB mmap()ed and makes steps ~30 % slower (measured).
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
