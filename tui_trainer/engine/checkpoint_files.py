"""The files a checkpoint component saves, as data the writer turns into files (engine/checkpoint_save.py).

A component (engine/components.py) returns `Part`s at a step boundary; the writer (a thread or the writer
process) calls each part's `write(dir)`. Parts are plain dataclasses, so a snapshot pickles whole to the writer
process; a `staged` part's `state` holds the big tensors (weights, optimizer moments) that are copied into the
reused staging buffers (engine/staging.py) instead of being cloned at every save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from tui_trainer.core.store import fsync_path, hash_file

WEIGHTS = "model.safetensors"  # a full model's weights (a LoRA checkpoint holds lora.ADAPTER_WEIGHTS instead)


@dataclass(frozen=True)
class FileDigest:
    digest: str  # xxh3_128, the manifest's checksum
    size: int


class Part(Protocol):
    """One piece of a checkpoint. A strategy may define its own (a dataclass with these fields)."""

    file: str  # the file it writes: a plain name in the checkpoint dir; "" when the object names its own files
    staged: bool  # `state`'s tensors are copied into the staging buffers at capture (big, device-resident state)
    state: Any

    def write(self, directory: Path) -> dict[str, FileDigest]:
        """Write into `directory` (the checkpoint's temp dir); return the digest of each file it checksummed
        while writing (the manifest hashes any other file it finds)."""
        ...


def with_state(part: Part, state: Any) -> Part:
    """The same part over another state (the writer process swaps staging buffers for references and back);
    every part is a dataclass."""
    changed: Part = replace(part, state=state)  # type: ignore[type-var]
    return changed


@dataclass
class TensorFile:
    """A flat name -> tensor dict as safetensors: the model's weights, a LoRA adapter."""

    file: str
    state: dict[str, torch.Tensor]
    staged: bool = True

    def write(self, directory: Path) -> dict[str, FileDigest]:
        return {self.file: save_weights(unique_tensors(self.state), directory / self.file)}


@dataclass
class PickleFile:
    """A tree of tensors, numbers, lists and dicts as torch.save (every load is weights_only=True)."""

    file: str
    state: Any
    staged: bool = False

    def write(self, directory: Path) -> dict[str, FileDigest]:
        return {self.file: torch_save(self.state, directory / self.file)}


@dataclass
class PretrainedFiles:
    """An object's own `save_pretrained(dir)` files: a transformers config, a tokenizer, a peft config."""

    state: Any
    file: str = ""
    staged: bool = False

    def write(self, directory: Path) -> dict[str, FileDigest]:
        self.state.save_pretrained(directory)
        return {}


@dataclass
class JsonKeys:
    """Keys of tui_trainer_state.json (counters, the data cursor, the run's record), merged in the order the
    components are registered; trainer_state.json (the HF Trainer's) is derived from the merged whole."""

    state: dict[str, Any]
    file: str = ""
    staged: bool = False

    def write(self, directory: Path) -> dict[str, FileDigest]:
        return {}  # checkpoint_save.write writes the merged keys


# ---------------------------------------------------------------- writing one file, checksummed


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor (wte over lm_head)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = tensor.contiguous()
    return out


def as_oserror(exc: BaseException, path: Path) -> OSError:
    """torch.save reports a failed write as an opaque RuntimeError and safetensors as a SafetensorError
    holding the OS error code: give the trainer an OSError with errno and the file's name either way."""
    if isinstance(exc, OSError):
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    found = re.search(r"(?:code: |os error )(\d+)", str(exc))
    if found:
        code = int(found.group(1))
    else:  # nothing to go on but the disk itself: full, or some other I/O failure
        code = errno.EIO
        with contextlib.suppress(OSError):
            free = os.statvfs(path.parent)
            if free.f_bavail * free.f_frsize < 1 << 20:
                code = errno.ENOSPC
    return OSError(code, os.strerror(code), str(path))


def written(path: Path, produce: Callable[[], None]) -> FileDigest:
    """Run `produce` (which writes `path`), then checksum the file while it is fsynced: the hash reads the
    bytes back from the page cache on this thread while another thread waits on the disk."""
    try:
        produce()
        with ThreadPoolExecutor(max_workers=1) as flusher:
            flushed = flusher.submit(fsync_path, path)
            digest = hash_file(path)
            flushed.result()
        return FileDigest(digest, path.stat().st_size)
    except Exception as exc:
        raise as_oserror(exc, path) from exc


def torch_save(obj: Any, path: Path) -> FileDigest:
    # to a path, torch writes storages straight from memory (through a Python file object it copies each)
    return written(path, lambda: torch.save(obj, path))


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> FileDigest:
    # save_file to a path writes from the tensors' own memory: no serialised copy of the weights
    return written(path, lambda: save_file(tensors, str(path), metadata={"format": "pt"}))
