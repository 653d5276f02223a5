"""LoRA under FSDP (`train.parallel = "fsdp"` with `lora.r`): the frozen base is sharded like any FSDP model
(engine/fsdp.py; frozen parameters are fine in FSDP2) and the adapters train sharded beside it, but a
checkpoint is an ordinary LoRA checkpoint (engine/lora.py): adapter_model.safetensors + adapter_config.json in
PEFT's format, optimizer.pt with the adapters' AdamW state in torch's own numbering, and the base's reference.

LoRA's own state is small, so rank 0 gathers it whole at each save (`get_model_state_dict` /
`get_optimizer_state_dict` with `full_state_dict=True, cpu_offload=True`, frozen parameters left out) rather
than every rank writing shards: the checkpoint then continues on any number of ranks, under DDP or in one
process like every LoRA checkpoint, and export / generate / verify read it as they always did. The base is
never in it: it comes from model.pretrained, checked against the checkpoint's reference before data prep.
"""

from __future__ import annotations

from typing import Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.engine import lora
from tui_trainer.engine.checkpoint_files import Part, PickleFile, PretrainedFiles, TensorFile
from tui_trainer.engine.checkpoint_load import CheckpointReader, check_optimizer_state
from tui_trainer.engine.components import Component
from tui_trainer.engine.distributed import Dist
from tui_trainer.engine.model import apply_optim_config
from tui_trainer.engine.sharded_checkpoint import optimizer_state_by_name

OPTIMIZER = "optimizer.pt"


class GatheredAdapterState(Component):
    """The adapter and its AdamW state as one component (it replaces "model" and "optimizer"), for a LoRA
    model sharded by FSDP over several ranks. `prepare` (every rank: collectives) gathers both whole onto
    rank 0's CPU; `save` (rank 0) writes the files a LoRA checkpoint holds. `load` (every rank) reads a LoRA
    checkpoint of any world size and keeps this rank's shard of each adapter weight and moment."""

    name = "model"

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, config: Config, dist: Dist) -> None:
        self.model, self.optimizer, self.config, self.dist = model, optimizer, config, dist
        self._gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # prepared, not yet saved

    def prepare(self, step: int, blocking: bool) -> None:
        from peft import get_peft_model_state_dict
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # full tensors on rank 0's CPU only (the others get nothing); the frozen base is not gathered at all
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.model, options=whole)
        moments = get_optimizer_state_dict(self.model, self.optimizer, options=whole)
        if self.dist.is_main:
            adapter = get_peft_model_state_dict(self.model, state_dict=weights)
            self._gathered = (adapter, _numbered(self.model, self.optimizer, moments))

    def save(self) -> list[Part]:
        assert self._gathered is not None, "prepare() gathers the adapter before rank 0 saves"
        adapter, moments = self._gathered
        self._gathered = None
        # fresh CPU tensors that nothing changes until they are written: nothing to stage
        return [
            TensorFile(lora.ADAPTER_WEIGHTS, adapter, staged=False),
            PretrainedFiles(lora.adapter_config(self.model)),
            PickleFile(OPTIMIZER, moments),
        ]

    def load(self, ckpt: CheckpointReader) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not lora.is_adapter_checkpoint(ckpt.path):
            raise CheckpointInvalid(f"{ckpt.path}: holds no LoRA adapter ({lora.ADAPTER_WEIGHTS}) to continue")
        # every rank reads the small files whole and keeps its shard (the base's weights are left as loaded)
        full = StateDictOptions(full_state_dict=True, strict=False)
        names = lora.parameter_names(self.model)
        weights = lora.read_adapter(ckpt.path, self.model, "cpu")
        set_model_state_dict(self.model, {names[k]: v for k, v in weights.items()}, options=full)
        saved = ckpt.pickled(OPTIMIZER)
        check_optimizer_state(ckpt.path / OPTIMIZER, self.optimizer, saved)
        by_name = optimizer_state_by_name(self.model, self.optimizer, saved)
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=full)
        apply_optim_config(self.optimizer, self.config)


def _numbers(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Each trained parameter's name -> its number in torch's optimizer state (group by group, in order:
    what `optimizer.state_dict()` numbers, so optimizer.pt is the one a plain LoRA run writes)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {names[id(p)]: number for number, p in enumerate(params)}


def _numbered(model: torch.nn.Module, optimizer: torch.optim.Optimizer, by_name: dict[str, Any]) -> dict[str, Any]:
    """`get_optimizer_state_dict`'s state (keyed by parameter names) in torch's numbering; the groups'
    hyperparameters are the optimizer's own (the same on every rank)."""
    numbers = _numbers(model, optimizer)
    groups = optimizer.state_dict()["param_groups"]
    return {"state": {numbers[name]: s for name, s in by_name["state"].items()}, "param_groups": groups}
