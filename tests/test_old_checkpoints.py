"""Checkpoints written by an earlier version still resume exactly.

tests/fixtures/checkpoint-v0.1 holds a tiny run paused at step 6 by tui-trainer as it was before the engine's
restructure (scheduler.pt as {"step", "lr"}, trainer_state.json in our own schema, xxh3 manifest), its corpus, and
the losses of the same run trained uninterrupted to step 12 by that version (expected.json).

Those numbers were computed on one CPU. Another CPU (AVX-512 against AVX2, another vendor's kernels) rounds the
same float32 sums differently in the last bit, so bit-for-bit against a file is only meaningful on a CPU that
does the fixture's arithmetic. The test finds out which case it is in: today's code trains the first six steps
from scratch and compares its weights with the fixture's. Same weights, same arithmetic: the resumed losses
must equal the old version's bit for bit. Otherwise they must agree to 1e-5 — about 20x the rounding seen
between two CPUs after six steps, and far below what a wrongly restored RNG (dropout masks), data position,
learning-rate schedule or optimizer moments costs (1e-3 and up)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tui_trainer.core.config import Config
from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint-v0.1"
PAUSED_AT = 6
CPU_ROUNDING_TOLERANCE = 1e-5


def this_cpu_repeats_the_fixtures_arithmetic(store: RunStore, recorded_config: dict) -> bool:
    """Train the fixture's run from scratch to its pause step here and compare weights bit for bit."""
    config = Config.from_dict(recorded_config).with_overrides(
        [f"train.max_steps={PAUSED_AT}", f"checkpoint.every_steps={PAUSED_AT}"]
    )
    assert Trainer(store, plan_train(store, config, "here"), lambda _: None).run() == State.FINISHED
    ours = load_file(store.checkpoint_dir("here", PAUSED_AT) / "model.safetensors")
    theirs = load_file(store.checkpoint_dir("old", PAUSED_AT) / "model.safetensors")
    assert ours.keys() == theirs.keys()
    return all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_checkpoint_from_an_earlier_version_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    shutil.copy(FIXTURE / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(FIXTURE / "old", tmp_path / "runs" / "old")
    monkeypatch.chdir(tmp_path)  # the run's data.path is "corpus.txt", relative, as its user gave it
    store = RunStore(tmp_path / "runs")
    verify_checkpoint(store.checkpoint_dir("old", PAUSED_AT))
    expected = json.loads((tmp_path / "runs" / "old" / "expected.json").read_text())["losses_steps_1_to_12"]
    recorded_config = json.loads((tmp_path / "runs" / "old" / "run.json").read_text())["config"]
    bit_for_bit = this_cpu_repeats_the_fixtures_arithmetic(store, recorded_config)

    plan = plan_resume(store, "old")
    assert plan.run == "old" and plan.start_step == PAUSED_AT  # continues the same run in place
    notices: list[str] = []
    sink = lambda event: notices.append(event.message) if isinstance(event, Notice) else None  # noqa: E731
    assert Trainer(store, plan, sink).run() == State.FINISHED
    # it recorded no tokenization recipe: the run says, once, that today's may split text differently
    said = [n for n in notices if "tokenized by" in n]
    assert len(said) == 1 and "an earlier version" in said[0], notices

    losses = {r["step"]: r["loss"] for r in store.metrics("old") if "loss" in r}
    resumed = [losses[step] for step in range(1, 13)]
    if bit_for_bit:
        assert resumed == expected
    else:
        assert resumed[:PAUSED_AT] == expected[:PAUSED_AT]  # the old run's own history is kept as it was
        assert resumed[PAUSED_AT:] == pytest.approx(expected[PAUSED_AT:], abs=CPU_ROUNDING_TOLERANCE, rel=0)
