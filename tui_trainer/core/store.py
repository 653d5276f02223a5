"""The on-disk store as data: runs, lineage, checkpoint manifests and metrics (DESIGN §3).

torch-free, so the UI can browse and plot without importing torch. The layout is a contract:

    runs/<run>/run.json                 name, created, config, parent {run, step} | null, status, pinned
    runs/<run>/metrics.jsonl            one JSON object per line, append-only
    runs/<run>/checkpoints/step-NNNNNNNN/   a HF model dir + optimizer/scheduler/rng .pt + manifest.json
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from tui_trainer.core.errors import CheckpointInvalid, RunLocked, UserError

# Format 2 records an xxh3-128 checksum per file (about ten times cheaper than sha256: a 1.5 GB checkpoint
# hashes in a fraction of a second); format 1 (sha256) checkpoints still verify and load.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
HASH_KEY = "xxh3_128"
_HASHERS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
_RECORD_LOCK = threading.RLock()  # run.json read-modify-write within one process
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class CheckpointInfo:
    """One checkpoint as the browser shows it (cheap to build: no hashing)."""

    run: str
    step: int
    path: Path
    size_bytes: int
    created: float
    loss: float | None = None
    eval_loss: float | None = None
    valid: bool = True
    problem: str = ""
    pinned: bool = False
    verified: dict[str, Any] | None = None  # its manifest, once fully verified (hashed) in this process

    @property
    def ref(self) -> str:
        return f"{self.run}@{self.step}"


@dataclass
class RunInfo:
    """One run: its record plus its checkpoints, oldest first."""

    name: str
    path: Path
    created: float
    status: str
    parent: tuple[str, int] | None
    config: dict[str, Any]
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    pinned: tuple[int, ...] = ()
    world_size: int = 1  # data-parallel ranks that trained it (torchrun); runs before DDP have none recorded

    @property
    def newest(self) -> CheckpointInfo | None:
        valid = [c for c in self.checkpoints if c.valid]
        return valid[-1] if valid else None

    @property
    def best(self) -> CheckpointInfo | None:
        """The one definition of "best" (tree ◆, `ls`, retention): the valid checkpoint with the lowest eval
        loss measured on its own weights; None when no checkpoint has one (train loss is never used)."""
        scored = [c for c in self.checkpoints if c.valid and c.eval_loss is not None and math.isfinite(c.eval_loss)]
        return min(scored, key=lambda c: c.eval_loss or 0.0) if scored else None


def measured_eval(manifest: dict[str, Any], step: int, config: dict[str, Any]) -> float | None:
    """The manifest's eval loss if it was measured on this checkpoint's weights, else None.

    Newer manifests say so with `eval_step`. Older ones carried the trainer's last eval, possibly from an
    earlier step or the parent run: trust it only at a step the run evaluates (eval_every, max_steps)."""
    value = manifest.get("eval_loss")
    if not isinstance(value, (int, float)):
        return None
    if "eval_step" in manifest:
        return float(value) if manifest["eval_step"] == step else None
    train = config.get("train", {}) if isinstance(config, dict) else {}
    every, max_steps = train.get("eval_every"), train.get("max_steps")
    if not isinstance(every, int):
        return float(value)  # no config to judge by: keep what the manifest says
    at_eval = (every > 0 and step % every == 0) or step == max_steps
    return float(value) if at_eval else None


# ---------------------------------------------------------------- names and refs


def validate_run_name(name: str) -> str:
    if "/" in name or "\\" in name or os.sep in name:
        raise UserError(f"run name {name!r}: must not contain a path separator")
    if not RUN_NAME_RE.match(name):
        raise UserError(
            f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'RUN' -> (RUN, None); 'RUN@STEP' -> (RUN, STEP). Raises UserError on anything else."""
    name, sep, step = ref.partition("@")
    if sep and not re.fullmatch(r"\d+", step):
        raise UserError(f"{ref!r}: expected RUN or RUN@STEP with STEP a whole number")
    validate_run_name(name)
    return name, int(step) if sep else None


def checkpoint_dirname(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


# ---------------------------------------------------------------- durable files


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """Standard JSON for a flat record: a NaN/Infinity value becomes null and `nonfinite` says what it was,
    e.g. {"loss": null, "nonfinite": {"loss": "nan"}} (readers treat the null as a gap)."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to `path`, fsync, then rename over it: readers see the old or the new file."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)  # standard JSON: NaN here is a bug, fail loudly
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def hash_file(path: Path, algorithm: str = HASH_KEY) -> str:
    """Checksum of a file's bytes; both hashers release the GIL on big buffers, so other threads run."""
    digest = _HASHERS[algorithm]()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(path, "sha256")


def write_manifest(
    directory: Path, meta: dict[str, Any], known: dict[str, tuple[str, int]] | None = None
) -> dict[str, Any]:
    """Hash every file in `directory` and write manifest.json LAST (fsynced); returns the manifest.
    `known` holds (xxh3_128, size) of files hashed while they were written, so they are not read again."""
    files = {}
    known = known or {}
    for entry in sorted(directory.iterdir()):
        if entry.name == MANIFEST or not entry.is_file():
            continue
        digest, size = known[entry.name] if entry.name in known else (hash_file(entry), entry.stat().st_size)
        files[entry.name] = {HASH_KEY: digest, "size": size}
    manifest = {"format": FORMAT_VERSION, **json_safe(meta), "files": files}
    with open(directory / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointInvalid(f"{path}: missing manifest") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointInvalid(f"{path}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointInvalid(f"{path}: manifest has no file list")
    if manifest.get("format") not in READABLE_FORMATS:
        raise CheckpointInvalid(f"{path}: unsupported checkpoint format {manifest.get('format')!r}")
    return manifest


def verify_checkpoint(directory: Path, *, deep: bool = True) -> dict[str, Any]:
    """Raise CheckpointInvalid naming the first bad file; `deep=False` checks sizes only (no hashing)."""
    manifest = read_manifest(directory)
    for name, entry in manifest["files"].items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointInvalid(f"{path}: missing file listed in the manifest") from None
        if size != entry.get("size"):
            raise CheckpointInvalid(f"{path}: size {size} bytes, manifest says {entry.get('size')}")
        if deep:
            algorithm = HASH_KEY if HASH_KEY in entry else "sha256"  # format 1 manifests hold sha256
            if hash_file(path, algorithm) != entry.get(algorithm):
                raise CheckpointInvalid(f"{path}: {algorithm} does not match the manifest (file is corrupt)")
    return manifest


def same_manifest(directory: Path, verified: dict[str, Any]) -> bool:
    """True when `directory` still holds the manifest verified earlier and every file has its listed size:
    lets a load skip a second full hashing pass right after a plan verified the checkpoint."""
    try:
        manifest = verify_checkpoint(directory, deep=False)
    except CheckpointInvalid:
        return False
    return manifest == verified


# ---------------------------------------------------------------- the lock


class RunLock:
    """An advisory flock on runs/<run>/.lock: the kernel drops it when the holder dies, even on kill -9."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd: int | None = None
        self.stale_holder = ""  # "pid N" of a process that died holding the lock (kill -9, crash)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"run {self.path.parent.name!r} is in use by {holder}; "
                    "stop that process first or branch from one of its checkpoints"
                ) from None
            raise
        # a clean release empties the file, so a name still in it is a holder that died without releasing
        self.stale_holder = os.read(fd, 200).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- metrics


class MetricsWriter:
    """Appends JSON lines to metrics.jsonl; each line is flushed so a crash tears at most the last one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
        if _ends_mid_line(path):
            self._fh.write("\n")  # a crash tore the last line: start ours on a fresh one

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._fh.flush()

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records in step order as one clean curve: a torn line is skipped, and a
    {"event": "resume", "step": N} marker supersedes every earlier record after step N."""
    records: list[dict[str, Any]] = []
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115
    except FileNotFoundError:
        return records
    with fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # torn write from a crash
            if not isinstance(record, dict):
                continue
            if record.get("event") == "resume":
                cut = record.get("step", 0)
                records = [r for r in records if r.get("step", 0) <= cut]
                continue
            if "step" in record:
                records.append(record)
    return records


# ---------------------------------------------------------------- the store


class RunStore:
    """Reads and writes runs under one directory (default ./runs)."""

    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root)

    # paths
    def run_dir(self, name: str) -> Path:
        return self.root / name

    def checkpoints_dir(self, name: str) -> Path:
        return self.run_dir(name) / "checkpoints"

    def checkpoint_dir(self, name: str, step: int) -> Path:
        return self.checkpoints_dir(name) / checkpoint_dirname(step)

    def metrics_path(self, name: str) -> Path:
        return self.run_dir(name) / "metrics.jsonl"

    def samples_path(self, name: str) -> Path:
        return self.run_dir(name) / "samples.jsonl"

    # runs
    def exists(self, name: str) -> bool:
        return (self.run_dir(name) / "run.json").is_file()

    def run_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "run.json").is_file())

    def read_record(self, name: str) -> dict[str, Any]:
        path = self.run_dir(name) / "run.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            known = ", ".join(self.run_names()) or "none yet"
            raise UserError(f"no run named {name!r} in {self.root} (runs: {known})") from None
        except ValueError:
            raise UserError(f"{path}: run.json is not valid JSON") from None
        return record

    def create_run(self, name: str, config: dict[str, Any], parent: tuple[str, int] | None) -> dict[str, Any]:
        validate_run_name(name)
        run_dir = self.run_dir(name)
        if self.exists(name):
            raise UserError(f"run {name!r} already exists in {self.root}; pick another --run name")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        record = {
            "name": name,
            "created": time.time(),
            "config": config,
            "parent": {"run": parent[0], "step": parent[1]} if parent else None,
            "status": "created",
            "pinned": [],
        }
        write_json_atomic(run_dir / "run.json", record)
        return record

    def update_record(self, name: str, **changes: Any) -> dict[str, Any]:
        with _RECORD_LOCK:  # the app pins from its thread while the trainer writes status from its own
            record = self.read_record(name)
            record.update(changes)
            write_json_atomic(self.run_dir(name) / "run.json", record)
            return record

    def set_pinned(self, name: str, step: int, pinned: bool) -> None:
        with _RECORD_LOCK:
            record = self.read_record(name)
            steps = set(record.get("pinned", []))
            steps = steps | {step} if pinned else steps - {step}
            self.update_record(name, pinned=sorted(steps))

    def unique_name(self, base: str) -> str:
        name, n = base, 2
        while self.run_dir(name).exists():
            name, n = f"{base}-{n}", n + 1
        return name

    def run(self, name: str) -> RunInfo:
        record = self.read_record(name)
        parent = record.get("parent")
        pinned = tuple(record.get("pinned", []))
        info = RunInfo(
            name=name,
            path=self.run_dir(name),
            created=record.get("created", 0.0),
            status=record.get("status", "unknown"),
            parent=(parent["run"], int(parent["step"])) if parent else None,
            config=record.get("config", {}),
            pinned=pinned,
            world_size=int(record.get("world_size", 1)),
        )
        info.checkpoints = list(self._scan_checkpoints(name, set(pinned), info.config))
        return info

    def runs(self) -> list[RunInfo]:
        """Every run; one with an unreadable run.json is listed as broken instead of hiding the rest."""
        out = []
        for name in self.run_names():
            try:
                out.append(self.run(name))
            except UserError as exc:
                out.append(RunInfo(name, self.run_dir(name), 0.0, f"broken: {exc}", None, {}))
        return out

    def children(self) -> dict[tuple[str, int], list[str]]:
        """(parent run, step) -> names of runs branched from it."""
        out: dict[tuple[str, int], list[str]] = {}
        for name in self.run_names():
            try:
                parent = self.read_record(name).get("parent")
            except UserError:
                continue
            if parent:
                out.setdefault((parent["run"], int(parent["step"])), []).append(name)
        return out

    def _scan_checkpoints(self, name: str, pinned: set[int], config: dict[str, Any]) -> Iterator[CheckpointInfo]:
        root = self.checkpoints_dir(name)
        if not root.is_dir():
            return
        for entry in sorted(root.iterdir()):
            if not entry.name.startswith(CHECKPOINT_PREFIX) or not entry.is_dir():
                continue
            try:
                step = int(entry.name[len(CHECKPOINT_PREFIX) :])
            except ValueError:
                continue
            info = CheckpointInfo(run=name, step=step, path=entry, size_bytes=0, created=0.0)
            info.pinned = step in pinned
            try:
                manifest = verify_checkpoint(entry, deep=False)
                info.size_bytes = sum(f["size"] for f in manifest["files"].values())
                info.created = float(manifest.get("created", 0.0))
                info.loss = manifest.get("loss")
                info.eval_loss = measured_eval(manifest, step, config)
            except CheckpointInvalid as exc:
                info.valid, info.problem = False, str(exc)
                info.size_bytes = _bytes_on_disk(entry)  # no manifest to trust: what is actually there
            yield info

    def checkpoint(self, name: str, step: int | None, *, purpose: str = "resume from") -> CheckpointInfo:
        """The named checkpoint, or the newest valid one when step is None (`purpose` words the refusal)."""
        info = self.run(name)
        if step is None:
            if info.newest is None:
                raise UserError(f"run {name!r} has no valid checkpoint to {purpose}")
            return info.newest
        for ckpt in info.checkpoints:
            if ckpt.step == step:
                return ckpt
        steps = ", ".join(str(c.step) for c in info.checkpoints) or "none"
        raise UserError(f"run {name!r} has no checkpoint at step {step} (checkpoints: {steps})")

    # lineage and metrics
    def metrics(self, name: str) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path(name))

    def samples(self, name: str) -> list[dict[str, Any]]:
        """Text sampled during training, oldest first: {"step", "prompt", "text", "time"} per line of
        samples.jsonl (absent file: none). A torn or malformed line is skipped, like metrics."""
        return [r for r in read_metrics(self.samples_path(name)) if isinstance(r.get("text"), str)]

    def lineage(self, name: str) -> list[tuple[str, int | None]]:
        """[(root run, branch step), ..., (name, None)]: the chain of runs this run's history runs through."""
        chain: list[tuple[str, int | None]] = [(name, None)]
        seen = {name}
        parent = self.read_record(name).get("parent")
        while parent and parent["run"] not in seen and self.exists(parent["run"]):
            chain.insert(0, (parent["run"], int(parent["step"])))
            seen.add(parent["run"])
            parent = self.read_record(parent["run"]).get("parent")
        # each entry's step is where the *next* run branched off it
        return chain

    def history(self, name: str) -> list[tuple[str, list[dict[str, Any]]]]:
        """This run's curve as segments: each ancestor's records up to the branch point, then its own."""
        segments = []
        for run, until in self.lineage(name):
            records = self.metrics(run)
            if until is not None:
                records = [r for r in records if r["step"] <= until]
            segments.append((run, records))
        return segments

    # housekeeping
    def clean_temp_dirs(self, name: str) -> list[Path]:
        """Remove half-written checkpoint dirs left by a crash (they never had a manifest renamed in)."""
        removed = []
        root = self.checkpoints_dir(name)
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.startswith(TEMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        # a `.tmp-run.json.<pid>` left by a process killed inside write_json_atomic
        run_dir = self.run_dir(name)
        for entry in run_dir.glob(f"{TEMP_PREFIX}*") if run_dir.is_dir() else ():
            pid = entry.name.rpartition(".")[2]
            if entry.is_file() and pid.isdigit() and not _pid_alive(int(pid)):
                entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def retention_victims(self, name: str, keep_last: int) -> list[CheckpointInfo]:
        """Checkpoints past keep_last that are not the newest, best, pinned or a branch's parent."""
        info = self.run(name)
        valid = [c for c in info.checkpoints if c.valid]
        protected = {c.step for c in valid[-keep_last:]}
        if info.best is not None:
            protected.add(info.best.step)
        protected.update(info.pinned)
        protected.update(step for (run, step) in self.children() if run == name)
        return [c for c in valid if c.step not in protected]

    def apply_retention(self, name: str, keep_last: int) -> list[CheckpointInfo]:
        victims = self.retention_victims(name, keep_last)
        for ckpt in victims:
            # rename first so a crash mid-delete leaves a temp dir, never a half checkpoint
            doomed = ckpt.path.with_name(f"{TEMP_PREFIX}del-{ckpt.path.name}")
            os.replace(ckpt.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return victims


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


def _bytes_on_disk(directory: Path) -> int:
    total = 0
    for entry in directory.iterdir():
        with contextlib.suppress(OSError):  # a file vanishing under us (retention) is not an error here
            if entry.is_file():
                total += entry.stat().st_size
    return total


@dataclass(frozen=True)
class FamilyNode:
    """A run in the family tree, with the runs branched from it (in display order)."""

    run: RunInfo
    children: tuple[FamilyNode, ...] = ()


def family_tree(runs: Iterable[RunInfo]) -> list[FamilyNode]:
    """The one order of runs, for `ls` and the app: roots oldest first (then by name); a run's branches by
    the step they started from, then by name. A run whose parent is gone is a root."""
    by_name = {r.name: r for r in runs}
    kids: dict[str, list[RunInfo]] = {}
    roots = []
    for r in by_name.values():
        if r.parent and r.parent[0] in by_name:
            kids.setdefault(r.parent[0], []).append(r)
        else:
            roots.append(r)

    def node(run: RunInfo) -> FamilyNode:
        branches = sorted(kids.get(run.name, []), key=lambda c: (c.parent[1] if c.parent else 0, c.name))
        return FamilyNode(run, tuple(node(b) for b in branches))

    return [node(root) for root in sorted(roots, key=lambda r: (r.created, r.name))]


def iter_tree(store: RunStore) -> Iterable[tuple[int, RunInfo]]:
    """Runs depth-first as a family tree: (depth, run), children after their parent."""

    def walk(node: FamilyNode, depth: int) -> Iterator[tuple[int, RunInfo]]:
        yield depth, node.run
        for child in node.children:
            yield from walk(child, depth + 1)

    for root in family_tree(store.runs()):
        yield from walk(root, 0)
