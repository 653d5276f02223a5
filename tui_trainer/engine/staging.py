"""Staging: the CPU buffers a checkpoint's tensors are copied into at a step boundary, reused by every save.

One arena per state shape, in shared memory when a writer process (engine/writer_process.py) writes from it;
a snapshot's tensors become `Ref`s to its slots when sent there, and `resolve` turns them back.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Ref:
    """Stands for one staging buffer in a snapshot sent to the writer process (which maps them once)."""

    key: str


def _collect(obj: Any, path: str, found: dict[str, torch.Tensor], memo: dict[tuple, str]) -> Any:
    """`obj` with every tensor replaced by a Ref; `found` gets key -> tensor. Tensors sharing storage
    (tied weights) map to one key, so they stay shared."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in memo:
            return Ref(memo[ident])
        found[path] = t
        if ident is not None:
            memo[ident] = path
        return Ref(path)
    if isinstance(obj, dict):
        return {k: _collect(v, f"{path}/{k}", found, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_collect(v, f"{path}/{i}", found, memo) for i, v in enumerate(obj))
    return obj


def resolve(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, Ref):
        return tensors[obj.key]
    if isinstance(obj, dict):
        return {k: resolve(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(v, tensors) for v in obj)
    return obj


Layout = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]  # key -> (byte offset, dtype, shape)


def carve(arena: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """One tensor per slot, each with a storage of its own over the arena's memory (no copy): torch.save
    writes a tensor's whole storage, so views of the one arena storage would each drag all of it along."""
    views = {}
    for key, (offset, dtype, shape) in layout.items():
        raw = arena[offset : offset + math.prod(shape) * dtype.itemsize].numpy()
        views[key] = torch.from_numpy(raw).view(dtype).view(shape)
    return views


class Staging:
    """CPU buffers that snapshots are copied into, allocated once and reused by every save: one arena in
    shared memory (/dev/shm), so a writer process maps it once and writes from it with no copy; page-locked
    on CUDA so the device-to-host copy is a DMA. Rebuilt only if the state's shapes change."""

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared  # in /dev/shm, for a writer process; private memory for a writer thread
        self.arena: torch.Tensor | None = None
        self.layout: Layout = {}
        self.views: dict[str, torch.Tensor] = {}
        self.generation = 0
        self._pinned = False
        self._warming: threading.Thread | None = None

    def _ensure(self, found: dict[str, torch.Tensor], pin: bool) -> None:
        wanted = {key: (t.dtype, tuple(t.shape)) for key, t in found.items()}
        if self.arena is not None and wanted == {k: (d, s) for k, (_, d, s) in self.layout.items()}:
            return
        self.release()
        layout: Layout = {}
        offset = 0
        for key, (dtype, shape) in wanted.items():
            layout[key] = (offset, dtype, shape)
            offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # 64-byte aligned slots
        size = max(offset, 64)
        if self.shared:
            self.arena = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))
        else:
            self.arena = torch.empty(size, dtype=torch.uint8)
        if pin and torch.cuda.is_available():
            torch.cuda.cudart().cudaHostRegister(self.arena.data_ptr(), self.arena.numel(), 0)
            self._pinned = True
        self.layout, self.views = layout, carve(self.arena, layout)
        self.generation += 1

    def reserve(self, tree: Any) -> None:
        """Allocate the buffers for states shaped like `tree` before the first save, and fault their pages
        in on a background thread: first-touching 1.5 GB of fresh shared memory takes seconds, which would
        otherwise all land in that save's stall."""
        found: dict[str, torch.Tensor] = {}
        _collect(tree, "", found, {})
        self._ensure(found, pin=any(t.device.type == "cuda" for t in found.values()))
        assert self.arena is not None
        self._warming = threading.Thread(target=_prefault, args=(self.arena,), name="staging-prefault", daemon=True)
        self._warming.start()

    def stage(self, tree: Any) -> Any:
        """Copy every tensor of `tree` into the buffers; returns the tree over the buffers."""
        if self._warming is not None:  # never copy into pages the prefault thread is still zeroing
            self._warming.join()
            self._warming = None
        found: dict[str, torch.Tensor] = {}
        skeleton = _collect(tree, "", found, {})
        on_device = any(t.device.type == "cuda" for t in found.values())
        self._ensure(found, pin=on_device)
        for key, t in found.items():
            self.views[key].copy_(t, non_blocking=on_device)
        if on_device:
            torch.cuda.synchronize()
        return resolve(skeleton, self.views)

    def refs(self, tree: Any) -> Any:
        """`tree` (staged by `stage`) with buffers replaced by Refs, for sending to the writer process."""
        by_ptr = {t.data_ptr(): key for key, t in self.views.items() if t.numel()}
        return _collect_refs(tree, by_ptr)

    def release(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        if self.arena is not None and self._pinned:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.arena.data_ptr())
        self.arena, self.layout, self.views, self._pinned = None, {}, {}, False


def lowest_priority() -> None:
    """Nice this thread (Linux: per thread) or process to 19: it then runs on CPU the training loop leaves
    idle instead of taking a core from it (with 2 OpenMP threads on 2 cores, one preempted thread stalls
    every parallel region of the step)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _prefault(arena: torch.Tensor) -> None:
    lowest_priority()
    arena.zero_()


def _collect_refs(obj: Any, by_ptr: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = by_ptr.get(obj.data_ptr()) if obj.numel() else None
        return Ref(key) if key is not None else obj
    if isinstance(obj, dict):
        return {k: _collect_refs(v, by_ptr) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_collect_refs(v, by_ptr) for v in obj)
    return obj
