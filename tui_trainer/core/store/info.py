"""What the browser, `ls` and retention know of a run and of a checkpoint (cheap to build: no hashing), and
what a checkpoint's manifest says of itself (its eval loss, the ranks that wrote its shards)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    sharded: int | None = None  # FSDP's shards (engine/sharded_checkpoint.py): the ranks that wrote them

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
    damaged: str = ""  # why run.json is unusable (schema.py): listed as damaged, skipped by retention
    cycle: tuple[str, ...] = ()  # the parent chain loops back to this run (x -> y -> x): shown, never hidden
    restarts: int = 0  # times it continued by itself: torchrun restarts, requeues, --auto-resume (plan.py)

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


def sharded_world(manifest: dict[str, Any]) -> int | None:
    """The world size that wrote a sharded checkpoint ({"sharded": {"world_size": N}}), None for a full one."""
    sharded = manifest.get("sharded")
    world = sharded.get("world_size") if isinstance(sharded, dict) else None
    return world if type(world) is int and world >= 1 else None


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
