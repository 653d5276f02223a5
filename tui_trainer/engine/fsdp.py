"""FSDP2 (`train.parallel = "fsdp"`): weights, gradients and AdamW state sharded over the ranks.

torchtitan's recipe (models/llama3/infra/parallelize.py `apply_fsdp`): `fully_shard` each transformer block
(the family's `block_modules`, the same units gradient checkpointing uses), then the root, which takes what
is left (embeddings, final norm, the head). Each block's parameters are gathered just before its forward and
freed after it, so a rank holds one block's full weights at a time plus its own 1/world of everything.

The model is built sharded (`build_sharded`, torchtitan's way): a rank builds it with its parameters on the
meta device, shards it, then materialises only its own shards; a fresh run's weights are rank 0's, the one
rank that builds the whole model, broadcast tensor by tensor; a resume's come from the checkpoint's load.
So no other rank ever holds the whole model, and rank 0 holds it once, before training starts.

The sharding happens before the optimizer is built: FSDP replaces each parameter by a DTensor holding this
rank's shard, and AdamW's moments then live only for that shard. In one process (no torchrun) nothing is
sharded: the model trains as it is and its checkpoints are still written in the sharded format
(engine/sharded_checkpoint.py), so they resume on any number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.engine import models

if TYPE_CHECKING:
    from tui_trainer.engine.distributed import Dist


def build_sharded(
    build: Callable[[bool], torch.nn.Module],
    dist: Dist,
    device: torch.device,
    precision: str,
    *,
    from_rank0: bool,
) -> torch.nn.Module:
    """The model sharded over the ranks, no rank ever holding more of it than its shard (rank 0 of a fresh
    run excepted: it builds the whole model once). torchtitan's recipe: a rank builds the model with its
    parameters on the meta device (`build(True)`: a skeleton, no memory), `shard`s it, then materialises
    only its own shards (`materialise`).

    `from_rank0` (a fresh run): rank 0 builds the real model (`build(False)`: seeded by train.seed, or
    model.pretrained read by rank 0 alone), shards it, and every rank gets its shards of rank 0's weights
    by `set_model_state_dict(..., broadcast_from_rank0=True)`, tensor by tensor, so the run starts from
    exactly the weights one process or DDP builds with the same seed. Otherwise (a resume) every rank builds
    the skeleton and the checkpoint's load fills the shards (a LoRA adapter checkpoint's base is real)."""
    source = from_rank0 and dist.is_main
    model = build(not source)
    full = model.state_dict() if source else {}  # rank 0's weights, held until they are broadcast
    shard(model, dist.world_size, device, precision)
    materialise(model, device)
    if from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
    return model


def materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Memory on `device` for every parameter still on the meta device (under FSDP: this rank's shard of
    it), uninitialised: the caller fills it. `to_empty` would blank the buffers too, so they are kept: a
    buffer can be computed, not saved (Llama's rotary inv_freq), and no state dict would bring it back."""
    if not any(p.is_meta for p in model.parameters()):
        return
    buffers = [(module, name, b) for module in model.modules() for name, b in module._buffers.items() if b is not None]
    model.to_empty(device=device)
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.to(device)


def is_sharded(model: Any) -> bool:
    """The model was wrapped by `fully_shard` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, world_size: int, device: torch.device, precision: str) -> torch.nn.Module:
    """`fully_shard` every block of the model's family, then the root, over all `world_size` ranks (one
    mesh dimension: plain FSDP, no HSDP). On a GPU with `precision = "bf16"` FSDP's mixed-precision policy
    gathers bf16 weights for compute and reduces gradients in fp32 (torchtitan's default); the sharded
    master weights and AdamW state stay fp32. The module is changed in place and returned."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = models.family_of(model).block_modules(model)
    for block in blocks:
        # the last block's parameters are needed again at once by the root's backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=block is not blocks[-1])
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def gradient_sync(model: Any, last_micro_batch: bool) -> Iterator[None]:
    """FSDP's no_sync: gradients accumulate unsharded on every micro-batch but the last, whose backward
    reduce-scatters the sum once (torchtitan's gradient accumulation)."""
    model.set_requires_gradient_sync(last_micro_batch)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A norm computed over sharded gradients is a DTensor (a partial sum reduced over the ranks): the
    plain tensor every rank agrees on. Plain tensors pass through."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value
