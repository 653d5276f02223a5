"""Preemption (issue 24): a run that continues itself when a supervisor runs the same command line again —
`train --auto-resume`, torchrun's elastic restarts, Slurm's SIGUSR1 before the time limit. Real processes,
real signals, tiny models; losses compared bit for bit with an uninterrupted run.

A run is held at a known step by a fault hook that waits for a file (`hold_at_step`), so a kill or a signal
lands mid-run at the same place every time, however loaded the machine is.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from faults_support import Proc, cli, losses, reference, sets
from support.files import tree_digest
from support.waiting import wait_for

from tui_trainer.core.store import RunStore
from tui_trainer.engine import faults

HOLD_STEP, HOLD_FILE, RELEASE_FILE = "TEST_HOLD_STEP", "TEST_HOLD_FILE", "TEST_RELEASE_FILE"


def hold_at_step() -> faults.Hooks:
    """For a CLI subprocess: after optimizer step $TEST_HOLD_STEP, touch $TEST_HOLD_FILE and wait until
    $TEST_RELEASE_FILE exists (forever if it never does: the test kills the process). Only a first start
    holds: a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) runs through."""
    step = int(os.environ[HOLD_STEP])
    held, release = Path(os.environ[HOLD_FILE]), Path(os.environ[RELEASE_FILE])

    def after_step(done: int, model: object) -> None:
        if done != step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        held.touch()
        while not release.exists():
            time.sleep(0.01)

    return faults.Hooks(after_optimizer_step=after_step)


def held(tmp_path: Path, step: int) -> dict[str, str]:
    return {HOLD_STEP: str(step), HOLD_FILE: str(tmp_path / "held"), RELEASE_FILE: str(tmp_path / "release")}


def newest_step(store: RunStore, run: str) -> int:
    newest = store.run(run).newest if store.exists(run) else None
    return newest.step if newest else 0


def markers(store: RunStore, run: str) -> list[dict]:
    from faults_support import metric_lines

    return [r for r in metric_lines(store.metrics_path(run)) if r.get("event") == "resume"]


@pytest.mark.slow
def test_auto_resume_starts_continues_after_kill_9_finishes_once_and_refuses_changed_settings(tmp_path, tiny):
    overrides = tiny(train__max_steps=12, checkpoint__every_steps=4)
    expected, _ = reference(overrides)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--name", "q", "--auto-resume", "--headless", "--runs-dir", str(store.root), *sets(overrides)]

    # first start: the run does not exist, so it starts; killed (-9) at step 6, after checkpoint 4 landed
    first = Proc(args, tmp_path, faults_from="test_preemption:hold_at_step", env=held(tmp_path, 6))
    wait_for(lambda: (tmp_path / "held").exists() or not first.alive(), 90, "the run to reach step 6")
    wait_for(lambda: newest_step(store, "q") == 4, 30, "checkpoint 4 on disk")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()

    # the same command again: continues from checkpoint 4, exactly
    again = cli(*args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "auto-resume: continuing q from step 4" in again.stderr, again.stderr
    assert losses(store, "q") == expected
    assert [m.get("reason") for m in markers(store, "q")] == ["auto-resume"]
    assert store.read_record("q")["restarts"] == 1 and store.read_record("q")["status"] == "finished"
    listing = cli("ls", "--runs-dir", str(store.root), cwd=tmp_path)
    assert "q  [finished]" in listing.stdout and "1 restart" in listing.stdout, listing.stdout

    # once more after it finished: exit 0 at once, one line, nothing written
    before = tree_digest(store.root)
    done = cli(*args, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "tui-trainer: q already finished at step 12; nothing to do\n")
    assert tree_digest(store.root) == before

    # a changed setting is never a silent continuation: exit 2, the key named
    changed = cli(*args, "--set", "optim.lr=0.5", cwd=tmp_path)
    assert changed.returncode == 2 and "optim.lr (0.001 -> 0.5)" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and tree_digest(store.root) == before


@pytest.mark.slow
def test_sigusr1_saves_at_the_next_step_and_exits_0_then_auto_resume_continues_exactly(tmp_path, tiny):
    overrides = tiny(train__max_steps=12, checkpoint__every_steps=0, train__eval_every=0)
    expected, _ = reference(overrides)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--name", "s", "--auto-resume", "--headless", "--runs-dir", str(store.root), *sets(overrides)]
    run = Proc(args, tmp_path, faults_from="test_preemption:hold_at_step", env=held(tmp_path, 3))
    wait_for(lambda: (tmp_path / "held").exists() or not run.alive(), 90, "the run to reach step 3")
    os.kill(run.pid, signal.SIGUSR1)  # mid-step: it lands on this step's boundary
    wait_for(lambda: "SIGUSR1: pausing after step 3" in run.stderr or not run.alive(), 30, "the signal's line")
    (tmp_path / "release").touch()
    assert run.wait(60) == 0, run.stderr
    assert "Paused s at step 3 (checkpoint step 3 saved)" in run.stderr, run.stderr
    assert [c.step for c in store.run("s").checkpoints] == [3]

    again = cli(*args, cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert losses(store, "s") == expected


def test_auto_resume_needs_a_name_and_refuses_another_number_of_ranks(tmp_path, tiny):
    from tui_trainer.core.config import load_config
    from tui_trainer.core.errors import UserError
    from tui_trainer.core.plan import plan_auto_resume

    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny())
    with pytest.raises(UserError, match="--auto-resume needs --name"):
        plan_auto_resume(store, config, None)
    store.create_run("r", config.to_dict(), None)
    store.update_record("r", world_size=2)
    with pytest.raises(UserError, match=r"ranks \(2 -> 1\)"):
        plan_auto_resume(store, config, "r")
