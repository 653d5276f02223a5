"""Checkpoints written by an earlier version still resume bit for bit.

tests/fixtures/checkpoint-v0.1 holds a tiny run paused at step 6 by tui-trainer as it was before the engine's
restructure (scheduler.pt as {"step", "lr"}, trainer_state.json in our own schema, xxh3 manifest), its corpus, and
the losses of the same run trained uninterrupted to step 12 by that version (expected.json). Today's code must
continue it to exactly those losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_resume
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint-v0.1"


def test_a_checkpoint_from_an_earlier_version_resumes_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    shutil.copy(FIXTURE / "corpus.txt", tmp_path / "corpus.txt")
    shutil.copytree(FIXTURE / "old", tmp_path / "runs" / "old")
    monkeypatch.chdir(tmp_path)  # the run's data.path is "corpus.txt", relative, as its user gave it
    store = RunStore(tmp_path / "runs")
    verify_checkpoint(store.checkpoint_dir("old", 6))
    expected = json.loads((tmp_path / "runs" / "old" / "expected.json").read_text())["losses_steps_1_to_12"]

    plan = plan_resume(store, "old")
    assert plan.run == "old" and plan.start_step == 6  # continues the same run in place
    notices: list[str] = []
    sink = lambda event: notices.append(event.message) if isinstance(event, Notice) else None  # noqa: E731
    assert Trainer(store, plan, sink).run() == State.FINISHED
    # it recorded no tokenization recipe: the run says, once, that today's may split text differently
    said = [n for n in notices if "tokenized by" in n]
    assert len(said) == 1 and "an earlier version" in said[0], notices

    losses = {r["step"]: r["loss"] for r in store.metrics("old") if "loss" in r}
    assert [losses[step] for step in range(1, 13)] == expected
