"""Turn a user's request (train / resume / branch) into a RunPlan, validating everything that can be
validated without torch. torch-free, so the CLI and the UI can reject bad input at once.

History is append-only (ARCHITECTURE.md §3): resuming anything but a run's newest checkpoint, or resuming with
changed settings, starts a new branch run whose `parent` records where it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tui_trainer.core import hf_runs
from tui_trainer.core.config import Config
from tui_trainer.core.errors import CheckpointDeleted, CheckpointInvalid, ConfigError, RunAlreadyFinished, UserError
from tui_trainer.core.hf_runs import CROSS_FRAMEWORK
from tui_trainer.core.sources import resolve_source
from tui_trainer.core.store import CheckpointInfo, RunStore, parse_ref, validate_run_name


@dataclass
class RunPlan:
    """What the trainer will do: which run it writes, from which checkpoint, with which config."""

    run: str
    config: Config
    start: Path | None = None
    start_step: int = 0
    parent: tuple[str, int] | None = None
    new_run: bool = True
    notes: list[str] = field(default_factory=list)
    verified: dict | None = None  # the start checkpoint's manifest as hashed here: loading need not re-hash
    world_size: int = 1  # the data-parallel ranks it trains on (torchrun)
    # why a run continues by itself ("elastic restart", "requeue", "auto-resume"): marked in metrics.jsonl and
    # counted in run.json's `restarts`; None for everything a person asked for by name (train, resume, branch)
    restart: str | None = None
    auto_resume: bool = False  # started or continued by `--auto-resume`: a supervisor restarts it (run.json)


def default_run_name(store: RunStore, base: str | None = None) -> str:
    """`base` made unique (demo, demo-2, …); without one the next of run-1, run-2, … (short to type)."""
    if base:
        return store.unique_name(base)
    taken = [int(m.group(1)) for n in store.run_names() if (m := re.fullmatch(r"run-(\d+)", n))]
    return store.unique_name(f"run-{max(taken, default=0) + 1}")


def plan_train(store: RunStore, config: Config, name: str | None = None) -> RunPlan:
    config.validate()
    resolve_source(config.data.path)  # a missing or empty corpus fails here, before torch loads
    if name is None:
        name = default_run_name(store)
    validate_run_name(name)
    if store.exists(name):
        raise UserError(f"run {name!r} already exists; use `tui-trainer resume {name}` or pick another --name")
    return RunPlan(run=name, config=config)


def plan_auto_resume(
    store: RunStore, config: Config, name: str | None, world_size: int = 1, *, reason: str = "auto-resume"
) -> RunPlan:
    """`train --name R --auto-resume` (and torchrun restarting the job that trains R): start R if it does not
    exist, else continue it from its newest valid checkpoint — with the settings it was started with only. A
    changed setting is refused naming each key (a changed lr is `resume --set` or `branch`, never a silent
    continuation); a finished run raises RunAlreadyFinished (nothing to do, exit 0)."""
    if not name:
        raise UserError("--auto-resume needs --name: the run to start, or to continue when it exists")
    config.validate()
    if not store.exists(name):
        plan = plan_train(store, config, name)
        plan.auto_resume = True
        return plan
    info = store.run(name)
    if info.foreign:
        raise UserError(f"run {name!r} is a Hugging Face Trainer output dir; tui-trainer never trains in it")
    recorded = Config.from_dict(info.config, source=f"{name} run.json", validate=False).to_dict()
    changed = [
        f"{section}.{key} ({recorded.get(section, {}).get(key)!r} -> {value!r})"
        for section, values in config.to_dict().items()
        for key, value in values.items()
        if recorded.get(section, {}).get(key) != value
    ]
    if world_size != info.world_size and config.train.parallel != "fsdp":  # FSDP continues on any number of ranks
        changed.append(f"ranks ({info.world_size} -> {world_size})")
    if changed:
        raise UserError(
            f"run {name!r} was started with other settings: {', '.join(changed)}; --auto-resume only continues "
            f"it unchanged (change settings with `tui-trainer resume {name} --set KEY=VALUE` or `branch`)"
        )
    newest = info.newest
    if info.status == "finished" or (newest is not None and newest.step >= config.train.max_steps):
        at = f" at step {newest.step}" if newest is not None else ""
        raise RunAlreadyFinished(f"{name} already finished{at}; nothing to do")
    plan = plan_resume(store, name, [], world_size)
    plan.restart, plan.auto_resume = reason, True
    start = f"from step {plan.start_step}" if plan.start is not None else "from the start (no checkpoint yet)"
    plan.notes.append(f"{reason}: continuing {name} {start}")
    return plan


def plan_resume(
    store: RunStore, ref: str, overrides: list[str] | None = None, world_size: int = 1, *, name: str | None = None
) -> RunPlan:
    """`world_size`: the ranks this job runs on (torchrun); another count than the run's is a changed
    setting (the effective batch changes with it), so it continues in a branch run, named `name` if given."""
    run, step = parse_ref(ref)
    info = store.run(run)
    if step is None and not info.checkpoints:
        if info.parent is not None:
            return _restart_from_parent_plan(store, info.config, run, info.parent, overrides or [])
        return _restart_plan(store, info.config, run, overrides or [])
    ckpt, notes = _choose_checkpoint(store, run, step)
    config = _derived_config(_recorded(info.config, ckpt, overrides or [], notes), overrides or [], ref)
    # newest of ALL its checkpoints, invalid ones included: continuing in place from behind a corrupt one
    # would supersede history and collide with the corrupt dir; a branch leaves it there as evidence
    _check_past_start(config, ckpt)
    # an HF Trainer's output dir is never written: its checkpoints always continue in a branch
    is_newest = ckpt.step == max(c.step for c in info.checkpoints) and not info.foreign and ckpt.manifest
    same_config = config.to_dict() == Config.from_dict(info.config, validate=False).to_dict()
    # FSDP's checkpoints continue on any number of ranks with the same global batch: DCP reshards a sharded
    # one, and a LoRA one is the adapter whole (engine/fsdp_lora.py)
    any_world = config.train.parallel == "fsdp" and (_sharded(ckpt) or bool(config.lora.r))
    same_world = world_size == info.world_size or any_world
    if is_newest and same_config and same_world:
        if world_size != info.world_size:
            notes.append(f"continuing {run} on {world_size} rank(s) (it ran on {info.world_size}): same global batch")
        return RunPlan(
            run=run,
            config=config,
            start=ckpt.path,
            start_step=ckpt.step,
            new_run=False,
            notes=notes,
            verified=ckpt.verified,
            world_size=world_size,
        )
    name = validate_run_name(name) if name else branch_name(store, run, ckpt.step)
    _check_new_name(store, name, run)
    why = "changes settings" if is_newest else "is not the run's newest checkpoint"
    if is_newest and same_config:
        why = f"runs on {world_size} rank(s), not {info.world_size}"
    if info.foreign or not ckpt.manifest:
        why = "is a Hugging Face Trainer checkpoint"
    notes.append(f"{run}@{ckpt.step} {why}: continuing in a new branch run {name!r}; {run!r} is left untouched")
    plan = _branch_plan(name, config, ckpt, notes)
    plan.world_size = world_size
    return plan


def _sharded(ckpt: CheckpointInfo) -> bool:
    """A checkpoint in the sharded format (engine/sharded_checkpoint.py: DCP's index, no model.safetensors)."""
    return (ckpt.path / ".metadata").is_file()


def _restart_plan(store: RunStore, recorded: dict, run: str, overrides: list[str]) -> RunPlan:
    """A run stopped (kill -9, power loss) before its first checkpoint has nothing to lose: start it
    over from step 0 in place; its resume marker at step 0 supersedes the lost steps' metrics."""
    config = _derived_config(recorded, overrides, run)
    if config.to_dict() != Config.from_dict(recorded, validate=False).to_dict():
        raise UserError(f"run {run!r} has no checkpoint to branch from; start a new run with these settings")
    note = f"run {run!r} stopped before its first checkpoint: starting it over from step 0"
    return RunPlan(run=run, config=config, new_run=False, notes=[note])


def _restart_from_parent_plan(
    store: RunStore, recorded: dict, run: str, parent: tuple[str, int], overrides: list[str]
) -> RunPlan:
    """A branch stopped (a NaN, a kill) before its first checkpoint has nothing of its own to keep: it
    restarts in place from the checkpoint it branched from, never from random weights. Changed settings
    apply in place too (the trainer records them in run.json): no step of this run was kept yet."""
    ckpt, notes = _choose_checkpoint(store, parent[0], parent[1])
    config = _derived_config(recorded, overrides, run)
    notes.append(f"run {run!r} stopped before its first checkpoint: restarting it from {ckpt.ref}, where it branched")
    return RunPlan(
        run=run, config=config, start=ckpt.path, start_step=ckpt.step, parent=parent, new_run=False, notes=notes
    )


def branch_name(store: RunStore, run: str, step: int) -> str:
    """The default name of a branch of run@step: "RUN-fromSTEP", made unique in the store."""
    return store.unique_name(f"{run}-from{step}")


def plan_branch(
    store: RunStore, ref: str, name: str | None, overrides: list[str] | None = None, world_size: int = 1
) -> RunPlan:
    """`world_size`: the ranks the branch trains on when it is launched in the background (torchrun)."""
    run, step = parse_ref(ref)
    info = store.run(run)
    ckpt, notes = _choose_checkpoint(store, run, step)
    config = _derived_config(_recorded(info.config, ckpt, overrides or [], notes), overrides or [], ref)
    _check_past_start(config, ckpt)
    name = validate_run_name(name) if name else branch_name(store, run, ckpt.step)
    _check_new_name(store, name, run)
    plan = _branch_plan(name, config, ckpt, notes)
    plan.world_size = world_size
    return plan


def _check_new_name(store: RunStore, name: str, source: str) -> None:
    if store.exists(name):
        raise UserError(f"run {name!r} already exists; pick another --name for the branch")
    if name in store.recorded_ancestors(source):  # `rm -rf runs/x; branch y --name x` with y's parent x
        raise UserError(
            f"run name {name!r}: {source}'s lineage records an ancestor of that name (deleted since); a branch "
            "by that name would be its own ancestor, pick another --name"
        )


def _branch_plan(name: str, config: Config, ckpt: CheckpointInfo, notes: list[str]) -> RunPlan:
    if not ckpt.manifest:
        notes.append(CROSS_FRAMEWORK.format(ref=ckpt.ref))
    return RunPlan(
        run=name,
        config=config,
        start=ckpt.path,
        start_step=ckpt.step,
        parent=(ckpt.run, ckpt.step),
        notes=notes,
        verified=ckpt.verified,
    )


def start_settings(recorded: dict, ckpt: CheckpointInfo, overrides: list[str]) -> tuple[dict, list[str]]:
    """The settings a run continuing `ckpt` starts from, and notes about them: the run's record, or for a
    Hugging Face Trainer checkpoint its own config.json's model (any family) over what the HF run recorded,
    and HF's defaults for the rest, named in a note."""
    if ckpt.manifest:
        return recorded, []
    unknown = hf_runs.unknown_settings(recorded, overrides)
    notes = [hf_runs.UNKNOWN_NOTE.format(ref=ckpt.ref, keys=", ".join(unknown))] if unknown else []
    return hf_runs.start_config(recorded, ckpt.path), notes


def _recorded(recorded: dict, ckpt: CheckpointInfo, overrides: list[str], notes: list[str]) -> dict:
    config, more = start_settings(recorded, ckpt, overrides)
    notes.extend(more)
    return config


def _check_past_start(config: Config, ckpt: CheckpointInfo) -> None:
    # otherwise the trainer "finishes" at once and writes a second checkpoint of the same step
    if config.train.max_steps <= ckpt.step:
        raise ConfigError(
            f"train.max_steps: {config.train.max_steps} is not past the starting step {ckpt.step} of {ckpt.ref}; "
            "set a larger train.max_steps to train on"
        )


def _choose_checkpoint(store: RunStore, run: str, step: int | None) -> tuple[CheckpointInfo, list[str]]:
    """The requested checkpoint, fully verified; with no step, the newest one that verifies. The manifest
    it verified rides along (`ckpt.verified`), so the trainer's load hashes nothing a second time."""
    from tui_trainer.core.store import verify_checkpoint

    notes: list[str] = []
    if step is not None:
        ckpt = store.checkpoint(run, step)
        if not ckpt.valid:
            raise CheckpointInvalid(f"cannot resume {ckpt.ref}: {ckpt.problem}")
        if not ckpt.manifest:  # a Hugging Face Trainer checkpoint: no checksums to verify
            return ckpt, notes
        try:
            ckpt.verified = verify_checkpoint(ckpt.path)
        except CheckpointDeleted:  # retention on the live run got there first: gone, not corrupt
            raise CheckpointDeleted(f"cannot resume {ckpt.ref}: {store.deleted_message(run, ckpt.step)}") from None
        except CheckpointInvalid as exc:
            raise CheckpointInvalid(f"cannot resume {ckpt.ref}: {exc}") from None
        return ckpt, notes
    for ckpt in reversed(store.run(run).checkpoints):
        try:
            if not ckpt.valid:
                raise CheckpointInvalid(ckpt.problem)
            if ckpt.manifest:
                ckpt.verified = verify_checkpoint(ckpt.path)
        except CheckpointDeleted:
            continue  # retention deleted it since the listing: the next older one is the newest now
        except CheckpointInvalid as exc:
            notes.append(f"skipping invalid checkpoint {ckpt.ref}: {exc}")
            continue
        if notes:
            notes.append(f"falling back to the newest valid checkpoint {ckpt.ref}")
        return ckpt, notes
    raise UserError(f"run {run!r} has no valid checkpoint to resume from" + (f" ({notes[-1]})" if notes else ""))


def _derived_config(recorded: dict, overrides: list[str], ref: str) -> Config:
    base = Config.from_dict(recorded, source=f"{ref} run.json", validate=False)
    config = base.with_overrides(overrides)
    changed = [
        f"model.{k}" for k, v in config.to_dict()["model"].items() if base.to_dict()["model"][k] != v and k != "dropout"
    ]
    resolve_source(config.data.path)
    if changed:
        raise ConfigError(
            f"{changed[0]}: cannot change the model's shape when resuming or branching from {ref} "
            "(the checkpoint's weights would not fit); start a new run instead"
        )
    _check_same_adapter(base, config, ref)
    return config


def _check_same_adapter(base: Config, config: Config, ref: str) -> None:
    """A branch of a LoRA run may change its lr, schedule and lora.dropout; another rank, scale or set of
    adapted modules (or LoRA on or off) is a new adapter, which starts from the base in a new run."""
    old, new = base.lora, config.lora
    for key, before, after in (
        ("r", old.r, new.r),
        ("alpha", old.alpha, new.alpha),
        ("target_modules", sorted(old.targets), sorted(new.targets)),
    ):
        if before != after:
            start = f"`tui-trainer train --set lora.{key}=...` with model.pretrained={config.model.pretrained!r}"
            raise ConfigError(
                f"lora.{key}: cannot change the adapter when resuming or branching from {ref} "
                f"({before} -> {after} is a new adapter); start one with {start}"
            )
