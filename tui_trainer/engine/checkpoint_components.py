"""The components every run checkpoints (engine/components.py): the model or its LoRA adapter, the optimizer,
the lr schedule, the scaler, the tokenizer, the counters, the data cursor, the run's record and the RNG.
Their files are the on-disk contract (ARCHITECTURE.md), byte for byte what checkpoints held before components.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.engine import lora
from tui_trainer.engine.checkpoint_files import WEIGHTS, JsonKeys, Part, PickleFile, PretrainedFiles, TensorFile
from tui_trainer.engine.checkpoint_load import (
    CheckpointReader,
    check_optimizer_state,
    check_rng_state,
    check_scheduler_state,
    load_weights,
)
from tui_trainer.engine.components import Component
from tui_trainer.engine.distributed import Dist
from tui_trainer.engine.hf_state import hf_rng_files
from tui_trainer.engine.model import apply_optim_config
from tui_trainer.engine.rng import restore_rng, rng_state
from tui_trainer.engine.state import StepSchedule


class ModelState(Component):
    """The weights (model.safetensors + config.json, a Hugging Face model dir), or under LoRA the adapter alone
    in PEFT's format (adapter_model.safetensors + adapter_config.json): the base came from model.pretrained."""

    name = "model"

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device = model, device

    def save(self) -> list[Part]:
        if lora.is_lora(self.model):
            return [
                TensorFile(lora.ADAPTER_WEIGHTS, lora.weights_state(self.model)),
                PretrainedFiles(lora.adapter_config(self.model)),
            ]
        return [TensorFile(WEIGHTS, self.model.state_dict()), PretrainedFiles(self.model.config)]

    def load(self, ckpt: CheckpointReader) -> None:
        if lora.is_adapter_checkpoint(ckpt.path):
            lora.load_adapter(ckpt.path, self.model, self.device)
        else:
            load_weights(ckpt.path, self.model, self.device)


class OptimizerState(Component):
    """optimizer.pt (AdamW's moments: staged like the weights). On load the config's hyperparameters apply
    over the saved ones: a branch may change them."""

    name = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, config: Config) -> None:
        self.optimizer, self.config = optimizer, config

    def save(self) -> list[Part]:
        return [PickleFile("optimizer.pt", self.optimizer.state_dict(), staged=True)]

    def load(self, ckpt: CheckpointReader) -> None:
        state = ckpt.pickled("optimizer.pt", on_device=True)
        check_optimizer_state(ckpt.path / "optimizer.pt", self.optimizer, state)
        self.optimizer.load_state_dict(state)
        apply_optim_config(self.optimizer, self.config)


class SchedulerState(Component):
    """scheduler.pt (a LambdaLR's state, plain numbers); a checkpoint without one is rebuilt from its step.
    Loads after the optimizer: it sets the lr of the step the optimizer resumes at."""

    name = "scheduler"

    def __init__(self, scheduler: StepSchedule) -> None:
        self.scheduler = scheduler

    def save(self) -> list[Part]:
        return [PickleFile("scheduler.pt", dict(self.scheduler.state_dict()))]

    def load(self, ckpt: CheckpointReader) -> None:
        state = ckpt.pickled("scheduler.pt") if ckpt.has("scheduler.pt") else {}
        check_scheduler_state(ckpt.path / "scheduler.pt", state)
        self.scheduler.load_state_dict(state or {"step": ckpt.trainer_state["step"]})


class ScalerState(Component):
    """scaler.pt, only when fp16's GradScaler is on (it is a no-op otherwise, and saves nothing)."""

    name = "scaler"

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def save(self) -> list[Part]:
        return [PickleFile("scaler.pt", self.scaler.state_dict())] if self.scaler.is_enabled() else []

    def load(self, ckpt: CheckpointReader) -> None:
        if not self.scaler.is_enabled() or not ckpt.has("scaler.pt"):
            return
        state = ckpt.pickled("scaler.pt")
        if not isinstance(state, dict):
            raise CheckpointInvalid(f"{ckpt.path / 'scaler.pt'}: not a scaler state")
        self.scaler.load_state_dict(state)


class TokenizerFiles(Component):
    """The tokenizer's files, so a checkpoint is a complete Hugging Face model dir. Nothing to load: a run
    starting from a checkpoint read its tokenizer from it before preparing the data (run_setup)."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def save(self) -> list[Part]:
        return [PretrainedFiles(self.tokenizer)]

    def load(self, ckpt: CheckpointReader) -> None:
        pass


class JsonStateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StateKeys(Component):
    """An object whose whole state is a few JSON values, kept as keys of tui_trainer_state.json: the
    counters (`train_state`: step, tokens, elapsed, losses, best eval) and the data cursor (`sampler`:
    epoch, position; the order is a pure function of the seed and epoch, and an HF checkpoint's converted
    state starts an epoch)."""

    def __init__(self, name: str, stateful: JsonStateful) -> None:
        self.name = name
        self.stateful = stateful

    def save(self) -> list[Part]:
        return [JsonKeys(self.stateful.state_dict())]

    def load(self, ckpt: CheckpointReader) -> None:
        self.stateful.load_state_dict(ckpt.trainer_state)


class RunRecord(Component):
    """What the run is, in tui_trainer_state.json beside the counters: its name, parent, world shape, full
    config, the tokenization recipe the data cursor counts in, and under LoRA the base model's reference.
    Read back by the plan and the store (core/), not restored into anything here."""

    name = "run"

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def save(self) -> list[Part]:
        return [JsonKeys(dict(self.record))]

    def load(self, ckpt: CheckpointReader) -> None:
        pass


class RngState(Component):
    """Every generator's state (Python, NumPy, torch, CUDA) as rng.pt, one per rank under DDP (gathered on
    every rank by `prepare`), plus the same in the HF Trainer's rng_state*.pth files. Registered last: its
    load restores the generators. `restored` is False after a fresh start or an HF checkpoint (no RNG of ours)
    or a rank the checkpoint has no state for: the caller seeds instead. `any_world` (FSDP, whose checkpoints
    continue on any number of ranks): a checkpoint of another world size restores none (`other_world`), and
    the caller seeds each rank from (seed, step, rank), so such a continuation is well defined."""

    name = "rng"

    def __init__(self, dist: Dist, *, any_world: bool = False) -> None:
        self.dist = dist
        self.any_world = any_world
        self.restored = False
        self.other_world = False
        self._gathered: list[Any] | None = None  # every rank's state for the save being made (DDP)

    def prepare(self, step: int, blocking: bool) -> None:
        self._gathered = self.dist.gather_objects(rng_state()) if self.dist.enabled else None

    def save(self) -> list[Part]:
        states: Any = self._gathered if self._gathered is not None else rng_state()
        return [PickleFile("rng.pt", states), *(PickleFile(name, s) for name, s in hf_rng_files(states).items())]

    def load(self, ckpt: CheckpointReader) -> None:
        if ckpt.foreign:
            return
        state = ckpt.pickled("rng.pt")
        check_rng_state(ckpt.path / "rng.pt", state)
        if self.any_world and ckpt.trainer_state.get("world_size", 1) != self.dist.world_size:
            self.other_world = True
            return
        mine = self.dist.rank_rng(state)
        if mine is not None:
            restore_rng(mine)
            self.restored = True
