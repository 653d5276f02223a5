"""The store itself: runs, their records and checkpoints, names and refs, lineage, retention."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tui_trainer.core import hf_runs
from tui_trainer.core.errors import CheckpointInvalid, UserError
from tui_trainer.core.store.files import TEMP_PREFIX, write_json_atomic
from tui_trainer.core.store.manifest import CHECKPOINT_PREFIX, checkpoint_dirname, verify_checkpoint
from tui_trainer.core.store.metrics import read_metrics

_RECORD_LOCK = threading.RLock()  # run.json read-modify-write within one process


RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUN_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_run_id() -> str:
    """A random id for a new run's record: the control channel's hello names it, so a client can tell the
    run it asked for from a copy of its dir or another run of the same name (control/protocol.py)."""
    return secrets.token_hex(16)


def read_run_id(run_dir: Path) -> str | None:
    """The run id in `run_dir`'s run.json; None for a run made before ids (or no readable record)."""
    try:  # no symlink, FIFO or device: the control server's thread reads this and must never block on it
        fd = os.open(run_dir / "run.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            record = json.loads(f.read(64 * 1024 * 1024))
    except (OSError, ValueError):
        return None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) and RUN_ID_RE.fullmatch(run_id) else None


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
    manifest: bool = True  # False: a Hugging Face Trainer checkpoint-N (valid, but nothing to verify against)

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
    foreign: bool = False  # a Hugging Face Trainer output dir: read-only, never trained in place
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

    def samples_path(self, name: str) -> Path:
        return self.run_dir(name) / "samples.jsonl"

    def samples(self, name: str) -> list[dict[str, Any]]:
        """Text sampled during training, oldest first: {"step", "prompt", "text", "time"} per line of
        samples.jsonl (absent file: none). A torn or malformed line is skipped and a resume marker supersedes
        the samples after its step, as in metrics.jsonl."""
        return [r for r in read_metrics(self.samples_path(name)) if isinstance(r.get("text"), str)]

    def metrics_path(self, name: str) -> Path:
        return self.run_dir(name) / "metrics.jsonl"

    # runs
    def exists(self, name: str) -> bool:
        return (self.run_dir(name) / "run.json").is_file() or self.is_foreign(name)

    def is_foreign(self, name: str) -> bool:
        """A Hugging Face Trainer output dir placed (or symlinked) in the runs dir (core/hf_runs.py)."""
        return hf_runs.is_hf_output_dir(self.run_dir(name))

    def run_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (p / "run.json").is_file() or (RUN_NAME_RE.match(p.name) and hf_runs.is_hf_output_dir(p))
        )

    def read_record(self, name: str) -> dict[str, Any]:
        path = self.run_dir(name) / "run.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.is_foreign(name):
                return hf_runs.hf_record(self.run_dir(name))
            known = ", ".join(self.run_names()) or "none yet"
            raise UserError(f"no run named {name!r} in {self.root} (runs: {known})") from None
        except ValueError:
            raise UserError(f"{path}: run.json is not valid JSON") from None
        return record

    def create_run(
        self, name: str, config: dict[str, Any], parent: tuple[str, int] | None, *, with_checkpoints: bool = True
    ) -> dict[str, Any]:
        """`with_checkpoints=False`: no checkpoints/ folder (an HF Trainer's output dir keeps its own)."""
        validate_run_name(name)
        run_dir = self.run_dir(name)
        if (run_dir / "run.json").is_file():  # an HF output dir may become a run (integrations/hf.py)
            raise UserError(f"run {name!r} already exists in {self.root}; pick another --name")
        (run_dir / "checkpoints" if with_checkpoints else run_dir).mkdir(parents=True, exist_ok=True)
        record = {
            "name": name,
            "run_id": new_run_id(),
            "created": time.time(),
            "config": config,
            "parent": {"run": parent[0], "step": parent[1]} if parent else None,
            "status": "created",
            "pinned": [],
        }
        write_json_atomic(run_dir / "run.json", record)
        return record

    def update_record(self, name: str, **changes: Any) -> dict[str, Any]:
        if self.is_foreign(name):
            raise UserError(f"run {name!r} is a Hugging Face Trainer output dir: tui-trainer never modifies it")
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
            foreign=bool(record.get("hf")),
            world_size=int(record.get("world_size", 1)),
        )
        info.checkpoints = sorted(self._scan_checkpoints(name, set(pinned), info.config), key=lambda c: c.step)
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
        yield from self._own_checkpoints(name, pinned, config)
        # an HF Trainer's checkpoint-N folders: its output dir, or a run its TuiTrainerCallback records
        for step, path in hf_runs.hf_checkpoints(self.run_dir(name)):
            loss, eval_loss = hf_runs.checkpoint_losses(path, step)
            created = path.stat().st_mtime
            yield CheckpointInfo(
                run=name,
                step=step,
                path=path,
                size_bytes=_bytes_on_disk(path),
                created=created,
                loss=loss,
                eval_loss=eval_loss,
                problem=hf_runs.NO_MANIFEST,
                pinned=step in pinned,
                manifest=False,
            )

    def _own_checkpoints(self, name: str, pinned: set[int], config: dict[str, Any]) -> Iterator[CheckpointInfo]:
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
        if self.is_foreign(name):
            return hf_runs.hf_metrics(self.run_dir(name))
        return read_metrics(self.metrics_path(name))

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
