"""Save and load the full training state in the store's format (ARCHITECTURE.md: the on-disk contract).

Saving is two halves so it can run asynchronously: `capture` copies everything to CPU memory at a
step boundary (cheap, on the training thread), `write` puts it on disk atomically (any thread).
Loading never unpickles code: weights come from safetensors, the rest from torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.hf_runs import is_hf_checkpoint
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
    own_state_path,
    same_manifest,
    verify_checkpoint,
    write_manifest,
)
from tui_trainer.engine.hf_state import HF_RNG, from_hf_state, hf_rng_state, hf_trainer_state

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
    hf_rng_state: dict[str, Any] = field(default_factory=dict)  # the same RNG in HF's rng_state.pth layout
    manifest_meta: dict[str, Any] = field(default_factory=dict)
    stall_s: float = 0.0  # how long the training loop was held up before the write began
    blocking: bool = False  # the loop waits for the write too (sync save, pause, finish)


@dataclass(frozen=True)
class _Ref:
    """Stands for one staging buffer in a snapshot sent to the writer process (which maps them once)."""

    key: str


def _collect(obj: Any, path: str, found: dict[str, torch.Tensor], memo: dict[tuple, str]) -> Any:
    """`obj` with every tensor replaced by a _Ref; `found` gets key -> tensor. Tensors sharing storage
    (tied weights) map to one key, so they stay shared."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if ident is not None and ident in memo:
            return _Ref(memo[ident])
        found[path] = t
        if ident is not None:
            memo[ident] = path
        return _Ref(path)
    if isinstance(obj, dict):
        return {k: _collect(v, f"{path}/{k}", found, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_collect(v, f"{path}/{i}", found, memo) for i, v in enumerate(obj))
    return obj


def _resolve(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, _Ref):
        return tensors[obj.key]
    if isinstance(obj, dict):
        return {k: _resolve(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, tensors) for v in obj)
    return obj


Layout = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]  # key -> (byte offset, dtype, shape)


def _carve(arena: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
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
        self.layout, self.views = layout, _carve(self.arena, layout)
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
        return _resolve(skeleton, self.views)

    def refs(self, tree: Any) -> Any:
        """`tree` (staged by `stage`) with buffers replaced by _Refs, for sending to the writer process."""
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


def _lowest_priority() -> None:
    """Nice this thread (Linux: per thread) or process to 19: it then runs on CPU the training loop leaves
    idle instead of taking a core from it (with 2 OpenMP threads on 2 cores, one preempted thread stalls
    every parallel region of the step)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _prefault(arena: torch.Tensor) -> None:
    _lowest_priority()
    arena.zero_()


def _collect_refs(obj: Any, by_ptr: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = by_ptr.get(obj.data_ptr()) if obj.numel() else None
        return _Ref(key) if key is not None else obj
    if isinstance(obj, dict):
        return {k: _collect_refs(v, by_ptr) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_collect_refs(v, by_ptr) for v in obj)
    return obj


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
    staging: Staging | None = None,
    rng: Any = None,
) -> Snapshot:
    """Copy the state at this step boundary: into `staging` (reused buffers, for a background write), or
    not at all when everything is on the CPU and the loop waits for the write (no staging given).
    `rng`: every rank's RNG state (a list in rank order) under DDP; this process's when None."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
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
        rng_state=rng if rng is not None else rng_state(),
        hf_rng_state=hf_rng_state(),
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
    try:
        hook(tmp / WEIGHTS)
        digests = {WEIGHTS: _save_weights(_unique_tensors(snap.model_state), tmp / WEIGHTS)}
        pickled = {
            "optimizer.pt": snap.optimizer_state,
            "scheduler.pt": snap.scheduler_state,
            "rng.pt": snap.rng_state,
            HF_RNG: snap.hf_rng_state,
        }
        if snap.scaler_state is not None:
            pickled["scaler.pt"] = snap.scaler_state
        for name, obj in pickled.items():
            hook(tmp / name)
            digests[name] = _torch_save(obj, tmp / name)
        snap.model_config.save_pretrained(tmp)
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


def shared_memory_room(nbytes: int) -> bool:
    """Whether /dev/shm can hold `nbytes` with room to spare: a container's default 64 MB cannot hold a big
    model's staging, and touching shared pages past its size would kill the process (SIGBUS)."""
    try:
        free = os.statvfs("/dev/shm")
    except OSError:
        return False
    return free.f_bavail * free.f_frsize >= nbytes * 1.25


class WriterDied(OSError):
    """The writer process ended in the middle of a write (killed, out of memory)."""


class ProcessWriter:
    """Writes snapshots in a separate process, so serialising, hashing and fsync never hold the training
    thread's GIL. The staging arena is sent once (its file descriptor, not its bytes); each write then sends
    only the small rest of the snapshot. Must be started from the thread that lives as long as the run:
    the child is killed when that thread's process dies (PR_SET_PDEATHSIG), never writing on as an orphan."""

    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_writer_main, args=(child, os.getpid()), name="checkpoint-writer", daemon=True)
        self._proc.start()
        child.close()
        self._generation = 0
        self._ready: bool | None = None

    def ready(self, *, wait: bool = True) -> bool:
        """Whether the process came up (it answers once its imports are done). One that could not (e.g. the
        main script cannot be re-imported by a spawned child) is not used: writes go back to a thread.
        `wait=False` answers False at once while it is still starting."""
        if self._ready is None and not wait and not self._conn.poll():
            return False
        if self._ready is None:
            try:
                self._ready = self._conn.recv() == ("ready",)
            except (EOFError, OSError):
                self._ready = False
        return self._ready

    def share(self, staging: Staging) -> None:
        """Send the staging arena (its file descriptor) unless the process has this one already; call only
        while no write is in flight (one sender on the pipe at a time)."""
        if staging.generation != self._generation:
            self._conn.send(("arena", staging.arena, staging.layout))
            self._generation = staging.generation

    def write(self, store: RunStore, run: str, snap: Snapshot, staging: Staging) -> Path:
        try:
            self.share(staging)
            sent = replace(
                snap, model_state=staging.refs(snap.model_state), optimizer_state=staging.refs(snap.optimizer_state)
            )
            self._conn.send(("write", str(store.root), run, sent))
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=5)
            store.clean_temp_dirs(run)  # what it left half-written; we hold the run's lock
            raise WriterDied(
                errno.EIO, f"the checkpoint writer process died (exit code {self._proc.exitcode})"
            ) from None
        if status == "error":
            raise value
        return Path(value)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop",))
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()


def _die_with_parent(parent: int) -> None:
    import signal

    # Ctrl-C and a closed terminal reach the whole process group: the trainer handles them (finish the
    # step, save, exit) and needs this process alive for that; it ends when the trainer does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux only; elsewhere the pipe's EOF still ends the loop
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _writer_main(conn: Any, parent: int) -> None:
    """The writer process: map the arena, then write each snapshot it is sent, answering ok or the error."""
    _die_with_parent(parent)
    _lowest_priority()  # the main thread; threads it starts (the fsync helper) inherit it
    torch.set_num_threads(1)
    with contextlib.suppress(ImportError, AttributeError):  # torch >= 2.6; the manifest checksums each file
        from torch.utils.serialization import config as serialization_config

        serialization_config.save.compute_crc32 = False
    import transformers  # noqa: F401  (snapshots carry its config and tokenizer: import before "ready")

    conn.send(("ready",))
    views: dict[str, torch.Tensor] = {}
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        if message[0] == "arena":
            views = _carve(message[1], message[2])
            message[1][::4096].sum()  # map every page now, while idle, not during the first write
            continue
        _, root, run, snap = message
        snap = replace(
            snap, model_state=_resolve(snap.model_state, views), optimizer_state=_resolve(snap.optimizer_state, views)
        )
        try:
            path = write(RunStore(root), run, snap)
        except Exception as exc:  # sent back whole: OSErrors keep errno and file name
            try:
                conn.send(("error", exc))
            except Exception:
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
            continue
        conn.send(("ok", str(path)))


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build a model without initialising weights that a checkpoint is about to overwrite."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights():
        yield


def _safe_load(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for a planted payload, RuntimeError for a torn file
        raise CheckpointInvalid(f"{path}: refused to load ({str(exc).splitlines()[0]})") from None


@dataclass
class LoadedState:
    trainer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    # one per rank (a list) under DDP; None: a Hugging Face checkpoint, whose RNG cannot continue here
    rng_state: dict[str, Any] | list[dict[str, Any]] | None


def load_into(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    verified: dict[str, Any] | None = None,
) -> LoadedState:
    """Verify, then load weights and optimizer/scaler state in place; returns what the loop restores itself.
    `verified` is the manifest a plan just hashed: if the checkpoint still holds it (same manifest, same
    sizes) the files are not hashed a second time."""
    foreign = not (path / MANIFEST).exists() and is_hf_checkpoint(path)
    if not foreign and (verified is None or not same_manifest(path, verified)):
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
    state_path = own_state_path(path)
    try:
        trainer_state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{state_path}: unreadable ({exc})") from None
    scheduler_state = _safe_load(path / "scheduler.pt") if (path / "scheduler.pt").exists() else {}
    if foreign:
        return LoadedState(from_hf_state(trainer_state), scheduler_state, None)
    return LoadedState(
        trainer_state=trainer_state,
        scheduler_state=scheduler_state,
        rng_state=_safe_load(path / "rng.pt"),
    )
