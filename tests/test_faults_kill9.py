"""kill -9 at any moment, including in the middle of writing a checkpoint: a real headless run is killed
again and again and resumed each time; in the end its curve equals an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from faults_support import Proc, eval_losses, last_step, losses, metric_lines, reference, sets, temp_dirs
from support.waiting import wait_for

from tui_trainer.core.config import load_config
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import State, StepLogged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

MAX_KILLS = 4


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path, tiny):
    # a checkpoint after every step (async writer, retention pruning) so kills land inside writes often
    overrides = tiny(train__max_steps=12, checkpoint__every_steps=1, checkpoint__keep_last=3, train__eval_every=5)
    expected_loss, expected_eval = reference(overrides)
    store = RunStore(tmp_path / "runs")
    metrics = store.metrics_path("k")
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    log: list[str] = []
    args = ["train", "--run", "k", "--headless", "--runs-dir", str(store.root), *sets(overrides)]

    finished_rc = None
    previous_pid = None
    for attempt in range(MAX_KILLS):
        lines_before = len(metric_lines(metrics))
        newest = store.run("k").newest if store.exists("k") else None
        target = (newest.step if newest else 0) + rng.randint(1, 3)
        proc = Proc(args, tmp_path)

        def reached(target: int = target, lines_before: int = lines_before, proc: Proc = proc) -> bool:
            new = metric_lines(metrics)[lines_before:]
            return not proc.alive() or any(r.get("step", 0) >= target and "loss" in r for r in new)

        wait_for(reached, 90, f"attempt {attempt} to reach step {target}")
        if previous_pid is not None:  # a resume: it saw the dead holder's lock and took it over
            wait_for(lambda: "took over the lock" in proc.stderr or not proc.alive(), 30, "the takeover note")  # noqa: B023
            assert f"took over the lock of pid {previous_pid}, which died" in proc.stderr, proc.stderr
        if not proc.alive():
            finished_rc = proc.wait()
            break
        if attempt % 2 == 0:
            # kill while a checkpoint is half written (its temp dir exists, no manifest renamed in yet)
            wait_for(lambda: temp_dirs(store, "k") or not proc.alive(), 30, "a checkpoint write", 0.0005)  # noqa: B023
        else:
            time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        half = temp_dirs(store, "k")
        log.append(f"attempt {attempt}: rc {rc} at step {last_step(metrics)}, {len(half)} half-written")
        # whatever exists as a checkpoint is whole: the rename happens only after the manifest is fsynced
        for ckpt in store.run("k").checkpoints:
            verify_checkpoint(ckpt.path)
        lock = store.run_dir("k") / ".lock"
        assert lock.read_text() == f"pid {proc.pid}", "the dead process's lock file stays behind (stale)"
        if attempt == 1:
            with open(metrics, "a") as fh:  # a torn last line, as a power cut mid-write would leave
                fh.write('{"step": 999, "lo')
        args = ["resume", "k", "--headless", "--runs-dir", str(store.root)]
        previous_pid = proc.pid

    context = f"seed {seed}; " + "; ".join(log)
    if finished_rc is None:  # the last process runs to the end: takes over the stale lock, cleans temp dirs
        final = Proc(args, tmp_path)
        finished_rc = final.wait(timeout=120)
        context += "\n" + final.stderr
    assert finished_rc == 0, context
    print(context)
    assert store.read_record("k")["status"] == "finished", context
    assert temp_dirs(store, "k") == [], context
    assert losses(store, "k") == expected_loss, context
    assert eval_losses(store, "k") == expected_eval, context
    for ckpt in store.run("k").checkpoints:
        verify_checkpoint(ckpt.path)
    assert any(" 0 half-written" not in entry for entry in log), f"no kill landed inside a checkpoint write: {context}"


def test_a_run_killed_before_its_first_checkpoint_starts_over_in_place(tmp_path, tiny):
    """Nothing to lose yet: `resume RUN` restarts it from step 0 (saying so) instead of refusing."""
    store = RunStore(tmp_path / "runs")
    overrides = tiny()
    plan = plan_train(store, load_config(None, overrides), "early")
    trainer = Trainer(store, plan)
    trainer.sink = lambda e: trainer.stop() if isinstance(e, StepLogged) and e.step == 3 else None
    assert trainer.run() == State.STOPPED
    assert store.run("early").checkpoints == [] and last_step(store.metrics_path("early")) == 3
    # what a kill -9 also leaves: a half-written checkpoint and a half-written run.json
    (store.checkpoints_dir("early") / ".tmp-step-00000004-dead").mkdir()
    (store.run_dir("early") / ".tmp-run.json.999999").write_text("{")
    with pytest.raises(UserError, match="has no checkpoint to branch from"):
        plan_resume(store, "early", ["optim.lr=0.002"])
    events: list = []
    assert Trainer(store, plan_resume(store, "early"), events.append).run() == State.FINISHED
    assert any(
        "stopped before its first checkpoint: starting it over from step 0" in getattr(e, "message", "") for e in events
    )
    assert losses(store, "early") == reference(overrides)[0]
    assert temp_dirs(store, "early") == [] and not (store.run_dir("early") / ".tmp-run.json.999999").exists()
