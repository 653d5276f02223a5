"""The headless engine end to end on a tiny model: exact resume, HF-loadable checkpoints, branching."""

from __future__ import annotations

import pytest
from support.files import tree_digest

from tui_trainer.core.config import Config, load_config
from tui_trainer.core.events import CheckpointSaved, State, StepLogged
from tui_trainer.core.plan import plan_branch, plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.step_window import SteadyStepTime
from tui_trainer.engine.trainer import Trainer


def train(store: RunStore, plan, until_step=None, events=None) -> str:
    return Trainer(store, plan, events.append if events is not None else None, until_step=until_step).run()


def losses(store: RunStore, run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in store.metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """Run `a` to 12 steps uninterrupted; run `b` paused at 5 then resumed to 12. grad_accum=2, dropout on."""
    from conftest import tiny_overrides

    store = RunStore(tmp_path_factory.mktemp("runs"))
    config = load_config(None, tiny_overrides(small_corpus, train__grad_accum=2, model__dropout=0.2))
    events_a: list = []
    assert train(store, plan_train(store, config, "a"), events=events_a) == State.FINISHED
    assert train(store, plan_train(store, config, "b"), until_step=5) == State.PAUSED
    paused_at = [c.step for c in store.run("b").checkpoints]
    assert train(store, plan_resume(store, "b")) == State.FINISHED
    return store, events_a, paused_at


def test_paused_and_resumed_run_matches_uninterrupted_bit_for_bit(trained):
    store, _, paused_at = trained
    assert 5 in paused_at, "pausing at step 5 must leave a checkpoint at step 5"
    a, b = losses(store, "a"), losses(store, "b")
    assert sorted(a) == list(range(1, 13))
    assert a == b  # exact float equality, every step


def test_resume_continues_the_same_run_when_resuming_its_newest_checkpoint(trained):
    store, _, _ = trained
    record = store.read_record("b")
    assert record["parent"] is None and record["status"] == "finished"
    assert [r.name for r in store.runs()] == ["a", "b"]


def test_events_report_steps_and_checkpoints(trained):
    _, events, _ = trained
    steps = [e.step for e in events if isinstance(e, StepLogged)]
    assert steps == list(range(1, 13))
    saved = [e.step for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [4, 8, 12]


def test_checkpoint_dir_loads_with_transformers_and_generates(trained):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    store, _, _ = trained
    ckpt = store.checkpoint("a", None).path
    model = GPT2LMHeadModel.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(out[0]), str)


def test_generate_text_from_a_checkpoint(trained):
    from tui_trainer.engine.generate import generate_text

    store, _, _ = trained
    text = generate_text(store.checkpoint("a", None).path, "ROMEO:", max_new_tokens=10, seed=1)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert text == generate_text(store.checkpoint("a", None).path, "ROMEO:", max_new_tokens=10, seed=1)


def test_resuming_an_older_checkpoint_branches_and_leaves_the_run_untouched(trained):
    store, _, _ = trained
    before = tree_digest(store.run_dir("a"))
    plan = plan_resume(store, "a@4")
    assert plan.new_run and plan.parent == ("a", 4) and plan.run != "a"
    assert train(store, plan, until_step=6) == State.PAUSED
    assert tree_digest(store.run_dir("a")) == before
    record = store.read_record(plan.run)
    assert record["parent"] == {"run": "a", "step": 4}
    # the branch continues exactly where `a` was at step 4
    assert losses(store, plan.run) == {s: v for s, v in losses(store, "a").items() if s in (5, 6)}
    # and its curve is drawn over the parent's history up to the branch point
    segments = store.history(plan.run)
    assert [run for run, _ in segments] == ["a", plan.run]
    assert max(r["step"] for r in segments[0][1]) == 4


def test_branch_with_changed_lr_uses_the_new_lr(trained):
    store, _, _ = trained
    plan = plan_branch(store, "a@8", "a-hot", ["optim.lr=0.01", "optim.min_lr=0.001"])
    assert train(store, plan, until_step=9) == State.PAUSED
    assert store.read_record("a-hot")["config"]["optim"]["lr"] == 0.01
    lr = [r["lr"] for r in store.metrics("a-hot") if "lr" in r]
    lr_parent = [r["lr"] for r in store.metrics("a") if r["step"] == 9]
    assert lr[0] > lr_parent[0]


def test_resume_of_a_paused_run_supersedes_lines_logged_after_its_checkpoint(tmp_path, tiny):
    """Steps logged after the last checkpoint (lost to a crash) are replaced, not duplicated."""
    store = RunStore(tmp_path)
    config = load_config(None, tiny(checkpoint__every_steps=4))
    assert train(store, plan_train(store, config, "c"), until_step=4) == State.PAUSED
    # pretend the process trained steps 5-6 after the checkpoint and died before saving
    with open(store.metrics_path("c"), "a") as fh:
        fh.write('{"step": 5, "loss": 99.0}\n{"step": 6, "loss": 99.0}\n{"step": 7, "lo')
    assert train(store, plan_resume(store, "c"), until_step=6) == State.PAUSED
    steps = [r["step"] for r in store.metrics("c") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 99.0 for r in store.metrics("c") if "loss" in r)


def test_async_and_sync_checkpoints_hold_identical_weights(tmp_path, tiny):
    from safetensors.torch import load_file

    store = RunStore(tmp_path)
    for name, flag in (("async", "true"), ("sync", "false")):
        config = load_config(None, [*tiny(), f"checkpoint.async_save={flag}"])
        assert train(store, plan_train(store, config, name), until_step=8) == State.PAUSED
    for step in (4, 8):
        a = load_file(str(store.checkpoint_dir("async", step) / "model.safetensors"))
        s = load_file(str(store.checkpoint_dir("sync", step) / "model.safetensors"))
        assert a.keys() == s.keys() and all((a[k] == s[k]).all() for k in a)


def test_keep_last_prunes_old_checkpoints_during_training(tmp_path, tiny):
    store = RunStore(tmp_path)
    config = load_config(None, tiny(checkpoint__every_steps=2, checkpoint__keep_last=2, train__eval_every=0))
    assert train(store, plan_train(store, config, "r")) == State.FINISHED
    steps = [c.step for c in store.run("r").checkpoints]
    best = store.run("r").best
    assert steps[-2:] == [10, 12]
    assert set(steps) <= {10, 12, best.step}


def test_checkpoint_events_report_how_long_training_stalled(tmp_path, tiny):
    """A sync save stalls the loop for the whole write; an async one only for the copy to CPU."""
    store = RunStore(tmp_path)
    stalls = {}
    for name, flag in (("async", "true"), ("sync", "false")):
        events: list = []
        config = load_config(None, [*tiny(), f"checkpoint.async_save={flag}"])
        train(store, plan_train(store, config, name), until_step=8, events=events)
        stalls[name] = [e for e in events if isinstance(e, CheckpointSaved)]
    sync_first = stalls["sync"][0]
    assert sync_first.stall_s >= sync_first.seconds > 0  # not the previous save's value, not zero
    async_first = stalls["async"][0]
    assert 0 < async_first.stall_s < async_first.seconds


def test_a_checkpoint_shows_only_an_eval_measured_on_its_own_weights(tmp_path, tiny):
    """eval every 5, save every 4: step 8 must not carry step 5's eval, nor a branch its parent's."""
    store = RunStore(tmp_path)
    config = load_config(None, tiny(train__eval_every=5, checkpoint__every_steps=4))
    assert train(store, plan_train(store, config, "r"), until_step=10) == State.PAUSED
    measured = {r["step"]: r["eval_loss"] for r in store.metrics("r") if "eval_loss" in r}
    assert sorted(measured) == [5, 10]
    run = store.run("r")
    assert {c.step: c.eval_loss for c in run.checkpoints} == {4: None, 8: None, 10: measured[10]}
    assert run.best is not None and run.best.step == 10

    # a branch from r@10 inherits r's last eval in trainer_state; its own checkpoint at 12 has none
    assert train(store, plan_branch(store, "r@10", "b", ["optim.lr=0.0005"]), until_step=12) == State.PAUSED
    branch = store.run("b")
    assert [(c.step, c.eval_loss) for c in branch.checkpoints] == [(12, None)]
    assert branch.best is None  # no eval measured anywhere in the run: no ◆


def test_the_eta_follows_a_smoothed_step_time():
    """One slow step (a save, a busy machine) must not swing the ETA; a lasting change moves it; the first
    logged window (the slow first step) never seeds it."""
    eta = SteadyStepTime()
    assert eta.update(5.0, 1) == 5.0  # the first window: all there is so far
    for _ in range(100):
        steady = eta.update(0.1, 1)
    assert abs(steady - 0.1) < 1e-9  # the slow first step left no trace
    assert eta.update(1.0, 1) < 0.12  # a 10x slower step moves it by under 20%
    for _ in range(200):
        slow = eta.update(0.3, 1)
    assert abs(slow - 0.3) < 0.01


def test_every_logged_lr_is_exactly_the_schedules(trained):
    """The torch scheduler drives the lr; it must be core/schedule.py lr_at to the last bit (exact resume)."""
    from tui_trainer.core.schedule import lr_at

    store, events, _ = trained
    config = Config.from_dict(store.read_record("a")["config"])
    logged = {e.step: e.lr for e in events if isinstance(e, StepLogged)}
    assert logged == {s: lr_at(s - 1, config.optim, config.train.max_steps) for s in range(1, 13)}
    resumed = {r["step"]: r["lr"] for r in store.metrics("b") if "lr" in r}
    assert resumed == {s: lr_at(s - 1, config.optim, config.train.max_steps) for s in range(1, 13)}


def test_scheduler_pt_is_the_schedulers_state_and_an_old_one_still_resumes(trained, tmp_path):
    """scheduler.pt holds the scheduler's state_dict at the checkpoint's step; a checkpoint from before
    (scheduler.pt = {"step", "lr"}) resumes to the same losses."""
    import shutil

    import torch

    store, _, _ = trained
    state = torch.load(store.checkpoint_dir("a", 4) / "scheduler.pt", weights_only=True)
    assert state["last_epoch"] == 4
    old = RunStore(tmp_path / "runs")
    shutil.copytree(store.run_dir("b"), old.run_dir("b"))
    ckpt = old.checkpoint_dir("b", 5)
    torch.save({"step": 5, "lr": 0.0}, ckpt / "scheduler.pt")
    from tui_trainer.core.store import read_manifest, write_manifest

    meta = {k: v for k, v in read_manifest(ckpt).items() if k not in ("files", "format")}
    write_manifest(ckpt, meta)  # re-record the checksums as the old checkpoint had them
    for later in (8, 12):
        shutil.rmtree(old.checkpoint_dir("b", later))
    assert train(old, plan_resume(old, "b@5", [])) == State.FINISHED
    assert losses(old, "b") == losses(store, "a")
