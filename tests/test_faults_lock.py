"""Two processes on one run: the second refuses naming the holder and writes nothing; a lock left by a
process that was killed is detected and taken over."""

from __future__ import annotations

import os
import signal

import pytest
from faults_support import Proc, last_step, losses, metric_lines, reference, sets
from support.waiting import wait_for

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.errors import RunLocked
from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunLock, RunStore
from tui_trainer.engine.trainer import Trainer


@pytest.mark.slow
def test_second_process_on_a_live_run_is_refused_naming_the_holder(tmp_path, tiny, capsys):
    store = RunStore(tmp_path / "runs")
    overrides = tiny(train__max_steps=2000, checkpoint__every_steps=2, train__eval_every=0)
    holder = Proc(["train", "--run", "L", "--headless", "--runs-dir", str(store.root), *sets(overrides)], tmp_path)
    try:
        wait_for(lambda: last_step(store.metrics_path("L")) >= 3 or not holder.alive(), 90, "the holder to train")
        assert holder.alive(), holder.stderr
        runs = ["--runs-dir", str(store.root)]
        for args in (["resume", "L"], ["train", "--run", "L"]):
            capsys.readouterr()
            assert main([*args, "--headless", *runs]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert [line for line in err if "error" in line] == err[-1:], err
            if args[0] == "resume":
                assert f"run 'L' is in use by pid {holder.pid}" in err[-1], err
            elif args[0] == "train":
                assert "run 'L' already exists" in err[-1], err
        # the refused processes wrote nothing: no resume marker, no second run
        assert not any(r.get("event") == "resume" for r in metric_lines(store.metrics_path("L")))
        os.kill(holder.pid, signal.SIGTERM)
        assert holder.wait(timeout=60) == 0, holder.stderr
    finally:
        if holder.alive():
            holder.kill()
    assert store.read_record("L")["status"] == "paused"


def test_the_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    run_dir = tmp_path / "r"
    first = RunLock(run_dir).acquire()
    with pytest.raises(RunLocked, match=rf"run 'r' is in use by pid {os.getpid()}"):
        RunLock(run_dir).acquire()  # flock is per open file: a second open conflicts even in-process
    first.release()
    second = RunLock(run_dir).acquire()
    assert second.stale_holder == "", "a clean release leaves no holder behind"
    second.release()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    overrides = tiny()
    assert Trainer(store, plan_train(store, load_config(None, overrides), "s"), until_step=4).run() == State.PAUSED
    # what kill -9 leaves: the lock file still names the dead holder, but the kernel dropped its flock
    (store.run_dir("s") / ".lock").write_text("pid 999999")
    events: list = []
    assert Trainer(store, plan_resume(store, "s"), events.append).run() == State.FINISHED
    notes = [e.message for e in events if isinstance(e, Notice)]
    assert any("took over the lock of pid 999999, which died without releasing it" in n for n in notes), notes
    assert losses(store, "s") == reference(overrides)[0]
    assert (store.run_dir("s") / ".lock").read_text() == ""
