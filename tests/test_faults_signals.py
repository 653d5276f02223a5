"""SIGINT / SIGTERM / SIGHUP to a real headless run: finish the step, save, exit 0 with a message.
A second SIGINT exits at once, even in the middle of writing that checkpoint, and loses nothing."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from faults_support import Proc, last_step, losses, reference, sets, temp_dirs
from support.waiting import wait_for

from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_resume
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

pytestmark = pytest.mark.slow


def long_run(tiny, **extra):
    """A schedule far longer than the test: only the signal ends the run."""
    return tiny(train__max_steps=2000, train__eval_every=0, checkpoint__keep_last=100, **extra)


def resume_matches_reference(store: RunStore, run: str, tiny, extra_steps: int = 2) -> None:
    """Resume the run in-process a few steps past its checkpoint: the whole curve equals an uninterrupted
    run's, bit for bit (checkpoint settings do not change the losses, so one reference serves all)."""
    start = store.run(run).newest.step
    assert Trainer(store, plan_resume(store, run), until_step=start + extra_steps).run() == State.PAUSED
    expected, _ = reference(long_run(tiny, checkpoint__every_steps=0), until_step=20)
    assert start + extra_steps <= 20, "the run got further than the reference"
    got = losses(store, run)
    assert sorted(got) == list(range(1, start + extra_steps + 1))
    assert got == {s: expected[s] for s in got}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_finishes_the_step_saves_and_exits_cleanly(tmp_path, tiny, sig):
    overrides = long_run(tiny, checkpoint__every_steps=0)
    store = RunStore(tmp_path / "runs")
    proc = Proc(["train", "--run", "s", "--headless", "--runs-dir", str(store.root), *sets(overrides)], tmp_path)
    wait_for(lambda: last_step(store.metrics_path("s")) >= 3 or not proc.alive(), 90, "step 3")
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=60) == 0, proc.stderr
    err = proc.stderr
    said = re.search(rf"{sig.name}: pausing after step (\d+) \(saving a checkpoint\)", err)
    assert said, err
    step = int(said.group(1))
    assert f"Paused s at step {step} (checkpoint step {step} saved)" in err, err
    assert "Traceback" not in err
    # the checkpoint is of exactly the step the message named, the last one logged, and it verifies
    assert [c.step for c in store.run("s").checkpoints] == [step]
    verify_checkpoint(store.checkpoint_dir("s", step))
    assert last_step(store.metrics_path("s")) == step
    assert store.read_record("s")["status"] == "paused"
    assert temp_dirs(store, "s") == []
    resume_matches_reference(store, "s", tiny)


def test_second_sigint_exits_at_once_mid_checkpoint_and_loses_nothing(tmp_path, tiny):
    overrides = long_run(tiny, checkpoint__every_steps=2)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--run", "s", "--headless", "--runs-dir", str(store.root), *sets(overrides)]
    # once the pause save starts, its manifest write hangs: the second Ctrl-C lands mid-checkpoint
    proc = Proc(args, tmp_path, faults_from="faults_support:slow_pause_save")
    wait_for(lambda: len(store.run("s").checkpoints) >= 2 if store.exists("s") else not proc.alive(), 90, "ckpts")
    os.kill(proc.pid, signal.SIGINT)
    wait_for(lambda: "INJECTED" in proc.stderr or not proc.alive(), 30, "the pause save to start")
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.stderr
    assert time.monotonic() - sent < 10, "the second Ctrl-C must not wait for the checkpoint"
    assert "SIGINT: pausing after step" in proc.stderr and "Ctrl-C again to quit now" in proc.stderr
    # the interrupted checkpoint is only a temp dir; every checkpoint that exists is whole
    half = temp_dirs(store, "s")
    assert len(half) == 1 and not (half[0] / "manifest.json").exists()
    checkpoints = store.run("s").checkpoints
    assert len(checkpoints) >= 2 and all(c.valid for c in checkpoints)
    for ckpt in checkpoints:
        verify_checkpoint(ckpt.path)
    # resuming cleans the temp dir and continues exactly
    resume_matches_reference(store, "s", tiny)
    assert temp_dirs(store, "s") == []
