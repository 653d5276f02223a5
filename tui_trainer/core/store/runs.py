"""The store itself: runs, their records and checkpoints, names and refs, lineage, retention."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tui_trainer.core import hf_runs
from tui_trainer.core.errors import CheckpointDeleted, CheckpointInvalid, RunDamaged, UserError
from tui_trainer.core.store.files import TEMP_PREFIX, UnsafeFile, pid_alive, read_json, write_json_atomic
from tui_trainer.core.store.info import CheckpointInfo, RunInfo, measured_eval, sharded_world
from tui_trainer.core.store.manifest import (
    CHECKPOINT_PREFIX,
    checkpoint_dirname,
    claim_for_deletion,
    verify_checkpoint,
)
from tui_trainer.core.store.metrics import read_metrics
from tui_trainer.core.store.names import new_run_id, validate_run_name
from tui_trainer.core.store.schema import RUN_NAME_RE, Damaged, check_record

_RECORD_LOCK = threading.RLock()  # run.json read-modify-write within one process


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
            if (p / "run.json").is_file()
            or (p / "run.json").is_symlink()  # not followed: listed as damaged
            or (RUN_NAME_RE.fullmatch(p.name) and hf_runs.is_hf_output_dir(p))
        )

    def read_record(self, name: str) -> dict[str, Any]:
        """run.json, checked against the schema (schema.py); RunDamaged names what is wrong with it."""
        path = self.run_dir(name) / "run.json"
        try:
            record = read_json(path)  # no symlink out of the runs dir, no FIFO, bounded
        except FileNotFoundError:
            if self.is_foreign(name):
                return hf_runs.hf_record(self.run_dir(name))
            known = ", ".join(self.run_names()) or "none yet"
            raise UserError(f"no run named {name!r} in {self.root} (runs: {known})") from None
        except UnsafeFile as exc:
            raise RunDamaged(f"{path}: {exc.strerror}") from None
        except ValueError:
            raise RunDamaged(f"{path}: run.json is not valid JSON") from None
        try:
            return check_record(record)
        except Damaged as exc:
            raise RunDamaged(f"{path}: {exc}") from None

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
            steps = set(record.get("pinned") or [])
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
        pinned = tuple(record.get("pinned") or [])
        info = RunInfo(
            name=name,
            path=self.run_dir(name),
            created=float(record.get("created") or 0.0),
            status=record.get("status") or "unknown",
            parent=(parent["run"], int(parent["step"])) if parent else None,
            config=record.get("config") or {},
            pinned=pinned,
            foreign=bool(record.get("hf")),
            world_size=int(record.get("world_size", 1)),
            restarts=int(record.get("restarts", 0)),
        )
        info.checkpoints = sorted(self._scan_checkpoints(name, set(pinned), info.config), key=lambda c: c.step)
        return info

    def runs(self) -> list[RunInfo]:
        """Every run; one whose run.json is unusable is listed as damaged instead of hiding the rest, and a
        loop in the parent chain is named on each run in it."""
        out = []
        for name in self.run_names():
            try:
                out.append(self.run(name))
            except UserError as exc:  # RunDamaged, or a run dir removed while we listed it
                if self.run_dir(name).is_dir():
                    out.append(RunInfo(name, self.run_dir(name), 0.0, "damaged", None, {}, damaged=str(exc)))
        mark_cycles(out)
        return out

    def children(self) -> dict[tuple[str, int], list[str]]:
        """(parent run, step) -> names of runs branched from it."""
        out: dict[tuple[str, int], list[str]] = {}
        for name in self.run_names():
            try:
                parent = self.read_record(name).get("parent")
            except UserError:  # damaged: it protects nothing and stops no one (retention reads this)
                continue
            if parent:
                out.setdefault((parent["run"], int(parent["step"])), []).append(name)
        return out

    def _scan_checkpoints(self, name: str, pinned: set[int], config: dict[str, Any]) -> Iterator[CheckpointInfo]:
        yield from self._own_checkpoints(name, pinned, config)
        # an HF Trainer's checkpoint-N folders: its output dir, or a run its TuiTrainerCallback records
        for step, path in hf_runs.hf_checkpoints(self.run_dir(name)):
            loss, eval_loss = hf_runs.checkpoint_losses(path, step)
            try:
                created = path.stat().st_mtime
            except FileNotFoundError:
                continue  # deleted (the HF Trainer's own save_total_limit) while we listed it
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
                info.created = float(manifest.get("created") or 0.0)
                info.loss = manifest.get("loss")
                info.eval_loss = measured_eval(manifest, step, config)
                info.sharded = sharded_world(manifest)
            except CheckpointDeleted:
                continue  # retention removed it while we listed it: it is simply not there
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
        while parent and parent["run"] not in seen and self.exists(parent["run"]):  # `seen`: a cycle ends here
            chain.insert(0, (parent["run"], int(parent["step"])))
            seen.add(parent["run"])
            try:
                parent = self.read_record(parent["run"]).get("parent")
            except UserError:
                break  # a damaged ancestor: the history starts at it
        # each entry's step is where the *next* run branched off it
        return chain

    def recorded_ancestors(self, name: str) -> list[str]:
        """The parent names `name`'s record chain goes through, nearest first, including a parent whose run
        was deleted since (the chain stops there) and stopping at a loop or a damaged record."""
        out: list[str] = []
        current = name
        while True:
            try:
                parent = self.read_record(current).get("parent") if self.exists(current) else None
            except UserError:
                return out
            if not parent or parent["run"] in out or parent["run"] == name:
                return out
            out.append(parent["run"])
            current = parent["run"]

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
                    _remove(entry)
                    removed.append(entry)
        # a `.tmp-run.json.<pid>` left by a process killed inside write_json_atomic
        run_dir = self.run_dir(name)
        for entry in run_dir.glob(f"{TEMP_PREFIX}*") if run_dir.is_dir() else ():
            pid = entry.name.rpartition(".")[2]
            if entry.is_file() and pid.isdigit() and not pid_alive(int(pid)):
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
        """Delete the retention victims; one a reader holds now (manifest.read_lease) waits for the next pass."""
        deleted = []
        for ckpt in self.retention_victims(name, keep_last):
            if ckpt.path.is_symlink():  # a checkpoint linked in from elsewhere: drop the link, never its target
                ckpt.path.unlink(missing_ok=True)
                deleted.append(ckpt)
                continue
            claim = claim_for_deletion(ckpt.path)
            if claim is None:
                continue  # being read (verify, export, a branch loading it)
            try:
                # rename first so a crash mid-delete leaves a temp dir, never a half checkpoint
                doomed = ckpt.path.with_name(f"{TEMP_PREFIX}del-{ckpt.path.name}")
                os.replace(ckpt.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                deleted.append(ckpt)
            finally:
                if claim >= 0:
                    os.close(claim)
        return deleted

    def deleted_message(self, name: str, step: int) -> str:
        """What a reader says about a checkpoint that retention deleted under it."""
        try:
            newest = self.run(name).newest
        except UserError:
            newest = None
        where = f"newest is {newest.ref}" if newest is not None else "the run has no checkpoint now"
        return f"{name}@{step} was deleted by retention — {where}"


def mark_cycles(runs: list[RunInfo]) -> None:
    """Name the loop on every run whose parent chain comes back to itself (`rm -rf runs/x`, then
    `branch y --name x` where y's parent was the old x): the tree shows such a run as a root, marked."""
    by_name = {r.name: r for r in runs}
    for run in runs:
        chain, current = [run.name], run
        while current.parent and current.parent[0] in by_name:
            current = by_name[current.parent[0]]
            if current.name == run.name:
                run.cycle = (*chain, run.name)
                break
            if current.name in chain:
                break  # a loop further up, not through this run
            chain.append(current.name)


def _remove(entry: Path) -> None:
    """A leftover temp entry: a link is unlinked (never followed), a dir removed, a file deleted."""
    with contextlib.suppress(OSError):
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _bytes_on_disk(directory: Path) -> int:
    total = 0
    try:
        entries = list(directory.iterdir())
    except OSError:  # removed (retention) while we listed it
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):  # a file vanishing under us (retention) is not an error here
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_size
    return total
