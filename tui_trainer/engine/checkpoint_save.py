"""Save the full training state in the store's format (ARCHITECTURE.md: the on-disk contract).

Saving is two halves so it can run asynchronously: `capture` copies everything to CPU memory at a
step boundary (cheap, on the training thread; into engine/staging.py's reused buffers), `write` puts it on
disk atomically (any thread, or the writer process of engine/writer_process.py). Loading is
engine/checkpoint_load.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tui_trainer.core.metrics_cache import history_columns
from tui_trainer.core.store import (
    MANIFEST,
    OWN_STATE,
    TEMP_PREFIX,
    TRAINER_STATE,
    RunStore,
    checkpoint_dirname,
    fsync_path,
    hash_file,
    write_manifest,
)
from tui_trainer.engine import lora
from tui_trainer.engine.hf_state import hf_rng_files, hf_trainer_state
from tui_trainer.engine.rng import rng_state
from tui_trainer.engine.staging import Staging

WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class FileDigest:
    digest: str  # xxh3_128, the manifest's checksum
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
    hf_rng_files: dict[str, Any] = field(default_factory=dict)  # the same RNG as HF's rng_state*.pth files
    manifest_meta: dict[str, Any] = field(default_factory=dict)
    adapter_config: Any = None  # LoRA: the peft config; model_state is then the adapter alone (engine/lora.py)
    stall_s: float = 0.0  # how long the training loop was held up before the write began
    blocking: bool = False  # the loop waits for the write too (sync save, pause, finish)


def _detached(obj: Any) -> Any:
    """The state as it is, without copies: for a blocking save on CPU, where nothing changes it meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


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
    staging: Staging | None = None,
    rng: Any = None,
) -> Snapshot:
    """Copy the state at this step boundary: into `staging` (reused buffers, for a background write), or
    not at all when everything is on the CPU and the loop waits for the write (no staging given).
    `rng`: every rank's RNG state (a list in rank order) under DDP; this process's when None."""
    state = {"model": lora.weights_state(model), "optimizer": optimizer.state_dict()}
    rng = rng if rng is not None else rng_state()
    if staging is not None:
        state = staging.stage(state)
    elif all(t.device.type == "cpu" for t in model.parameters()):
        state = _detached(state)
    else:
        state = _to_cpu(state, {})
    return Snapshot(
        step=step,
        model_state=state["model"],
        model_config=model.config,
        tokenizer=tokenizer,
        optimizer_state=state["optimizer"],
        scheduler_state=dict(scheduler_state),
        rng_state=rng,
        hf_rng_files=hf_rng_files(rng),
        scaler_state=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        trainer_state=dict(trainer_state),
        manifest_meta=dict(manifest_meta),
        adapter_config=lora.adapter_config(model),
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


def _as_oserror(exc: BaseException, path: Path) -> OSError:
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


def _written(path: Path, produce: Callable[[], None]) -> FileDigest:
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
        raise _as_oserror(exc, path) from exc


def _torch_save(obj: Any, path: Path) -> FileDigest:
    # to a path, torch writes storages straight from memory (through a Python file object it copies each)
    return _written(path, lambda: torch.save(obj, path))


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> FileDigest:
    # save_file to a path writes from the tensors' own memory: no serialised copy of the weights
    return _written(path, lambda: save_file(tensors, str(path), metadata={"format": "pt"}))


def write(store: RunStore, run: str, snap: Snapshot, before_file: Callable[[Path], None] | None = None) -> Path:
    """Write into a hidden temp dir, fsync every file, manifest last, rename into place, fsync the parent.
    `before_file(path)` runs before each file is written (engine/faults.py Hooks.before_checkpoint_file)."""
    hook = before_file or (lambda path: None)
    parent = store.checkpoints_dir(run)
    final = parent / checkpoint_dirname(snap.step)
    tmp = parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    weights = WEIGHTS if snap.adapter_config is None else lora.ADAPTER_WEIGHTS
    try:
        hook(tmp / weights)
        digests = {weights: _save_weights(_unique_tensors(snap.model_state), tmp / weights)}
        pickled = {
            "optimizer.pt": snap.optimizer_state,
            "scheduler.pt": snap.scheduler_state,
            "rng.pt": snap.rng_state,
            **snap.hf_rng_files,
        }
        if snap.scaler_state is not None:
            pickled["scaler.pt"] = snap.scaler_state
        for name, obj in pickled.items():
            hook(tmp / name)
            digests[name] = _torch_save(obj, tmp / name)
        if snap.adapter_config is None:
            snap.model_config.save_pretrained(tmp)
        else:  # PEFT's format: PeftModel.from_pretrained(base, this dir) loads it
            snap.adapter_config.save_pretrained(tmp)
        snap.tokenizer.save_pretrained(tmp)
        (tmp / OWN_STATE).write_text(json.dumps(snap.trainer_state, indent=2), encoding="utf-8")
        # HF's schema under HF's name: transformers.Trainer resumes from this checkpoint too
        hf_state = hf_trainer_state(snap.trainer_state, _history(store, run))
        (tmp / TRAINER_STATE).write_text(json.dumps(hf_state, indent=2), encoding="utf-8")
        for entry in tmp.iterdir():
            if entry.name not in digests:
                fsync_path(entry)
        hook(tmp / MANIFEST)
        write_manifest(
            tmp,
            {"step": snap.step, "run": run, "created": time.time(), **snap.manifest_meta},
            known={name: (d.digest, d.size) for name, d in digests.items()},
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


def _history(store: RunStore, run: str) -> list[dict[str, Any]]:
    """The run's curve through its ancestors (HF's log_history holds the whole of it), through the
    metrics cache: a long run's metrics.jsonl is not parsed again at every save."""
    try:
        segments = history_columns(store, run)
    except Exception:  # an unreadable record or a vanished parent costs the log, never the checkpoint
        return []
    records = []
    for _, cols in segments:
        values = {key: cols[key].tolist() for key in ("step", "loss", "lr", "grad_norm", "eval_loss")}
        for i, step in enumerate(values["step"]):
            record: dict[str, Any] = {"step": int(step)}
            record.update({k: v[i] for k, v in values.items() if k != "step" and math.isfinite(v[i])})
            records.append(record)
    return records
