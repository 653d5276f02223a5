"""Save the training state in the store's format (ARCHITECTURE.md: the on-disk contract).

Saving is two halves so it can run asynchronously: `capture` asks every checkpoint component
(engine/components.py) for its parts at a step boundary and copies the big ones to CPU memory (cheap, on the
training thread; into engine/staging.py's reused buffers), `write` puts them on disk atomically (any thread,
or the writer process of engine/writer_process.py). Neither names a component. Loading is
engine/checkpoint_load.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.metrics_cache import history_columns
from tui_trainer.core.store import (
    MANIFEST,
    OWN_STATE,
    TEMP_PREFIX,
    TRAINER_STATE,
    RunStore,
    checkpoint_dirname,
    fsync_path,
    json_safe,
    write_manifest,
)
from tui_trainer.engine.checkpoint_files import WEIGHTS, FileDigest, JsonKeys, Part
from tui_trainer.engine.components import Components
from tui_trainer.engine.hf_state import hf_trainer_state
from tui_trainer.engine.staging import Staging

__all__ = ["WEIGHTS", "Snapshot", "capture", "staged_state", "write"]


@dataclass
class Snapshot:
    """Everything needed to resume exactly, already copied off the training device."""

    step: int
    parts: list[Part]  # the components' files, in registration order (staged ones over the staging buffers)
    trainer_state: dict[str, Any]  # tui_trainer_state.json: the components' JsonKeys merged
    manifest_meta: dict[str, Any] = field(default_factory=dict)
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


def _on_cpu(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(_on_cpu(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_on_cpu(v) for v in obj)
    return True


def _staged_tree(parts: list[Part]) -> dict[str, Any]:
    return {part.file: part.state for part in parts if part.staged}


def staged_state(components: Components) -> dict[str, Any]:
    """The tree of what capture stages (file -> state), to size the staging buffers before the first save."""
    return _staged_tree(components.save())


def capture(
    components: Components,
    *,
    step: int,
    manifest_meta: dict[str, Any],
    staging: Staging | None = None,
) -> Snapshot:
    """The components' parts at this step boundary, the staged ones copied: into `staging` (reused buffers,
    for a background write), or not at all when everything is on the CPU and the loop waits for the write
    (no staging given)."""
    parts = components.save()
    tree = _staged_tree(parts)
    if staging is not None:
        tree = staging.stage(tree)
    elif _on_cpu(tree):
        tree = _detached(tree)
    else:
        tree = _to_cpu(tree, {})
    for part in parts:
        if part.staged:
            part.state = tree[part.file]
    own: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, JsonKeys):
            own.update(part.state)
    files = [part for part in parts if not isinstance(part, JsonKeys)]
    return Snapshot(step=step, parts=files, trainer_state=json_safe(own), manifest_meta=dict(manifest_meta))


def write(store: RunStore, run: str, snap: Snapshot, before_file: Callable[[Path], None] | None = None) -> Path:
    """Write into a hidden temp dir, fsync every file, manifest last, rename into place, fsync the parent.
    `before_file(path)` runs before each named file is written (engine/faults.py Hooks.before_checkpoint_file)."""
    hook = before_file or (lambda path: None)
    parent = store.checkpoints_dir(run)
    final = parent / checkpoint_dirname(snap.step)
    tmp = parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        digests: dict[str, FileDigest] = {}
        # the named files first, each checksummed as it is written; then the ones objects name themselves
        # (save_pretrained's config and tokenizer files), which the manifest hashes
        for part in sorted(snap.parts, key=lambda part: not part.file):
            if part.file:
                hook(tmp / part.file)
            digests.update(part.write(tmp))
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
