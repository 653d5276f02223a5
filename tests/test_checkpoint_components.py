"""Checkpoint components (engine/components.py): a component added to the registry is saved, listed in the
manifest, verified and loaded back by the unchanged save and load code, through the writer thread's path and
through the writer process (staged tensors crossing shared memory), as a strategy such as FSDP will add its
own; a component replaced by name takes the old one's place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tui_trainer.core.errors import CheckpointInvalid
from tui_trainer.core.store import RunStore, read_manifest, verify_checkpoint
from tui_trainer.engine import checkpoint_load, checkpoint_save
from tui_trainer.engine.checkpoint_components import RngState, RunRecord, StateKeys
from tui_trainer.engine.checkpoint_files import JsonKeys, Part, TensorFile
from tui_trainer.engine.checkpoint_load import CheckpointReader
from tui_trainer.engine.components import Component, Components
from tui_trainer.engine.distributed import Dist
from tui_trainer.engine.sampler import BlockSampler
from tui_trainer.engine.staging import Staging
from tui_trainer.engine.state import TrainState
from tui_trainer.engine.writer_process import ProcessWriter

CPU = torch.device("cpu")


class Shards(Component):
    """A strategy's own state: tensors in a file of its own plus a key in tui_trainer_state.json."""

    name = "shards"

    def __init__(self, seed: int) -> None:
        self.table = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed))
        self.layout = f"layout-{seed}"

    def save(self) -> list[Part]:
        return [TensorFile("shards.safetensors", {"table": self.table}), JsonKeys({"shard_layout": self.layout})]

    def load(self, ckpt: CheckpointReader) -> None:
        self.table = load_file(str(ckpt.path / "shards.safetensors"))["table"]
        self.layout = ckpt.trainer_state["shard_layout"]


def registry(step: int, seed: int) -> tuple[Components, TrainState, BlockSampler, Shards]:
    ts, sampler, shards = TrainState(step=step), BlockSampler(100, 4, seed), Shards(seed)
    for _ in range(seed):
        sampler.next_indices()
    components = Components(StateKeys("train_state", ts), StateKeys("sampler", sampler), RngState(Dist.single(CPU)))
    components.add(shards, before="rng")  # a strategy's addition: the RNG stays last
    return components, ts, sampler, shards


def load_back(path: Path) -> Shards:
    components, ts, sampler, shards = registry(0, 0)
    checkpoint_load.load(path, components, CPU)
    assert (ts.step, sampler.position) == (7, 12)
    return shards


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_an_added_component_is_saved_verified_and_loaded_by_the_unchanged_save_and_load(tmp_path, writer):
    store = RunStore(tmp_path)
    components, _, _, saved = registry(7, 3)
    expected = saved.table.clone()
    assert components.names() == ["train_state", "sampler", "shards", "rng"]
    if writer == "thread":
        path = checkpoint_save.write(store, "s", checkpoint_save.capture(components, step=7, manifest_meta={}))
    else:
        staging, process = Staging(shared=True), ProcessWriter()
        try:
            assert process.ready()
            snap = checkpoint_save.capture(components, step=7, manifest_meta={}, staging=staging)
            saved.table.add_(1)  # the staged copy was taken at capture: later updates are not in the file
            path = process.write(store, "s", snap, staging)
        finally:
            process.close()
            staging.release()
    assert "shards.safetensors" in read_manifest(path)["files"]
    verify_checkpoint(path)
    loaded = load_back(path)
    assert torch.equal(loaded.table, expected) and loaded.layout == "layout-3"
    # the manifest covers the new file like every other: a flipped byte is refused on load
    data = bytearray((path / "shards.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "shards.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid, match=r"shards\.safetensors"):
        load_back(path)


def test_a_replaced_component_takes_the_place_and_name_of_the_old_one():
    components, _, _, _ = registry(0, 0)
    old = components.replace(Shards(1))
    assert isinstance(old, Shards) and old.layout == "layout-0" and components["shards"].layout == "layout-1"
    assert components.names() == ["train_state", "sampler", "shards", "rng"]
    with pytest.raises(ValueError, match="registered twice"):
        components.add(Shards(2))
    with pytest.raises(KeyError, match="no component 'optimizer' to go before"):
        components.add(RunRecord({}), before="optimizer")
