"""Checkpoint I/O: no step written twice, exact resume through every write path (thread, process, sync),
one checksum pass per resume, and checkpoints of the older sha256 format still verify and resume."""

from __future__ import annotations

import json

import pytest
from faults_support import losses, reference, temp_dirs
from support.files import tree_digest

from tui_trainer.core.config import load_config
from tui_trainer.core.errors import CheckpointInvalid, ConfigError
from tui_trainer.core.events import CheckpointSaved, Notice, State
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import MANIFEST, RunStore, read_manifest, sha256_file, verify_checkpoint
from tui_trainer.core.store import manifest as manifests
from tui_trainer.engine import checkpointing
from tui_trainer.engine.trainer import Trainer


def run(store: RunStore, plan, until_step=None) -> tuple[str, list]:
    events: list = []
    return Trainer(store, plan, events.append, until_step=until_step).run(), events


def saved_steps(events: list) -> list[int]:
    return [e.step for e in events if isinstance(e, CheckpointSaved)]


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_pause_at_a_step_just_saved_writes_it_once(tmp_path, tiny, async_save):
    """The periodic save of step 4 and the pause at step 4 are one checkpoint, one event (the pause waits
    for the background write instead of writing the step again)."""
    store = RunStore(tmp_path)
    config = load_config(None, tiny(checkpoint__async_save=async_save))
    state, events = run(store, plan_train(store, config, "p"), until_step=4)
    assert state == State.PAUSED
    assert saved_steps(events) == [4]
    assert [c.step for c in store.run("p").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("p", 4))


def test_resuming_a_run_already_at_its_until_step_or_end_writes_nothing(tmp_path, tiny):
    store = RunStore(tmp_path)
    overrides = tiny(train__max_steps=8)
    assert run(store, plan_train(store, load_config(None, overrides), "r"), until_step=6)[0] == State.PAUSED
    before = tree_digest(store.checkpoints_dir("r"))
    state, events = run(store, plan_resume(store, "r"), until_step=6)
    assert state == State.PAUSED and saved_steps(events) == []
    assert tree_digest(store.checkpoints_dir("r")) == before
    # finished: resuming it again is refused at the plan (nothing left to train) and rewrites nothing
    assert run(store, plan_resume(store, "r"))[0] == State.FINISHED
    after_finish = tree_digest(store.checkpoints_dir("r"))
    with pytest.raises(ConfigError, match=r"train\.max_steps: 8 is not past the starting step 8"):
        plan_resume(store, "r")
    assert tree_digest(store.checkpoints_dir("r")) == after_finish


@pytest.mark.parametrize("writer", ["thread", "process", "sync"])
def test_resume_from_each_write_path_is_bit_for_bit(tmp_path, tiny, monkeypatch, writer):
    """Step 4 is written by the background thread, the writer process (from shared-memory staging) or
    synchronously; a branch from it continues exactly like the uninterrupted run."""
    if writer == "process":
        monkeypatch.setattr(checkpointing, "PROCESS_WRITER_MIN_BYTES", 0)
    overrides = tiny(train__grad_accum=2, checkpoint__async_save=writer != "sync")
    expected, _ = reference(overrides)
    store = RunStore(tmp_path)
    state, events = run(store, plan_train(store, load_config(None, overrides), "w"), until_step=6)
    assert state == State.PAUSED and saved_steps(events) == [4, 6]
    resumed, resume_events = run(store, plan_resume(store, "w@4"))
    assert resumed == State.FINISHED
    # today's checkpoints record how their data was tokenized: no "may differ" notice on resume
    assert not [e for e in resume_events if isinstance(e, Notice) and "tokenized by" in e.message]
    branch = store.run_names()[-1]
    assert branch != "w" and losses(store, branch) == {s: v for s, v in expected.items() if s > 4}
    assert losses(store, "w") == {s: v for s, v in expected.items() if s <= 6}


def test_resume_hashes_each_file_once(tmp_path, tiny, monkeypatch):
    """The plan verifies the checkpoint; the load trusts that verification instead of hashing again."""
    store = RunStore(tmp_path)
    assert run(store, plan_train(store, load_config(None, tiny()), "h"), until_step=4)[0] == State.PAUSED
    ckpt = store.checkpoint_dir("h", 4)
    hashed: list[str] = []
    real = manifests.hash_file

    def counting(path, algorithm=manifests.HASH_KEY):
        if path.parent == ckpt:
            hashed.append(path.name)
        return real(path, algorithm)

    monkeypatch.setattr(manifests, "hash_file", counting)
    assert run(store, plan_resume(store, "h"), until_step=5)[0] == State.PAUSED
    assert sorted(hashed) == sorted(read_manifest(ckpt)["files"]), "each file of step 4 hashed exactly once"


def _downgrade_to_sha256_manifest(ckpt) -> None:
    """Rewrite a checkpoint's manifest as the first format wrote it: sha256 per file."""
    manifest = read_manifest(ckpt)
    files = {name: {"sha256": sha256_file(ckpt / name), "size": e["size"]} for name, e in manifest["files"].items()}
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "format": 1, "files": files}, indent=2))


def test_format_1_sha256_checkpoints_still_verify_and_resume_exactly(tmp_path, tiny):
    overrides = tiny()
    expected, _ = reference(overrides)
    store = RunStore(tmp_path)
    assert run(store, plan_train(store, load_config(None, overrides), "old"), until_step=4)[0] == State.PAUSED
    ckpt = store.checkpoint_dir("old", 4)
    _downgrade_to_sha256_manifest(ckpt)
    assert verify_checkpoint(ckpt)["format"] == 1
    assert run(store, plan_resume(store, "old"))[0] == State.FINISHED
    assert losses(store, "old") == expected
    assert verify_checkpoint(store.checkpoint_dir("old", 12))["format"] == manifests.FORMAT_VERSION
    # and a corrupt old-format file is still caught by its sha256
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointInvalid, match="sha256 does not match the manifest"):
        verify_checkpoint(ckpt)
    assert temp_dirs(store, "old") == []
