"""Sharded checkpoints (`train.parallel = "fsdp"`): every rank writes its own shards of the weights and the
AdamW state with Distributed Checkpoint (DCP), and any number of ranks reads them back (DCP reshards).

They keep the full checkpoint's guarantees (engine/checkpoint_save.py). At a save every rank, at once
(`ShardedModelState.prepare`), writes its shards into one hidden dir beside the checkpoints (rank 0 names
it): a periodic save in the background (engine/async_shards.py: staged, then written by DCP's async path
while training goes on; at most one in flight, the next save waits for it), a blocking one (a pause, the
end, async saves off) on the training thread, each rank fsyncing and checksumming its own files. DCP's
index is written by rank 0 only after every rank's write succeeded. Rank 0 then saves the checkpoint as
always: its writer (which waits for a background write of the shards first) moves the shard files (a
rename, no copy) into the checkpoint's hidden temp dir, writes the other components' files, manifest.json
LAST with a checksum per file, and renames the dir into place. A kill -9 of any rank at any moment leaves
hidden dirs (ignored, removed at the next start) and never a half checkpoint; a failed write on any rank
fails the save on every rank, reported as any failed checkpoint save (a disk fault: the run pauses).

```
checkpoints/step-NNNNNNNN/
    __0_0.distcp, __1_0.distcp, ...   each rank's shards of "model" and "optimizer" (keyed by parameter name)
    .metadata                          DCP's index of the shards (read with an allowlist, never plain pickle)
    config.json, tokenizer files, scheduler.pt, rng.pt (every rank's), tui_trainer_state.json,
    trainer_state.json, rng_state_R.pth, manifest.json ("sharded": {"world_size": N}): as a full one
```

Loading: the model and optimizer this process trains (FSDP-sharded on M ranks, or plain in one process /
under DDP) say which pieces they want (`get_model_state_dict` / `get_optimizer_state_dict`), DCP reads
exactly those (a plain model gets full tensors), and `set_*_state_dict` puts them in place. A full
checkpoint (model.safetensors + optimizer.pt, from DDP or one process) loads into an FSDP model through
the same functions with `full_state_dict=True, broadcast_from_rank0=True`: rank 0 alone reads the files and
broadcasts them tensor by tensor, every rank keeping its shard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tui_trainer.core.config import Config
from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.store import TEMP_PREFIX, checkpoint_dirname, fsync_path, hash_file, read_lease
from tui_trainer.engine import checkpoint_load, fsdp
from tui_trainer.engine.async_shards import AsyncShardWriter, InFlight
from tui_trainer.engine.checkpoint_components import ModelState, OptimizerState
from tui_trainer.engine.checkpoint_files import WEIGHTS, FileDigest, Part, PretrainedFiles
from tui_trainer.engine.checkpoint_load import check_fits, check_optimizer_state
from tui_trainer.engine.components import Component
from tui_trainer.engine.distributed import Dist
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.model import apply_optim_config
from tui_trainer.engine.shard_index import METADATA, safe_reader, weight_shapes

if TYPE_CHECKING:
    from tui_trainer.engine.checkpoint_load import CheckpointReader

SHARDED = "sharded"  # manifest.json key: {"world_size": N} of the job that wrote the shards
SHARD_SUFFIX = ".distcp"


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint in DCP's format: its weights and AdamW state are the ranks' shards. It may also hold an
    HF-loadable model.safetensors (`checkpoint.hf_weights`), a copy for other tools: resuming reads the shards."""
    return (path / METADATA).is_file()


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns on every save / load in one process that it assumes one process: it is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} keyed by parameter names (FQNs): this rank's shards under FSDP, full tensors
    for a plain model. The optimizer's state is created (zero) first if it has none yet, so a load has a
    home for every moment."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


@dataclass
class ShardFiles:
    """A checkpoint part (engine/checkpoint_files.py): the shard files every rank already wrote into a hidden
    dir beside the checkpoint at this step boundary, moved (renamed, no copy) into the checkpoint's temp dir
    by rank 0's writer, with the checksums each rank took of its own files."""

    state: Path  # the hidden dir holding every rank's shards and DCP's index
    digests: dict[str, tuple[str, int]]  # none for a background write: rank 0 hashes every file here
    file: str = ""  # it names its own files
    staged: bool = False
    pending: InFlight | None = None  # a background write of the shards (every rank's), waited for first

    def write(self, directory: Path) -> dict[str, FileDigest]:
        try:
            if self.pending is not None:
                self.pending.result()  # every rank's shards written and DCP's index, or CheckpointWriteError
                fsync_path(self.state / METADATA)
                fsync_path(self.state)
            out = {}
            for entry in sorted(self.state.iterdir()):
                moved = directory / entry.name
                os.rename(entry, moved)
                digest, size = self.digests.get(entry.name) or (hash_file(moved), moved.stat().st_size)
                out[entry.name] = FileDigest(digest, size)
            self.state.rmdir()
        except BaseException:
            # every rank is done with the dir (a failed write fails on every rank only once all wrote)
            shutil.rmtree(self.state, ignore_errors=True)
            raise
        return out


def shards_dir(checkpoints_dir: Path, dist: Dist, step: int) -> Path:
    """Every rank at once: a new hidden dir beside the checkpoints for the shards of checkpoint `step` (rank
    0 names it)."""
    name = f"{TEMP_PREFIX}shards-{checkpoint_dirname(step)}-{uuid.uuid4().hex[:8]}" if dist.is_main else None
    shards = checkpoints_dir / dist.broadcast_object(name)
    shards.mkdir(parents=True, exist_ok=True)  # every rank: one node, or a filesystem the ranks share
    return shards


def write_shards(
    checkpoints_dir: Path,
    dist: Dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    before_file: Callable[[Path], None] | None = None,
) -> tuple[Path, dict[str, tuple[str, int]]]:
    """Every rank at once: this rank's shards of the weights and AdamW state into one hidden dir (rank 0
    names it), fsynced; DCP's index written by rank 0 once every rank's write succeeded (a failed write on any
    rank raises on every rank). Returns the dir and every shard file's checksum (each rank hashes its own,
    in parallel). A kill -9 of any rank leaves only the hidden dir, which the next start removes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    shards = shards_dir(checkpoints_dir, dist, step)
    if before_file is not None:
        before_file(shards / f"__{dist.rank}_0{SHARD_SUFFIX}")
    state = _state_dicts(model, optimizer)
    writer = FileSystemWriter(shards, sync_files=True, single_file_per_rank=True)
    with _one_process_quietly():  # one process: no process group (DCP warns that it assumes one)
        dcp.save(state, storage_writer=writer, process_group=dist.group, no_dist=not dist.enabled)
    mine = {
        p.name: (hash_file(p), p.stat().st_size)
        for p in shards.iterdir()
        if p.name.startswith(f"__{dist.rank}_") and p.name.endswith(SHARD_SUFFIX)
    }
    digests: dict[str, tuple[str, int]] = {}
    for one in dist.gather_objects(mine):
        digests.update(one)
    if dist.is_main:
        fsync_path(shards / METADATA)
        fsync_path(shards)
    return shards, digests


class ShardedModelState(Component):
    """The weights and AdamW state as one component (they load together: DCP reads both in one plan).

    Saving under FSDP: `prepare`, on every rank, writes the shards (a periodic save in the background:
    engine/async_shards.py, at most one in flight; a blocking one at once, `write_shards`); `save`, on rank 0,
    hands them to the writer as a ShardFiles part beside config.json. Otherwise (a branch of an FSDP run with
    train.parallel=ddp) it saves model.safetensors and optimizer.pt as ModelState and OptimizerState do.
    Loading: a sharded checkpoint at any world size, into FSDP's shards or a plain model (DCP reshards); a
    full one into FSDP's shards (rank 0 reads the files and broadcasts, every rank keeps its shard) or into a
    plain model as usual.
    The config's optimizer settings apply after every load (a branch may change them)."""

    name = "model"

    def __init__(
        self,
        model: Any,
        optimizer: torch.optim.Optimizer,
        config: Config,
        dist: Dist,
        device: torch.device,
        checkpoints_dir: Path,
        hooks: Hooks,
        *,
        write_shards: bool,
    ) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.dist, self.device, self.checkpoints_dir, self.hooks = dist, device, checkpoints_dir, hooks
        self.write_shards = write_shards
        if write_shards and config.checkpoint.hf_weights:  # refused now, not at every save
            from tui_trainer.engine.safetensors_stream import check_streamable

            check_streamable(model.config)
        self._full = (ModelState(model, device), OptimizerState(optimizer, config))
        self._shards: ShardFiles | None = None  # prepared, not yet saved
        # background writes only where periodic saves can be asynchronous (its gloo group: every rank, now)
        background = write_shards and config.checkpoint.async_save
        self._async = AsyncShardWriter(dist, hooks.before_checkpoint_file) if background else None

    def prepare(self, step: int, blocking: bool) -> None:
        if not self.write_shards:
            return
        if self._async is not None:
            # one write in flight: the previous save's, done (its staging buffers are free again). A failure
            # there fails this save on every rank alike (DCP fails a write on every rank when one rank's
            # failed), before any collective of this one, worded as rank 0's writer words it
            self._async.result()
        hook = self.hooks.before_checkpoint_file
        if blocking or self._async is None:
            shards, digests = write_shards(self.checkpoints_dir, self.dist, self.model, self.optimizer, step, hook)
            self._shards = ShardFiles(shards, digests)
            return
        shards = shards_dir(self.checkpoints_dir, self.dist, step)
        pending = self._async.start(step, shards, _state_dicts(self.model, self.optimizer))
        self._shards = ShardFiles(shards, {}, pending=pending)

    def wait(self) -> None:
        if self._async is not None:
            self._async.wait()  # a failure is reported by rank 0's writer, which waits for it too

    def save(self) -> list[Part]:
        if not self.write_shards:
            return [*self._full[0].save(), *self._full[1].save()]
        assert self._shards is not None, "prepare() writes the shards before rank 0 saves"
        shards, self._shards = self._shards, None
        parts: list[Part] = [shards, PretrainedFiles(self.model.config)]
        if self.config.checkpoint.hf_weights:  # after both: it reads the moved shards and config.json
            from tui_trainer.engine.safetensors_stream import HFWeights

            parts.append(HFWeights())
        return parts

    def load(self, ckpt: CheckpointReader) -> None:
        if is_sharded_checkpoint(ckpt.path):
            self._load_shards(ckpt.path)
        elif fsdp.is_sharded(self.model):
            self._load_full_into_shards(ckpt)
        else:
            for component in self._full:
                component.load(ckpt)
        apply_optim_config(self.optimizer, self.config)

    def _load_shards(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        check_fits(path / METADATA, self.model, weight_shapes(path))
        state = _state_dicts(self.model, self.optimizer)
        try:
            with _one_process_quietly():
                dcp.load(state, storage_reader=safe_reader(path), no_dist=not torch.distributed.is_initialized())
        except CheckpointInvalid:
            raise
        except Exception as exc:
            raise CheckpointInvalid(f"{path}: cannot read the shards ({str(exc).strip().splitlines()[0]})") from None
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def _load_full_into_shards(self, ckpt: CheckpointReader) -> None:
        """A full checkpoint (model.safetensors + optimizer.pt) into FSDP's shards: rank 0 alone reads and
        checks the files and broadcasts them tensor by tensor, each rank keeping its shard, so no other rank
        ever holds the whole model or its AdamW state. A file rank 0 refuses is refused on every rank."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        weights: dict[str, Any] = {}
        optimizer_state: dict[str, Any] = {}
        problem = None
        if self.dist.is_main:
            try:
                weights, optimizer_state = self._read_full(ckpt)
            except CheckpointInvalid as exc:
                problem = str(exc)
        problem = self.dist.broadcast_object(problem, setup=True)
        if problem is not None:
            raise CheckpointInvalid(problem)
        # strict=False: tied weights (lm_head) are not saved
        full = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=True)
        set_model_state_dict(self.model, weights, options=full)
        del weights
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=full)

    def _read_full(self, ckpt: CheckpointReader) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0: the full checkpoint's weights and AdamW state (keyed by parameter name), on the host
        (the broadcast moves each tensor to the device), checked against the model and optimizer."""
        from safetensors.torch import load_file

        path = ckpt.path
        try:
            weights: dict[str, Any] = load_file(str(path / WEIGHTS), device="cpu")
        except Exception as exc:
            raise CheckpointInvalid(f"{path / WEIGHTS}: cannot read weights ({exc})") from None
        check_fits(path / WEIGHTS, self.model, {k: tuple(v.shape) for k, v in weights.items()})
        saved = ckpt.pickled("optimizer.pt")
        check_optimizer_state(path / "optimizer.pt", self.optimizer, saved)
        return weights, optimizer_state_by_name(self.model, self.optimizer, saved)


def optimizer_state_by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> dict[str, Any]:
    """torch's optimizer state (parameters numbered in group order) keyed by parameter names instead, the
    form `set_optimizer_state_dict` takes. The numbering is the optimizer's own: group by group, in order."""
    names = {id(p): n for n, p in model.named_parameters()}
    number_to_name = {}
    for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True):
        for number, param in zip(saved_group["params"], group["params"], strict=True):
            number_to_name[number] = names[id(param)]
    groups = [{**g, "params": [number_to_name[n] for n in g["params"]]} for g in saved["param_groups"]]
    return {"state": {number_to_name[n]: s for n, s in saved["state"].items()}, "param_groups": groups}


def check_config_fits_weights(path: Path) -> None:
    """config.json describes exactly the model the shards fill (checkpoint_load's check, for DCP's index)."""
    from tui_trainer.engine.models import meta_model

    try:
        model = meta_model(path)
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointInvalid(f"{path / 'config.json'}: cannot build a model from it ({why})") from None
    problem = checkpoint_load.fit_problem(model, weight_shapes(path))
    if problem:
        raise CheckpointInvalid(f"{path / 'config.json'}: does not match the weights ({problem})")


# ---------------------------------------------------------------- export and generate (one process)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """The weights alone into a plain model in this process (generate, export): DCP reads every shard's
    piece of each tensor into the model's own full tensors, one process, no process group."""
    import torch.distributed.checkpoint as dcp

    with read_lease(path):
        check_fits(path / METADATA, model, weight_shapes(path))
        state = {"model": model.state_dict()}
        try:
            with _one_process_quietly():
                dcp.load(state, storage_reader=safe_reader(path), no_dist=True)
        except Exception as exc:
            raise CheckpointInvalid(f"{path}: cannot read the shards ({str(exc).strip().splitlines()[0]})") from None
        model.load_state_dict(state["model"], strict=False)


def load_model(path: Path, dtype: torch.dtype | None = None) -> Any:
    """The model a sharded checkpoint holds, whole, in this process (export, generate): built from its
    config.json without initialising weights, then filled by DCP tensor by tensor straight into the
    model's own memory, so the weights are never held twice."""
    from transformers import AutoConfig

    from tui_trainer.engine.checkpoint_load import no_init
    from tui_trainer.engine.models import family_for

    hf_config = AutoConfig.from_pretrained(path)
    with no_init():
        model = family_for(hf_config.model_type).build(hf_config)
    model.tie_weights()
    load_weights(path, model)
    return model.to(dtype) if dtype is not None else model  # type: ignore[arg-type]  # transformers wraps .to
