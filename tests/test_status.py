"""`tui-trainer status RUN` says what the run is doing, as a user sees it: real training processes held at
a known point (a gate file), the real CLI asked from outside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from faults_support import GATE_ENV, GATE_STEPS_ENV, GATED_PREPARATION, Proc, cli, sets
from support.waiting import wait_for

from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer

TIMEOUT = 120.0


def status(tmp_path: Path, run: str) -> tuple[str, dict[str, Any]]:
    """(the status line, the --json object); ("", {}) while there is no such run or process."""
    line = cli("status", run, "--runs-dir", "runs", cwd=tmp_path)
    if line.returncode == 2 and "no run named" in line.stderr:
        return "", {}
    assert line.returncode == 0, line.stderr
    as_json = cli("status", run, "--json", "--runs-dir", "runs", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    return line.stdout.strip(), json.loads(as_json.stdout)


def json_status(tmp_path: Path, run: str) -> dict[str, Any]:
    """`status RUN --json`; {} while there is no such run or process."""
    out = cli("status", run, "--json", "--runs-dir", "runs", cwd=tmp_path)
    if out.returncode == 2 and "no run named" in out.stderr:
        return {}
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.slow
def test_status_during_data_preparation_says_what_the_process_is_doing(tmp_path, tiny):
    """Issue 19: while a new run prepared its data, `status` said `not started (see train.log) (not running)`
    (or `no run named`) though the process was alive and tokenizing."""
    gate = tmp_path / "gate"
    proc = Proc(
        ["train", "--run", "p", "--headless", "--runs-dir", "runs", *sets(tiny())],
        tmp_path,
        inject=GATED_PREPARATION,
        env={GATE_ENV: str(gate)},
    )
    try:
        # (before the process serves its channel - its first second - there is nothing to find)
        wait_for(lambda: json_status(tmp_path, "p").get("preparing"), TIMEOUT, "preparing")
        said = status(tmp_path, "p")[0]
        assert said == f"p  preparing data: tokenizing 30%  pid {proc.pid}", said
        _, record = status(tmp_path, "p")
        assert record["live"] is True and record["state"] == "Starting" and record["pid"] == proc.pid
        assert record["preparing"] == {"stage": "tokenizing", "done": 3, "total": 10}
        assert not (tmp_path / "runs" / "p" / "run.json").exists()  # still before the run is written
        paused = cli("pause", "p", "--runs-dir", "runs", cwd=tmp_path)
        assert paused.returncode == 1
        said = f"cannot pause p yet: it is preparing data: tokenizing 30% (pid {proc.pid}); try again"
        assert paused.stderr == f"tui-trainer: error: {said}\n", paused.stderr
        gate.touch()
        assert proc.wait(TIMEOUT) == 0, proc.stderr
    finally:
        gate.touch()
        proc.kill()
    line, record = status(tmp_path, "p")
    assert line.startswith("p  finished (not running)  step 12/12"), line


@pytest.mark.slow
def test_live_status_after_a_resume_reports_the_checkpoints_and_eval_on_disk(tmp_path, tiny):
    """Issue 19: after `resume`, a live `status` said `last checkpoint –` and `"eval_loss": null` while the
    checkpoint it resumed from and an earlier eval were on disk. They stand until the process makes newer
    ones."""
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(train__max_steps=40, train__eval_every=5, checkpoint__every_steps=4))
    assert Trainer(store, plan_train(store, config, "r"), until_step=8).run() == State.PAUSED

    def eval_at(step: int) -> float:
        return next(r["eval_loss"] for r in store.metrics("r") if r.get("step") == step and "eval_loss" in r)

    gate = tmp_path / "gate"
    proc = Proc(
        ["resume", "r", "--headless", "--runs-dir", "runs"],
        tmp_path,
        faults_from="faults_support:gated_steps",
        env={GATE_ENV: str(gate), GATE_STEPS_ENV: "9,13"},  # held after step 9, then after 13
    )
    try:
        wait_for(lambda: json_status(tmp_path, "r").get("state") == "Running", TIMEOUT, "the resume")
        line, record = status(tmp_path, "r")
        assert record["live"] is True and record["step"] == 8
        assert record["last_checkpoint"] == {"step": 8, "path": "runs/r/checkpoints/step-00000008"}, record
        assert record["eval_loss"] == eval_at(5), record
        assert line.startswith("r  Running  step 8/40  loss ") and "last checkpoint 8" in line, line
        assert record["loss"] == store.run("r").newest.loss
        assert f"eval {eval_at(5):.3f}" in line, line

        # once the process saved (12) and evaluated (10) itself, its own are reported
        Path(f"{gate}-9").touch()
        wait_for(lambda: json_status(tmp_path, "r")["step"] >= 12, TIMEOUT, "step 12")
        line, record = status(tmp_path, "r")
        assert record["live"] is True and record["last_checkpoint"]["step"] == 12, record
        assert record["eval_loss"] == eval_at(10), record
        assert "last checkpoint 12" in line, line
        Path(f"{gate}-13").touch()
        assert proc.wait(TIMEOUT) == 0, proc.stderr
    finally:
        Path(f"{gate}-9").touch()
        Path(f"{gate}-13").touch()
        proc.kill()
    line, record = status(tmp_path, "r")
    assert record["live"] is False and record["state"] == "finished" and record["eval_loss"] == eval_at(40)
