"""Save and load the full training state in the store's format (DESIGN §3, §4).

Saving is two halves so it can run asynchronously: `capture` copies everything to CPU memory at a
step boundary (cheap, on the training thread), `write` puts it on disk atomically (any thread).
Loading never unpickles code: weights come from safetensors, the rest from torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.store import (
    TEMP_PREFIX,
    TRAINER_STATE,
    RunStore,
    checkpoint_dirname,
    fsync_path,
    verify_checkpoint,
    write_manifest,
)

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int


@dataclass
class Snapshot:
    """Everything needed to resume exactly, already copied off the training device."""

    step: int
    model_state: dict[str, torch.Tensor]
    model_config: Any  # transformers PretrainedConfig
    tokenizer: Any
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: Any  # a dict; a list of them, one per rank, under DDP
    scaler_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    manifest_meta: dict[str, Any] = field(default_factory=dict)
    stall_s: float = 0.0  # how long the training loop was held up before the write began
    blocking: bool = False  # the loop waits for the write too (sync save, pause, finish)


def _to_cpu(obj: Any, memo: dict[int, torch.Tensor]) -> Any:
    """Deep copy with every tensor cloned to CPU; tensors sharing storage stay shared (tied weights)."""
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        cached = memo.get(key)
        if cached is not None and cached.shape == obj.shape:
            return cached
        copy = obj.detach().to("cpu", copy=True)
        memo[key] = copy
        return copy
    if isinstance(obj, dict):
        return {k: _to_cpu(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, memo) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def capture(
    *,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler_state: dict[str, Any],
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    manifest_meta: dict[str, Any],
    rng: Any = None,
) -> Snapshot:
    """`rng`: every rank's RNG state (a list in rank order) under DDP; this process's when None."""
    memo: dict[int, torch.Tensor] = {}
    return Snapshot(
        step=step,
        model_state=_to_cpu(model.state_dict(), memo),
        model_config=model.config,
        tokenizer=tokenizer,
        optimizer_state=_to_cpu(optimizer.state_dict(), {}),
        scheduler_state=dict(scheduler_state),
        rng_state=rng if rng is not None else rng_state(),
        scaler_state=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        trainer_state=dict(trainer_state),
        manifest_meta=dict(manifest_meta),
    )


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


class _HashingFile:
    """A write-only file that hashes what passes through it, so the manifest needs no second read, and
    remembers the OSError of a failed write: torch reports it as an opaque RuntimeError ("unexpected
    pos ...") and keeps the real cause (disk full, read-only) only by chance."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            written = self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        self.size += len(memoryview(data).cast("B"))
        return written

    def flush(self) -> None:
        self._fh.flush()


def _write_hashed(path: Path, produce: Callable[[_HashingFile], None]) -> FileDigest:
    """Write a file through `produce`, fsync it, and return its digest; I/O failures raise the OSError
    with its errno and the file's name."""
    try:
        with open(path, "wb") as fh:
            sink = _HashingFile(fh)
            try:
                produce(sink)
            except Exception as exc:
                if sink.error is None or isinstance(exc, OSError):
                    raise
                raise sink.error from exc
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    return FileDigest(sink.sha256.hexdigest(), sink.size)


def _torch_save(obj: Any, path: Path) -> FileDigest:
    return _write_hashed(path, lambda sink: torch.save(obj, sink))  # type: ignore[arg-type]


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> FileDigest:
    # safetensors' save() builds the file in memory: one write, hashed on the way, no re-read
    payload = save_tensors(tensors, metadata={"format": "pt"})

    def produce(sink: _HashingFile) -> None:
        sink.write(payload)

    return _write_hashed(path, produce)


def write(store: RunStore, run: str, snap: Snapshot) -> Path:
    """Write into a hidden temp dir, fsync every file, manifest last, rename into place, fsync the parent."""
    parent = store.checkpoints_dir(run)
    final = parent / checkpoint_dirname(snap.step)
    tmp = parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        digests = {
            WEIGHTS: _save_weights(_unique_tensors(snap.model_state), tmp / WEIGHTS),
            "optimizer.pt": _torch_save(snap.optimizer_state, tmp / "optimizer.pt"),
            "scheduler.pt": _torch_save(snap.scheduler_state, tmp / "scheduler.pt"),
            "rng.pt": _torch_save(snap.rng_state, tmp / "rng.pt"),
        }
        if snap.scaler_state is not None:
            digests["scaler.pt"] = _torch_save(snap.scaler_state, tmp / "scaler.pt")
        snap.model_config.save_pretrained(tmp)
        snap.tokenizer.save_pretrained(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(snap.trainer_state, indent=2), encoding="utf-8")
        for entry in tmp.iterdir():
            if entry.name not in digests:
                fsync_path(entry)
        write_manifest(
            tmp,
            {"step": snap.step, "run": run, "created": time.time(), **snap.manifest_meta},
            known={name: (d.sha256, d.size) for name, d in digests.items()},
        )
        fsync_path(tmp)
        if final.exists():
            # The same step saved before (e.g. pause right after a resume): the state is identical.
            shutil.rmtree(tmp)
            return final
        os.rename(tmp, final)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _safe_load(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for a planted payload, RuntimeError for a torn file
        raise CheckpointInvalid(f"{path}: refused to load ({str(exc).splitlines()[0]})") from None


@dataclass
class LoadedState:
    trainer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, Any]


def load_into(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> LoadedState:
    """Verify, then load weights and optimizer/scaler state in place; returns what the loop restores itself."""
    verify_checkpoint(path)
    try:
        weights = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as exc:
        raise CheckpointInvalid(f"{path / WEIGHTS}: cannot read weights ({exc})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise CheckpointInvalid(
            f"{path / WEIGHTS}: does not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    optimizer.load_state_dict(_safe_load(path / "optimizer.pt", device))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(_safe_load(path / "scaler.pt"))
    try:
        trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{path / TRAINER_STATE}: unreadable ({exc})") from None
    return LoadedState(
        trainer_state=trainer_state,
        scheduler_state=_safe_load(path / "scheduler.pt"),
        rng_state=_safe_load(path / "rng.pt"),
    )
