"""kill -9 and the checkpoint writer process: killing the writer mid-write pauses the run with a message and
loses nothing; killing the trainer mid-write takes the writer down with it (no orphan finishing a write
behind a resumed run). Either way every checkpoint that exists is whole and resume is exact."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest
from faults_support import Proc, losses, reference, sets, temp_dirs
from support.waiting import wait_for

from tui_trainer.core.config import load_config
from tui_trainer.core.events import Failed, State
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine import checkpointing
from tui_trainer.engine.trainer import Trainer

FORCE_PROCESS = "from tui_trainer.engine import checkpointing as _c\n_c.PROCESS_WRITER_MIN_BYTES = 0\n"


def every_checkpoint_is_whole_and_resume_is_exact(store: RunStore, run: str, overrides: list[str]) -> None:
    for ckpt in store.run(run).checkpoints:
        verify_checkpoint(ckpt.path)
    assert Trainer(store, plan_resume(store, run)).run() == State.FINISHED
    assert losses(store, run) == reference(overrides)[0]
    assert temp_dirs(store, run) == []


def test_writer_process_killed_mid_write_pauses_the_run_and_loses_nothing(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(checkpointing, "PROCESS_WRITER_MIN_BYTES", 0)
    overrides = tiny(train__max_steps=24, checkpoint__every_steps=1, checkpoint__keep_last=3, train__eval_every=0)
    store = RunStore(tmp_path / "runs")
    events: list = []
    trainer = Trainer(store, plan_train(store, load_config(None, overrides), "w"), events.append)
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(trainer.run()))
    thread.start()
    try:
        writer = wait_for(lambda: trainer.checkpoints._process_writer, 60, "the writer process")
        wait_for(lambda: store.exists("w") and store.run("w").checkpoints, 60, "a first checkpoint")
        wait_for(lambda: temp_dirs(store, "w") or not thread.is_alive(), 30, "a checkpoint write", 0.0005)
        os.kill(writer._proc.pid, signal.SIGKILL)
    finally:
        thread.join(60)
    assert result == [State.PAUSED], events
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "disk", failed
    assert "the checkpoint writer process died" in failed[0].message
    assert "older checkpoints are intact" in failed[0].message
    assert temp_dirs(store, "w") == [], "the dead writer's half-written dir is removed at once"
    monkeypatch.undo()
    every_checkpoint_is_whole_and_resume_is_exact(store, "w", overrides)


@pytest.mark.slow
def test_kill9_of_the_trainer_mid_write_takes_the_writer_process_with_it(tmp_path, tiny):
    overrides = tiny(train__max_steps=40, checkpoint__every_steps=1, checkpoint__keep_last=3, train__eval_every=0)
    store = RunStore(tmp_path / "runs")
    args = ["train", "--run", "k", "--headless", "--runs-dir", str(store.root), *sets(overrides)]
    proc = Proc(args, tmp_path, inject=FORCE_PROCESS)
    parent = psutil.Process(proc.pid)
    wait_for(lambda: parent.children() or not proc.alive(), 60, "the writer process to start")
    wait_for(lambda: (store.exists("k") and store.run("k").checkpoints) or not proc.alive(), 60, "a checkpoint")
    wait_for(lambda: temp_dirs(store, "k") or not proc.alive(), 30, "a checkpoint write", 0.0005)
    children = parent.children(recursive=True)
    assert proc.alive() and children, proc.stderr
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"the writer outlived the trainer: {alive}"
    every_checkpoint_is_whole_and_resume_is_exact(store, "k", overrides)
