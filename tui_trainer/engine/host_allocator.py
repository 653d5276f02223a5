"""CPU training and glibc's malloc (ARCHITECTURE.md: the engine, "CPU memory").

A training step on the CPU frees and allocates the same large activations (logits, their gradients) every
step. glibc serves blocks above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) with a fresh
mmap() each time, and hands the top of the heap back to the kernel whenever more than the trim threshold is
free there; either way the next step page-faults those pages in and zeroes them again. On the demo model that
churn is ~12 % of a step (BENCHMARKS.md, "CPU allocator"). Raising both thresholds lets the heap keep the
freed blocks for the next step, as torch's caching allocator does on a GPU. The cost: the process keeps its
step peak resident between steps instead of dropping back after each one.

A rank of an FSDP job (`sharded`) keeps only blocks under 4 MiB this way. Its large transient blocks (every
block's gathered weights and gradient buckets, tens of MiB each, allocated and freed around every block's
forward and backward) are interleaved with long-lived ones (the gradients kept across micro-batches, AdamW's
state): kept in the heap, the small allocations in between split the freed holes, the next gathered block no
longer fits in them and the heap grows, so peak RSS per rank rose to DDP's (~3.6 GB for GPT-2 124M on 2 CPU
ranks, against ~2.0 GB of live memory; BENCHMARKS.md "FSDP vs DDP"). mmap()ed, each goes back to the kernel
when freed, and the peak stays near what is live (~2.2 GB), at the cost of page-faulting those blocks again.

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
# An FSDP rank's mmap threshold: under GPT-2 124M's per-block buffers (~28 MiB) and its larger weight
# matrices' gradients (7-9 MiB), above activations at CPU batch sizes (measured: 16 MiB left the peak at 2.6 GB)
SHARDED_MMAP_BYTES = 4 << 20

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


def keep_freed_memory_for_reuse(sharded: bool = False) -> bool:
    """Raise glibc's trim and mmap thresholds for this process, once (the first call decides); True when
    they are raised. `sharded`: a rank of an FSDP job, whose large blocks stay mmap()ed (above)."""
    global _applied
    if _applied is None:
        _applied = _raise_thresholds(SHARDED_MMAP_BYTES if sharded else KEEP_BYTES)
    return _applied


def _raise_thresholds(mmap_bytes: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # Both, and the mmap threshold too: setting only the trim threshold turns off glibc's dynamic mmap
    # threshold, which leaves every block over 128 KiB mmap()ed and makes steps ~30 % slower (measured).
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
