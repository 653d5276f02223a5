"""CPU training keeps freed activation memory for the next step instead of handing it back to the kernel
(engine/host_allocator.py), unless the user chose how malloc behaves. Each case runs in a fresh process:
mallopt is process-wide and one-way. Where the block came from is read from glibc's own books (mallinfo2),
not from timings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tui_trainer.engine.host_allocator import user_chose_allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# A CPU run's device set-up, then one 64 MiB tensor (a step's logits on the demo model) made and freed.
# TUI_TEST_FSDP_RANK=1: the set-up of rank 0 of a 2-rank FSDP job instead (placing needs no process group).
PROBE = """
import ctypes, json, os, torch
from tui_trainer.core.config import load_config
from tui_trainer.core.launch import DistEnv
from tui_trainer.engine.distributed import Dist
from tui_trainer.engine.run_setup import training_device

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if os.environ.get("TUI_TEST_FSDP_RANK"):
    config = load_config(None, ["train.device=cpu", "train.parallel=fsdp"])
    training_device(config, Dist(DistEnv(0, 2, 0, "127.0.0.1", "29500"), torch.device("cpu")))
else:
    config = load_config(None, ["train.device=cpu"])
    training_device(config, Dist.single(torch.device("cpu")))
before = libc.mallinfo2().hblks
logits = torch.ones(16 * 2**20)
mmapped = libc.mallinfo2().hblks - before
del logits
kept_free = libc.mallinfo2().fordblks
small = torch.ones(2**18)  # 1 MiB: an activation at CPU batch sizes
small_mmapped = libc.mallinfo2().hblks - before
print(json.dumps({"mmapped": mmapped, "kept_free": kept_free, "small_mmapped": small_mmapped}))
"""


def probe(**env: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_cpu_run_keeps_a_freed_64_mib_block_in_the_heap_for_the_next_step() -> None:
    got = probe()
    assert got["mmapped"] == 0  # served from the heap, not a fresh mmap() the next step page-faults again
    assert got["kept_free"] >= 64 * 2**20  # and still the process's after it was freed


def test_an_fsdp_rank_hands_a_freed_64_mib_block_back_and_keeps_small_ones() -> None:
    # FSDP's gathered blocks and gradient buckets, kept in the heap, fragment it: peak RSS per rank rose to
    # DDP's (BENCHMARKS.md "FSDP vs DDP"); mmap()ed they go back to the kernel when freed
    got = probe(TUI_TEST_FSDP_RANK="1")
    assert got["mmapped"] == 1 and got["kept_free"] < 64 * 2**20
    assert got["small_mmapped"] == 0  # an activation-sized block is still served from the heap


def test_the_users_own_malloc_settings_are_left_alone() -> None:
    got = probe(GLIBC_TUNABLES="glibc.malloc.check=0")  # a glibc.malloc tunable: the user's choice
    assert got["mmapped"] == 1  # glibc's default: a block this size is mmap()ed and unmapped when freed
    assert got["kept_free"] < 64 * 2**20


def test_what_counts_as_the_users_choice() -> None:
    assert user_chose_allocator({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_chose_allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert user_chose_allocator({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert not user_chose_allocator({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=0", "LD_PRELOAD": ""})
