"""What a run trains with, built before its first step (ARCHITECTURE.md: the engine): the device, the data and
its sampler, the model with its optimizer, autocast and scaler, and the model as the loop calls it.

Everything here only reads (the data, a pretrained model, a checkpoint): the Trainer writes the run's record
after it, so bad input is refused before anything lands on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tui_trainer.core.config import Config, TrainConfig
from tui_trainer.core.errors import ConfigError
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import MANIFEST
from tui_trainer.engine import checkpoint_load, fsdp, host_allocator, lora, models, sharded_checkpoint
from tui_trainer.engine.checkpoint_components import (
    ModelState,
    OptimizerState,
    RngState,
    RunRecord,
    ScalerState,
    SchedulerState,
    StateKeys,
    TokenizerFiles,
)
from tui_trainer.engine.checkpoint_load import check_config_fits_weights, no_init
from tui_trainer.engine.components import Components
from tui_trainer.engine.data import prepare_data
from tui_trainer.engine.device import DeviceMonitor, resolve_device
from tui_trainer.engine.distributed import Dist, StepVote
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.fsdp_lora import GatheredAdapterState
from tui_trainer.engine.model import build_model, make_optimizer
from tui_trainer.engine.sampler import BlockSampler
from tui_trainer.engine.stage_progress import ProgressFn
from tui_trainer.engine.state import StepSchedule, TrainState
from tui_trainer.engine.tokenizer import TOKENIZER_RECIPE, load_tokenizer

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ON_DEVICE_DATA_MAX_BYTES = 512 * 2**20  # corpora up to this size are moved to the accelerator whole


def training_device(config: Config, dist: Dist) -> torch.device:
    """This rank's device; a precision it cannot train in is refused here, before anything is written."""
    device = dist.place(config.train.device, resolve_device)
    if config.train.precision == "fp16" and device.type == "cpu":
        # CPU autocast in fp16 runs about 11x slower than fp32 and gains nothing: refuse before writing
        raise ConfigError("train.precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    if device.type == "cpu":  # ~12 % of a CPU step is page faults otherwise; FSDP's big buffers excepted
        host_allocator.keep_freed_memory_for_reuse(sharded=dist.enabled and config.train.parallel == "fsdp")
    return device


@dataclass
class TrainingData:
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    train_blocks: torch.Tensor  # (n_blocks, block_size) int64, on the device when small enough
    val_blocks: torch.Tensor | None
    sampler: BlockSampler
    notes: list[str]  # for the user, as Notice events
    base_ref: dict[str, Any] | None = None  # resuming LoRA: the base's reference, checked (and hashed) once


def load_training_data(
    config: Config, start: Path | None, dist: Dist, device: torch.device, progress: ProgressFn
) -> TrainingData:
    """The tokenized, packed corpus and the sampler over it (at its start: a checkpoint's cursor is loaded
    into it later)."""
    # a checkpoint or a pretrained model brings its own tokenizer; otherwise one is trained on the data
    base_ref = None
    if start is not None:
        if lora.is_adapter_checkpoint(start):  # an adapter fits only the base it was trained on: judged first
            base_ref = lora.check_base(start, config.model.pretrained)
        tokenizer = load_tokenizer(str(start), "checkpoint")
    elif config.model.pretrained:
        # its config.json is judged first: a dir that is no causal LM is refused before data is prepared
        models.check_pretrained(config.model.pretrained, config.model.block_size)
        tokenizer = load_tokenizer(config.model.pretrained, "model.pretrained")
    else:
        tokenizer = None
    with dist.main_first():  # rank 0 fills the tokenizer and datasets caches, the others reuse them
        data = prepare_data(config, tokenizer, progress)
    train = config.train
    sampler = BlockSampler(len(data.train), train.batch_size, train.seed, world_size=dist.world_size, rank=dist.rank)
    val = _place(data.val, device) if data.val is not None else None
    return TrainingData(data.tokenizer, _place(data.train, device), val, sampler, data.notes, base_ref)


def _place(blocks: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Small corpora live on the device, so a batch is an on-device gather with no host copy.
    if device.type != "cpu" and blocks.numel() * blocks.element_size() < ON_DEVICE_DATA_MAX_BYTES:
        return blocks.to(device)
    return blocks


@dataclass
class ModelParts:
    model: Any  # a transformers causal LM (engine/models)
    optimizer: torch.optim.Optimizer
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    base_ref: dict[str, Any] | None = None  # LoRA: the base model's path and checksums (engine/lora.py)


def build_model_parts(
    config: Config,
    start: Path | None,
    tokenizer: Any,
    device: torch.device,
    dist: Dist | None = None,
    base_ref: dict[str, Any] | None = None,
) -> ModelParts:
    """The model on its device, its optimizer, and one autocast context and one scaler, both no-ops unless
    the precision asks for them (nanoGPT's train.py). Under torchrun with train.parallel=fsdp the model is
    sharded over the ranks before the optimizer is built, so AdamW's state is sharded too (engine/fsdp.py)."""
    if start is not None and sharded_checkpoint.is_sharded_checkpoint(start):
        sharded_checkpoint.check_config_fits_weights(start)
    elif start is not None and not lora.is_adapter_checkpoint(start):
        check_config_fits_weights(start)  # config.json is read for the vocabulary next: it must fit the weights
    if config.lora.r:  # only the adapters train; the base's reference goes into every checkpoint
        # (a resume checked it already: hashing a multi-GB base twice costs a full read of it)
        base_ref = base_ref or lora.base_reference(config.model.pretrained)

    def build(skeleton: bool) -> Any:
        # resuming (or a skeleton): no random init of weights that are overwritten a moment later
        with no_init() if start is not None or skeleton else contextlib.nullcontext():
            model: Any = build_model(config, tokenizer, start, skeleton=skeleton)
        model.tie_weights()  # skipped init skips tying too (lm_head shares wte); harmless otherwise
        return lora.wrap(model, config) if config.lora.r else model

    if dist is not None and dist.enabled and config.train.parallel == "fsdp":
        # only this rank's shard is ever materialised: rank 0 alone builds the whole model of a fresh run
        # (seeded, or model.pretrained) and broadcasts it; on a resume every rank gets its shards from the load
        model = fsdp.build_sharded(build, dist, device, config.train.precision, from_rank0=start is None)
    else:
        model = build(skeleton=False)
    model.to(device)
    optimizer = make_optimizer(model, config, device)
    dtype = AUTOCAST_DTYPES.get(config.train.precision)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
    return ModelParts(model, optimizer, autocast, scaler, base_ref)


@dataclass
class RunParts:
    """Everything the loop trains with, built once by the Trainer's setup and held as one object: the
    device, the data, the model as the loop calls it (DDP, compiled, eval), its optimizer, lr schedule,
    autocast and scaler, its checkpoint components, the per-step vote and the device monitor."""

    device: torch.device
    tokenizer: Any
    sampler: BlockSampler
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor | None
    model: Any  # a transformers causal LM, peft-wrapped under LoRA (engine/models, engine/lora.py)
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    components: Components  # what a checkpoint saves and loads (engine/components.py)
    ddp_model: Any
    forward_model: Any
    eval_model: Any
    vote: StepVote
    monitor: DeviceMonitor

    @classmethod
    def assemble(
        cls,
        device: torch.device,
        data: TrainingData,
        model: ModelParts,
        scheduler: StepSchedule,
        components: Components,
        dist: Dist,
        compile_model: bool,
    ) -> RunParts:
        ddp_model, forward_model, eval_model = callable_models(model.model, dist, compile_model)
        return cls(
            device=device,
            tokenizer=data.tokenizer,
            sampler=data.sampler,
            train_blocks=data.train_blocks,
            val_blocks=data.val_blocks,
            model=model.model,
            optimizer=model.optimizer,
            scheduler=scheduler,
            autocast=model.autocast,
            scaler=model.scaler,
            components=components,
            ddp_model=ddp_model,
            forward_model=forward_model,
            eval_model=eval_model,
            vote=StepVote(dist),
            monitor=DeviceMonitor(device),
        )


def checkpoint_components(
    config: Config,
    plan: RunPlan,
    dist: Dist,
    device: torch.device,
    data: TrainingData,
    model: ModelParts,
    scheduler: StepSchedule,
    ts: TrainState,
    checkpoints_dir: Path,
    hooks: Hooks,
) -> Components:
    """The run's checkpoint components (engine/components.py), in the order they save and load. A strategy
    adds its own or replaces one by name (e.g. a sharded "model") before the first load or save."""
    parent = plan.parent
    record: dict[str, Any] = {
        **world_shape(config.train, dist),
        "run": plan.run,
        "data_recipe": TOKENIZER_RECIPE,  # how the data cursor's blocks were made (read on resume)
        "parent": {"run": parent[0], "step": parent[1]} if parent else None,
        "config": config.to_dict(),
        **({lora.BASE_KEY: model.base_ref} if model.base_ref is not None else {}),
    }
    components = Components(
        ModelState(model.model, device),
        OptimizerState(model.optimizer, config),
        SchedulerState(scheduler),
        ScalerState(model.scaler),
        TokenizerFiles(data.tokenizer),
        StateKeys("train_state", ts),
        StateKeys("sampler", data.sampler),
        RunRecord(record),
        # last: its load restores the generators; under FSDP a checkpoint of another world size reseeds
        RngState(dist, any_world=config.train.parallel == "fsdp"),
    )
    start_sharded = plan.start is not None and sharded_checkpoint.is_sharded_checkpoint(plan.start)
    if config.lora.r:
        if fsdp.is_sharded(model.model):
            # the adapters and their AdamW state gathered on rank 0 into an ordinary LoRA checkpoint, which
            # continues on any number of ranks (engine/fsdp_lora.py); in one process: the usual components
            components.replace(GatheredAdapterState(model.model, model.optimizer, config, dist))
            components.remove("optimizer")
    elif config.train.parallel == "fsdp" or start_sharded:
        # one component for weights and AdamW state: written as every rank's shards (DCP) under FSDP, read
        # from shards at any world size, or from a full checkpoint into FSDP's shards
        components.replace(
            sharded_checkpoint.ShardedModelState(
                model.model,
                model.optimizer,
                config,
                dist,
                device,
                checkpoints_dir,
                hooks,
                write_shards=config.train.parallel == "fsdp",
            )
        )
        components.remove("optimizer")
    return components


def build(
    config: Config,
    plan: RunPlan,
    dist: Dist,
    ts: TrainState,
    device: torch.device,
    progress: ProgressFn,
    notify: Callable[[str], None],
    hooks: Hooks,
    checkpoints_dir: Path,
) -> RunParts:
    """Everything the loop trains with, read and built (data, model, optimizer, schedule, checkpoint
    components), with the plan's checkpoint loaded into the components: the one object the Trainer gets.
    `notify` gets what the user should read (as Notice events)."""
    data = load_training_data(config, plan.start, dist, device, progress)
    for note in data.notes:
        notify(note)
    model = build_model_parts(config, plan.start, data.tokenizer, device, dist, data.base_ref)
    scheduler = StepSchedule(model.optimizer, config.optim, config.train.max_steps)
    components = checkpoint_components(config, plan, dist, device, data, model, scheduler, ts, checkpoints_dir, hooks)
    if plan.start is not None:
        reader = checkpoint_load.load(plan.start, components, device, verified=plan.verified)
        recipe = data_recipe_note(plan.start, reader.trainer_state)
        if recipe:
            notify(recipe)
        if config.train.parallel == "fsdp":  # FSDP continues at any world size with the checkpoint's global batch
            data.sampler.batch_size = rank_batch(config.train, reader.trainer_state, dist.world_size)
            record = components["run"]
            assert isinstance(record, RunRecord)
            record.record.update(world_shape(config.train, dist, data.sampler.batch_size))
    else:
        scheduler.load_state_dict({"step": ts.step})
    model.model.train()
    return RunParts.assemble(device, data, model, scheduler, components, dist, config.train.compile)


def seed_unless_restored(parts: RunParts, config: Config, dist: Dist, step: int = 0) -> None:
    """The last thing setup does: a fresh start (or an HF checkpoint, or a rank the checkpoint has no RNG
    for) seeds torch; rank r's dropout differs from rank 0's, one process (rank 0) seeds as it always did."""
    rng = parts.components["rng"] if "rng" in parts.components else None  # noqa: SIM401 (a registry, no .get)
    if isinstance(rng, RngState) and rng.other_world:
        # an FSDP continuation on another number of ranks: rank r's dropout stream from (seed, step, r), so
        # the same continuation on the same ranks draws the same numbers
        torch.manual_seed(rank_seed(config.train.seed, step, dist.rank))
    elif not (isinstance(rng, RngState) and rng.restored):
        torch.manual_seed(config.train.seed + dist.rank)


def callable_models(model: torch.nn.Module, dist: Dist, compile_model: bool) -> tuple[Any, Any, Any]:
    """(ddp, forward, eval): the model wrapped in DDP (itself in one process), what a training forward
    calls (compiled when asked), and what eval calls."""
    ddp_model = dist.wrap(model)
    forward_model = torch.compile(ddp_model) if compile_model else ddp_model
    # eval runs on every rank alike, outside DDP (its forward would join collectives on one rank only)
    eval_model = model if dist.enabled else forward_model
    return ddp_model, forward_model, eval_model


def world_shape(train: TrainConfig, dist: Dist, batch: int | None = None) -> dict[str, int]:
    """The data-parallel shape, recorded in run.json and every checkpoint's trainer state. `batch`: each
    rank's micro-batch when it is not train.batch_size (an FSDP run continued on another number of ranks)."""
    world, batch = dist.world_size, batch or train.batch_size
    return {"world_size": world, "effective_batch": batch * train.grad_accum * world}


def running_detail(train: TrainConfig, dist: Dist, batch: int | None = None) -> str:
    """The Running line names the data-parallel shape, when there is one."""
    if not dist.enabled:
        return ""
    world, batch = dist.world_size, batch or train.batch_size
    effective = world_shape(train, dist, batch)["effective_batch"]
    how = "FSDP, " if train.parallel == "fsdp" else ""
    return f"{world} ranks ({how}{dist.backend}), effective batch {effective} = {batch} x {train.grad_accum} x {world}"


def rank_batch(train: TrainConfig, saved: dict[str, Any], world_size: int) -> int:
    """Each rank's micro-batch when an FSDP checkpoint continues here: the checkpoint's global batch split
    over this job's ranks, so the run sees the same samples in the same steps on any number of ranks
    (the data cursor is global: engine/sampler.py). Refused, before anything is written, when it does not
    divide."""
    effective = saved.get("effective_batch")
    if type(effective) is not int or effective <= 0:
        return train.batch_size  # a checkpoint from before world shapes were recorded: one process's
    per_step = train.grad_accum * world_size
    if effective % per_step:
        raise ConfigError(
            f"the checkpoint's global batch of {effective} sequences does not split over {world_size} "
            f"rank(s) x train.grad_accum={train.grad_accum}; pick a number of ranks that divides it"
        )
    return effective // per_step


def rank_seed(seed: int, step: int, rank: int) -> int:
    """Rank `rank`'s dropout seed for a continuation at `step` on another number of ranks."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) % 2**63


def state_bytes(model: torch.nn.Module) -> int:
    """The weights a checkpoint stores (the adapters alone under LoRA) plus AdamW's two moment buffers of
    the trainable ones: about what a checkpoint holds."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    stored = trainable if lora.is_lora(model) else sum(p.numel() * p.element_size() for p in model.parameters())
    return stored + 2 * trainable


def data_recipe_note(start: Path | None, saved: dict[str, Any]) -> str | None:
    """The data cursor counts blocks of today's tokenization; a checkpoint of a run tokenized by another
    recipe (or before recipes were recorded) may point into a slightly different stream: what to say, once."""
    if start is None or not (start / MANIFEST).exists() or saved.get("data_recipe") == TOKENIZER_RECIPE:
        return None  # a Hugging Face checkpoint has no data cursor of ours to misread
    made = f"recipe {saved['data_recipe']!r}" if saved.get("data_recipe") else "an earlier version"
    return (
        f"this checkpoint's data was tokenized by {made}; today's ({TOKENIZER_RECIPE}) can split text "
        "differently, so the blocks from here on may not be the ones the original run would have seen"
    )
