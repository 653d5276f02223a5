"""Numerical faults: a NaN/Inf loss (or NaN weights) pauses the run at that step with a message, no NaN
checkpoint is ever written, and a branch from the last good checkpoint with a lower lr trains on.
CUDA out-of-memory (injected: there is no GPU here) pauses with advice and resume still works."""

from __future__ import annotations

import io
import json
import math

import torch
from faults_support import install, losses, nth_forward, reference, sets, temp_dirs
from support.files import tree_digest

from tui_trainer.cli import _Progress, main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import Failed, State
from tui_trainer.core.plan import plan_branch, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.trainer import Trainer


def inject_into_forward(monkeypatch, at_call: int, effect) -> None:
    """From the `at_call`-th training forward on, `effect(output)` (may raise) replaces the output."""
    install(monkeypatch, nth_forward(at_call, effect))


def nan_loss(out):
    out.loss = out.loss * float("nan")  # real NaN gradients follow, and AdamW spreads them to every weight
    return out


def run(store, overrides, name="n", events=None, until_step=None) -> str:
    plan = plan_train(store, load_config(None, overrides), name)
    return Trainer(store, plan, events.append if events is not None else None, until_step=until_step).run()


def test_real_divergence_from_a_huge_lr_pauses_with_the_step(tmp_path, tiny):
    """No injection: lr=1e30 without clipping blows the model up for real. Config validation refuses such
    an lr (tests/test_config.py), so it is set on the validated plan: the engine must survive it anyway."""
    store = RunStore(tmp_path / "runs")
    overrides = tiny(optim__min_lr=0.0, optim__grad_clip=0.0, optim__warmup_steps=0, checkpoint__every_steps=1)
    plan = plan_train(store, load_config(None, overrides), "boom")
    plan.config.optim.lr = 1e30
    out = io.StringIO()
    assert Trainer(store, plan, _Progress(as_json=False, stream=out)).run() == State.PAUSED
    err = out.getvalue()
    assert "error at step 2: loss is nan at step 2; paused" in err and "Paused boom" in err, err
    assert "branch from it with a lower optim.lr" in err and "Traceback" not in err
    assert [c.step for c in store.run("boom").checkpoints] == [1]  # nothing saved from the NaN state
    assert store.read_record("boom")["status"] == "paused"
    # the diverged step is on record as standard JSON: a null loss plus what it was
    lines = store.metrics_path("boom").read_text().splitlines()
    # (its grad norm too: the loss check still names the fault, above)
    assert [json.loads(line, parse_constant=reject) for line in lines][-1]["nonfinite"] == {
        "loss": "nan",
        "grad_norm": "nan",
    }
    assert losses(store, "boom") == {1: losses(store, "boom")[1], 2: None}


def reject(constant: str) -> None:
    raise AssertionError(f"{constant} is not standard JSON")


def test_nan_loss_pauses_keeps_the_last_good_checkpoint_and_a_lower_lr_branch_trains(tmp_path, tiny, monkeypatch):
    store = RunStore(tmp_path / "runs")
    overrides = tiny()
    expected = reference(overrides)[0]  # before any injection
    inject_into_forward(monkeypatch, at_call=6, effect=nan_loss)
    events: list = []
    assert run(store, overrides, "n", events) == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "nan" and failed[0].step == 6
    assert failed[0].last_good == "n@4"
    assert "loss is nan at step 6" in failed[0].message and "last good checkpoint (step 4) is kept" in failed[0].message
    assert [c.step for c in store.run("n").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("n", 4))
    assert temp_dirs(store, "n") == []
    # step 6 diverged: recorded as a gap (null loss), the good steps exactly as without the fault
    assert losses(store, "n") == {**{s: v for s, v in expected.items() if s <= 5}, 6: None}
    monkeypatch.undo()

    # the person branches from the last good checkpoint with a lower lr: it trains, finite, from step 4
    parent = tree_digest(store.run_dir("n"))
    plan = plan_branch(store, "n@4", "n-lowlr", ["optim.lr=0.0005", "optim.min_lr=0.00005"])
    assert Trainer(store, plan, until_step=8).run() == State.PAUSED
    branch = losses(store, "n-lowlr")
    assert sorted(branch) == [5, 6, 7, 8] and all(math.isfinite(v) for v in branch.values())
    assert store.read_record("n-lowlr")["parent"] == {"run": "n", "step": 4}
    assert store.read_record("n-lowlr")["config"]["optim"]["lr"] == 0.0005
    assert tree_digest(store.run_dir("n")) == parent


def test_nan_between_logged_steps_is_never_checkpointed(tmp_path, tiny, monkeypatch):
    """log_every=5: the NaN of step 7 is not logged before the step-8 checkpoint is due. It must not land."""
    store = RunStore(tmp_path / "runs")
    inject_into_forward(monkeypatch, at_call=7, effect=nan_loss)
    events: list = []
    assert run(store, tiny(train__log_every=5), "w", events) == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "nan" and "loss is nan at or before step 8" in failed[0].message
    assert [c.step for c in store.run("w").checkpoints] == [4]
    assert temp_dirs(store, "w") == []


def test_nan_weights_behind_a_finite_loss_are_never_checkpointed(tmp_path, tiny, monkeypatch):
    """The update of step 4 poisons a weight; step 4's loss (computed before it) is finite."""

    def poison(step, model):
        if step == 4:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")

    install(monkeypatch, Hooks(after_optimizer_step=poison))
    store = RunStore(tmp_path / "runs")
    events: list = []
    assert run(store, tiny(), "i", events) == State.PAUSED
    failed = [e for e in events if isinstance(e, Failed)]
    assert len(failed) == 1 and failed[0].kind == "nan"
    assert "the weights hold NaN or Inf after step 4" in failed[0].message
    assert store.run("i").checkpoints == [] and temp_dirs(store, "i") == []


def test_out_of_memory_pauses_with_advice_and_resume_is_exact(tmp_path, tiny, monkeypatch, capsys):
    def oom(out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    inject_into_forward(monkeypatch, at_call=7, effect=oom)
    runs = tmp_path / "runs"
    overrides = tiny()
    assert main(["train", "--run", "o", "--headless", "--runs-dir", str(runs), *sets(overrides)]) == 1
    err = capsys.readouterr().err
    assert "error at step 6: out of memory at step 7: lower train.batch_size and raise train.grad_accum" in err, err
    assert "train.precision=bf16" in err and "train.grad_checkpointing=true" in err
    assert "resume the last checkpoint (step 4)" in err and "Traceback" not in err
    store = RunStore(runs)
    assert store.read_record("o")["status"] == "paused"
    assert [c.step for c in store.run("o").checkpoints] == [4]
    verify_checkpoint(store.checkpoint_dir("o", 4))
    monkeypatch.undo()
    assert main(["resume", "o", "--headless", "--runs-dir", str(runs)]) == 0
    assert losses(store, "o") == reference(overrides)[0]


def test_a_branch_that_diverges_before_its_first_checkpoint_resumes_from_its_parent(tmp_path, tiny, capsys):
    """The branch has no checkpoint of its own: the fault names the parent's as the last good one, and
    `resume` restarts the branch in place from it — the parent's weights, not a random init."""
    runs = tmp_path / "runs"
    overrides = tiny(train__max_steps=40, optim__warmup_steps=0)
    args = ["train", "--run", "p", "--headless", "--until-step", "4", "--runs-dir", str(runs), *sets(overrides)]
    assert main(args) == 0
    store = RunStore(runs)
    boom = ["optim.min_lr=0.0", "optim.grad_clip=0.0"]
    hot = plan_branch(store, "p@4", "hot", boom)
    hot.config.optim.lr = 1e30  # config validation refuses such an lr: set past it so the branch really diverges
    events: list = []
    assert Trainer(store, hot, events.append).run() == State.PAUSED
    failure = next(e for e in events if isinstance(e, Failed))
    assert "the last good checkpoint (p@4, where this branch started) is kept" in failure.message, failure
    assert store.run("hot").checkpoints == []

    calm = ["optim.lr=0.001", "optim.min_lr=0.0001", "optim.grad_clip=1.0"]
    args = ["resume", "hot", "--headless", "--until-step", "6", "--runs-dir", str(runs), *sets(calm)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "restarting it from p@4" in err and "from step 0" not in err, err
    assert [c.step for c in store.run("hot").checkpoints] == [6]
    assert store.read_record("hot")["config"]["optim"]["lr"] == 0.001  # the settings it now trains with
    # the same steps as a fresh branch of p@4 with those settings: the parent's weights and data position
    plan = plan_branch(store, "p@4", "ref", calm)
    assert Trainer(store, plan, until_step=6).run() == State.PAUSED
    assert losses(store, "hot") == losses(store, "ref")
    assert sorted(losses(store, "hot")) == [5, 6]
