"""Data-parallel training under torchrun: the process group, the per-step vote, rank-0-only side effects.

A run is one process per rank, started by torchrun (or `tui-trainer train --nproc N`, which launches
torchrun). Every rank runs the same loop on its slice of each global batch (engine/sampler.py
`rank_slice`); DistributedDataParallel averages the gradients. Anything a rank decides on its own — a
pause key, a signal, a timed checkpoint, a stop — is combined at each optimizer-step boundary by one small
all_reduce (`StepVote`), so every rank acts on the same step. Only rank 0 touches the store (run.json,
metrics, checkpoints, the run lock); the others only train.

Two process groups: the default one has a long timeout because rank 0 may spend minutes preparing data
(training a tokenizer) while the others wait for it; the training group, used by DDP and the vote, has a
short one, so a rank that dies (kill -9, a lost node) ends the job within a minute instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from enum import IntFlag
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tui_trainer.core.errors import UserError
from tui_trainer.core.launch import DistEnv, read_env
from tui_trainer.engine import fsdp

T = TypeVar("T")
DistError = dist.DistError  # a collective failed: a peer died, left, or timed out


def peer_failed(exc: BaseException) -> bool:
    """A collective failed because another rank died or left: torch raises DistError, gloo a plain
    RuntimeError naming its transport ("Connection reset by peer")."""
    if isinstance(exc, DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text or "Connection reset" in text)


# How long a collective in the loop may wait for a missing rank before the job fails. A healthy step
# never waits this long; a dead rank ends the job within it (torchrun usually notices sooner).
TRAIN_TIMEOUT_S = float(os.environ.get("TUI_TRAINER_DIST_TIMEOUT", "45"))
# Setup collectives (data preparation on rank 0, the plan broadcast) may legitimately take minutes.
SETUP_TIMEOUT_S = 30 * 60.0


class Dist:
    """This process's place in a data-parallel job: rank, world, device, and the collectives it needs.
    `Dist.single()` is the one-process case: every collective is the identity, so the loop has one path."""

    def __init__(self, env: DistEnv | None, device: torch.device, group: Any = None) -> None:
        self.env = env
        self.rank = env.rank if env else 0
        self.world_size = env.world_size if env else 1
        self.device = device
        self.group = group  # the training group (short timeout); None = the default group

    @classmethod
    def single(cls, device: torch.device) -> Dist:
        return cls(None, device)

    def place(self, requested: str, resolve_single: Callable[[str], torch.device]) -> torch.device:
        """This rank's training device for `train.device` (one process: `resolve_single` decides)."""
        self.device = resolve_rank_device(requested, self.env) if self.env else resolve_single(requested)
        return self.device

    @property
    def enabled(self) -> bool:
        return self.env is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        """What carries the gradients: NCCL for CUDA tensors, gloo for CPU ones."""
        if not self.enabled:
            return "none"
        return "nccl" if self.device.type == "cuda" else "gloo"

    # ---------------------------------------------------------------- collectives

    def barrier(self, *, setup: bool = False) -> None:
        """Wait for every rank; `setup` uses the long-timeout group (data preparation, planning)."""
        if self.enabled:
            dist.barrier(group=None if setup else self.group)

    def broadcast_object(self, obj: T | None, *, setup: bool = False) -> T:
        """Rank 0's `obj` on every rank (pickled: only for small things, once)."""
        if not self.enabled:
            return obj  # type: ignore[return-value]
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=None if setup else self.group)
        return box[0]  # type: ignore[return-value]

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank (e.g. each rank's RNG state for a checkpoint)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (the logged loss). In place, returns it."""
        if self.enabled:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
            value /= self.world_size
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 does the body first (e.g. data preparation, which fills the tokenizer and datasets
        caches), the others after it, from the warm cache: no two ranks write one cache entry at once."""
        if not self.is_main:
            self.barrier(setup=True)
        try:
            yield
        finally:
            if self.is_main:
                self.barrier(setup=True)

    # ---------------------------------------------------------------- the model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the training group (gradients averaged over ranks in backward);
        the model itself in one process. DDP broadcasts rank 0's weights once, here."""
        if not self.enabled or fsdp.is_sharded(model):  # FSDP reduces gradients itself (engine/fsdp.py)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.group)

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all_reduce (FSDP: reduce-scatter) on every micro-batch but the last of an
        optimizer step."""
        if self.enabled and fsdp.is_sharded(model):
            return fsdp.gradient_sync(model, last_micro_batch)
        if self.enabled and not last_micro_batch:
            return model.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def rank_rng(self, saved: Any) -> Any | None:
        """This rank's RNG state from a checkpoint's rng.pt: one dict per rank (a list) since DDP, a single
        dict before. None when the checkpoint has no state for this rank (it ran on fewer ranks)."""
        if isinstance(saved, list):
            return saved[self.rank] if self.rank < len(saved) else None
        return saved if self.rank == 0 else None


class Flag(IntFlag):
    """What a rank wants at a step boundary. Combined by MAX over one int tensor: any rank's wish wins."""

    PAUSE = 1  # save a full checkpoint and halt (app key, --until-step, a signal on any rank)
    SAVE = 2  # save a checkpoint and continue (save_now, a timed checkpoint: rank 0's clock decides)
    STOP = 4  # halt without saving
    NONFINITE = 8  # this rank saw a NaN/Inf loss: nobody may checkpoint this state
    FAILED = 16  # this rank cannot go on (its checkpoint writer failed): everyone ends


class StepVote:
    """One all_reduce per optimizer step of a few ints: what any rank wants, every rank does, on the
    same step. In one process it costs nothing and returns the local flags."""

    def __init__(self, dist_: Dist) -> None:
        self.dist = dist_
        # on the training device: NCCL reduces CUDA tensors only (gloo, the CPU ones)
        self._buf = torch.zeros(len(Flag), dtype=torch.int32, device=dist_.device)
        self._bits = [int(flag) for flag in Flag]

    def __call__(self, local: Flag) -> Flag:
        if not self.dist.enabled:
            return local
        buf = self._buf
        # built on the host, one copy to the device (not one tiny kernel per flag on a GPU)
        buf.copy_(torch.tensor([1 if local & bit else 0 for bit in self._bits], dtype=torch.int32))
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.dist.group)
        voted = Flag(0)
        for i, value in enumerate(buf.tolist()):  # one host sync: the whole job decides together
            if value:
                voted |= Flag(self._bits[i])
        return voted


def resolve_rank_device(requested: str, env: DistEnv) -> torch.device:
    """One device per rank: cuda:LOCAL_RANK on a GPU node (made current, so NCCL and the CUDA RNG use
    it), else the CPU. MPS has no collectives backend, so it is refused under torchrun."""
    if requested == "mps":
        raise UserError("train.device=mps cannot run distributed (no collectives on MPS); use cpu or cuda")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                "lower --nproc-per-node"
            )
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    if requested == "cuda":
        raise UserError("train.device=cuda but CUDA is not available on this node")
    return torch.device("cpu")


def _backend() -> str:
    # Objects and CPU tensors over gloo, CUDA tensors over NCCL: the process group is joined before the
    # plan (and so train.device) is known, and the plan itself travels as a pickled object.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _restart_store(env: DistEnv, timeout: datetime.timedelta) -> Any:
    """Under torchrun: its rendezvous store with this attempt's keys under their own prefix, else None.

    torchrun keeps one store, on the same port, for every restart of a job, and the process groups' keys
    (each rank's address) are the same names each time: a restarted worker read the dead workers' addresses
    and the job died in gloo's connectFullMesh ("Connection refused") or hung. One prefix per restart count
    (TORCHELASTIC_RESTART_COUNT) keeps each attempt's rendezvous to itself."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    # the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does, as env:// would
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    tcp = dist.TCPStore(
        env.master_addr,
        int(env.master_port),
        env.world_size,
        is_master=not agent_hosts and env.rank == 0,
        timeout=timeout,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"/tui-trainer/attempt_{attempt}", tcp)


def init(env: DistEnv | None = None) -> Dist:
    """Join the job torchrun started and make the short-timeout training group. The device comes later
    (`Dist.place`), once rank 0's plan says which one the run asked for."""
    env = env or read_env()
    if env is None:
        raise UserError("not started by torchrun (RANK / WORLD_SIZE are not set)")
    if not dist.is_initialized():
        setup = datetime.timedelta(seconds=SETUP_TIMEOUT_S)
        store = _restart_store(env, setup)
        if store is None:
            dist.init_process_group(backend=_backend(), timeout=setup)
        else:
            dist.init_process_group(
                backend=_backend(), store=store, rank=env.rank, world_size=env.world_size, timeout=setup
            )
    group = dist.new_group(backend=_backend(), timeout=datetime.timedelta(seconds=TRAIN_TIMEOUT_S))
    return Dist(env, torch.device("cpu"), group)


def teardown() -> None:
    """Leave the job. Never raises: this runs on the way out, also after a peer died."""
    if dist.is_available() and dist.is_initialized():
        # a dead peer can make the teardown itself fail; we are leaving anyway
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def joined(env: DistEnv | None = None) -> Iterator[Dist]:
    """`with joined() as d:` — the process group for the duration of one training command."""
    d = init(env)
    try:
        yield d
    finally:
        teardown()


__all__ = ["Dist", "DistEnv", "DistError", "Flag", "StepVote", "init", "joined", "peer_failed", "read_env", "teardown"]
