"""Two-way with the Hugging Face Trainer: our checkpoints resume under transformers.Trainer, an HF output dir
is a (read-only) run of the store that branches into ours, and TuiTrainerCallback puts a live HF run on our
control channel. Real training on a tiny GPT-2 on the CPU throughout."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from support import procs
from support.files import tree_digest
from support.waiting import wait_for

from tui_trainer.cli import control as commands
from tui_trainer.cli import main as cli
from tui_trainer.control.live import disk_status, live_runs
from tui_trainer.core.config import load_config
from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_branch, plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
)


def hf_args(output_dir: Path, **extra) -> TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "weight_decay": 0.1,
        "adam_beta2": 0.95,
        "logging_steps": 1,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 1337,
        **extra,
    }
    return TrainingArguments(**settings)


def blocks_dataset(blocks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": b, "labels": b} for b in blocks]


class Seen(TrainerCallback):
    """What the HF Trainer holds once it has loaded a checkpoint (on_train_begin comes after the load)."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.step = state.global_step
        self.group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        # every parameter's first moment, in the optimizer's order (its decay group, then the no-decay one)
        self.exp_avgs = [optimizer.state[p]["exp_avg"].clone() for g in optimizer.param_groups for p in g["params"]]
        self.scheduler = lr_scheduler
        self.last_epoch = lr_scheduler.last_epoch


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_our_checkpoint_resumes_under_the_hf_trainer(tmp_path: Path, small_corpus: Path, arch: str) -> None:
    """For GPT-2 and a Llama: HF's Trainer loads our optimizer.pt into its own AdamW parameter for parameter
    (the same decay split, in its order), our schedule and step, and carries on."""
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny_overrides(small_corpus, model__arch=arch, train__max_steps=4, train__eval_every=2))
    assert Trainer(store, plan_train(store, config, "ours")).run() == State.FINISHED
    ckpt = store.checkpoint_dir("ours", 4)
    ours = torch.load(ckpt / "optimizer.pt", weights_only=True)
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"tui_trainer_state.json", "trainer_state.json", "rng_state.pth", "rng.pt"} <= set(listed)

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    assert model.config.model_type == arch
    seen = Seen()
    data = blocks_dataset(
        torch.randint(0, model.config.vocab_size, (32, 32), generator=torch.Generator().manual_seed(0))
    )
    trainer = transformers.Trainer(
        model=model, args=hf_args(tmp_path / "hf", max_steps=6), train_dataset=data, callbacks=[seen]
    )
    trainer.train(resume_from_checkpoint=str(ckpt))

    assert seen.step == 4  # HF's global_step starts at ours
    assert seen.group_sizes == [len(g["params"]) for g in ours["param_groups"]]
    assert len(seen.exp_avgs) == len(ours["state"])
    for i, exp_avg in enumerate(seen.exp_avgs):  # its AdamW holds our moments, same order
        assert torch.equal(exp_avg, ours["state"][i]["exp_avg"]), i
    assert isinstance(seen.scheduler, torch.optim.lr_scheduler.LambdaLR) and seen.last_epoch == 4
    assert trainer.state.global_step == 6 and seen.scheduler.last_epoch == 6  # loaded at 4, stepped twice
    # the run's curve travels in HF's log_history, evals included
    hf_state = transformers.TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert [e["step"] for e in hf_state.log_history if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in hf_state.log_history if "eval_loss" in e] == [2, 4]


def test_rng_state_pth_loads_without_unpickling_code(tmp_path: Path, small_corpus: Path) -> None:
    from transformers.trainer_pt_utils import safe_globals

    from tui_trainer.engine.hf_state import load_hf_rng

    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny_overrides(small_corpus, train__max_steps=3, train__eval_every=0))
    Trainer(store, plan_train(store, config, "r")).run()  # saves at its last step, 3
    path = store.checkpoint_dir("r", 3) / "rng_state.pth"
    with safe_globals():  # HF's own allow-list, as its _load_rng_state uses it
        state = torch.load(path, weights_only=True)
    assert set(state) >= {"python", "numpy", "cpu"}
    assert torch.equal(load_hf_rng(path)["cpu"], state["cpu"])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # nothing is allow-listed globally: numpy stays refused elsewhere


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, small_corpus):
    """A real HF Trainer output dir in a runs dir: a tiny GPT-2 on our tokenizer and blocks, checkpoints at 3, 6."""
    from tui_trainer.engine.data import prepare_data
    from tui_trainer.engine.tokenizer import padded_vocab

    root = tmp_path_factory.mktemp("hf")
    config = load_config(None, tiny_overrides(small_corpus))
    data = prepare_data(config, None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=padded_vocab(len(data.tokenizer)), n_positions=32, n_embd=32, n_layer=1, n_head=2)
    )
    args = hf_args(root / "runs" / "hf", max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=blocks_dataset(data.train),
        processing_class=data.tokenizer,  # saved in each checkpoint: a branch tokenizes with it
        data_collator=transformers.default_data_collator,  # blocks are whole: nothing to pad
    )
    trainer.train()
    return RunStore(root / "runs"), tree_digest(root / "runs" / "hf")


def test_an_hf_output_dir_is_a_run_that_branches_into_ours(hf_run, small_corpus, capsys) -> None:
    store, before = hf_run
    assert cli(["ls", "--runs-dir", str(store.root)]) == 0
    listed = capsys.readouterr().out
    assert "hf  [hf trainer]  2 checkpoints" in listed
    assert "step       3" in listed and "step       6" in listed and "no manifest (HF Trainer)" in listed
    assert cli(["verify", "hf@3", "--runs-dir", str(store.root)]) == 0
    assert "no manifest" in capsys.readouterr().out

    hf_losses = {r["step"]: r["loss"] for r in store.metrics("hf") if "loss" in r}
    assert sorted(hf_losses) == [1, 2, 3, 4, 5, 6]
    overrides = tiny_overrides(small_corpus, train__max_steps=5, train__eval_every=0, optim__lr=1e-2)
    overrides = [o for o in overrides if not o.startswith("model.")]  # the shape comes from HF's config.json
    plan = plan_branch(store, "hf@3", "mine", overrides)
    events: list = []
    assert Trainer(store, plan, events.append).run() == State.FINISHED
    notices = " ".join(e.message for e in events if isinstance(e, Notice))
    assert "cannot continue exactly across frameworks" in notices

    mine = {r["step"]: r["loss"] for r in store.metrics("mine") if "loss" in r}
    assert sorted(mine) == [4, 5]
    # step 4 goes on from HF's weights: as close to HF's own step 4 as one step's noise, far below a fresh start
    noise = max(abs(hf_losses[s + 1] - hf_losses[s]) for s in range(1, 6))
    assert abs(mine[4] - hf_losses[4]) <= noise
    assert mine[4] < hf_losses[1] - noise  # HF's first loss is a fresh start's
    # HF's AdamW moments and schedule came along: 3 of its steps + 2 of ours
    optimizer = torch.load(store.checkpoint_dir("mine", 5) / "optimizer.pt", weights_only=True)
    assert int(optimizer["state"][0]["step"]) == 5
    assert torch.load(store.checkpoint_dir("mine", 5) / "scheduler.pt", weights_only=True)["last_epoch"] == 5
    assert [seg for seg, _ in store.history("mine")] == ["hf", "mine"]  # the curve runs through HF's
    assert tree_digest(store.root / "hf") == before  # nothing in the HF folder was touched


def live_hf_trainer(runs: Path, **callback_options):  # -> (transformers.Trainer, TuiTrainerCallback)
    """A tiny HF Trainer set for 100k steps, recorded as run "live" through the callback (not started)."""
    from tui_trainer.integrations.hf import TuiTrainerCallback

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    data = blocks_dataset(torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0)))
    callback = TuiTrainerCallback(**callback_options)
    trainer = transformers.Trainer(
        model=model, args=hf_args(runs / "live", max_steps=100_000), train_dataset=data, callbacks=[callback]
    )
    return trainer, callback


def test_a_pause_can_return_from_train_instead(tmp_path: Path, capsys) -> None:
    """exit_on_pause=False (a notebook, a script that handles it): train() returns, callback.paused says why."""
    runs = tmp_path / "runs"
    trainer, callback = live_hf_trainer(runs, exit_on_pause=False)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (trainer.train(), done.set()), daemon=True)
    worker.start()
    store = RunStore(runs)
    try:
        wait_for(lambda: any("loss" in r for r in store.metrics("live")), 30, "a logged loss")
        assert commands.pause(store, "live", as_json=False) == 0
    finally:
        callback.stop()  # never leave a 100k-step run behind a failed assert
        worker.join(timeout=60)
    assert done.is_set() and callback.paused  # train() returned
    printed = capsys.readouterr().out
    step = trainer.state.global_step
    assert f"paused live at step {step}:" in printed
    assert (runs / "live" / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert store.read_record("live")["status"] == "paused"
    assert [c.step for c in store.run("live").checkpoints] == [step]


def test_the_callback_saves_on_request_and_trains_on(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    trainer, callback = live_hf_trainer(runs)
    worker = threading.Thread(target=trainer.train, daemon=True)
    worker.start()
    store = RunStore(runs)
    try:
        wait_for(lambda: any("loss" in r for r in store.metrics("live")), 30, "a logged loss")
        assert commands.save(store, "live", as_json=False) == 0
        assert worker.is_alive()  # saved, and still training
    finally:
        callback.stop()
        worker.join(timeout=60)
    saved = int(capsys.readouterr().out.split(" at step ")[1].split(":")[0])
    assert (runs / "live" / f"checkpoint-{saved}" / "model.safetensors").is_file()
    assert store.read_record("live")["status"] == "stopped"
    assert [c.step for c in store.run("live").checkpoints] == [saved]  # a stop saves nothing more


async def test_the_app_shows_an_hf_run_with_its_curve(hf_run) -> None:
    from support.app import fixed_clock, fixed_probe, plot_ready

    from tui_trainer.tui.app import TrainerApp
    from tui_trainer.tui.widgets.run_tree import NodeRef

    store, before = hf_run
    app = TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True)  # type: ignore[arg-type]
    async with app.run_test(size=(120, 40)) as pilot:
        tree = app.main.runs_tree
        assert tree.select_ref(NodeRef("hf"))
        await plot_ready(pilot)
        curves = app.main.plot.curves
        assert curves is not None and curves.run == "hf"
        assert tree.select_ref(NodeRef("hf", 3))
        await pilot.pause()
        details = str(app.main.query_one("#details").content)
        assert "no manifest" in details and "invalid" not in details
        await pilot.press("x")  # pinning would write run.json into the HF folder: refused with a word
        await pilot.pause()
        assert not store.run("hf").checkpoints[0].pinned
        # the branch dialog starts from the HF run's own settings and names what it did not record
        await pilot.press("b")
        await pilot.pause()
        dialog = app.screen
        assert dialog.query_one("#lr").value == "0.01" and dialog.query_one("#batch_size").value == "4"
        assert "did not record" in str(dialog.query_one("#branch-error").content)
        await pilot.press("escape")
    assert tree_digest(store.root / "hf") == before


def test_samples_come_from_an_hf_checkpoint(hf_run) -> None:
    from tui_trainer.engine.generate import generate_text

    store, before = hf_run
    text = generate_text(store.checkpoint("hf", 6).path, prompt="ROMEO:", max_new_tokens=8)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert tree_digest(store.root / "hf") == before


# ---------------------------------------------------------------- the bridge as example scripts use it
# tests/support/hf_script.py is run_clm.py's shape made tiny: HfArgumentParser, processing_class=tokenizer,
# HF's default cadence (logging_steps=500, save_strategy="steps"), save_model and metrics after train().


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, small_corpus) -> Path:
    """Our BPE of the small corpus, saved as a tokenizer dir a script loads with AutoTokenizer."""
    from tui_trainer.engine.data import prepare_data

    path = tmp_path_factory.mktemp("tokenizer")
    prepare_data(load_config(None, tiny_overrides(small_corpus)), None).tokenizer.save_pretrained(path)
    return path


def script_argv(tokenizer: Path, corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    base = ["--tokenizer_name", str(tokenizer), "--train_file", str(corpus), "--output_dir", str(output_dir)]
    return [*base, "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
            "--save_steps", "3", *extra]  # fmt: skip


def run_script(*argv: str, callbacks=None):  # -> transformers.Trainer
    from support.hf_script import main

    return main(list(argv), callbacks)


class LrSeen(TrainerCallback):
    """The lr each optimizer step runs at (read as the step begins)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]


def ours_at_step_4(tmp_path: Path, small_corpus: Path) -> Path:
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny_overrides(small_corpus, train__max_steps=4, train__eval_every=0))
    assert Trainer(store, plan_train(store, config, "ours")).run() == State.FINISHED
    return store.checkpoint_dir("ours", 4)


def test_a_script_resuming_our_checkpoint_keeps_saving(tmp_path: Path, small_corpus: Path) -> None:
    """Issue 21 (1): HF's _save_checkpoint updates stateful_callbacks["TrainerControl"] in place. Without the
    callback (README): the first resumed step runs at the lr our optimizer.pt holds, then the script's own
    schedule (not ours scaled by HF's); saves follow our trainer_state.json's save_steps (4), as HF rules."""
    ckpt = ours_at_step_4(tmp_path, small_corpus)
    ours = torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"][0]["lr"]
    out = tmp_path / "hf"
    seen = LrSeen()
    trainer = run_script(
        *script_argv(ckpt, small_corpus, out, "--model_name_or_path", str(ckpt), "--max_steps", "8"),
        "--learning_rate", "4e-5", "--resume_from_checkpoint", str(ckpt), callbacks=[seen],
    )  # fmt: skip
    assert trainer.state.global_step == 8
    saved = transformers.TrainerState.load_from_json(str(out / "checkpoint-8" / "trainer_state.json"))
    assert saved.global_step == 8 and "TrainerControl" in saved.stateful_callbacks
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-8"]
    assert (out / "model.safetensors").is_file()  # the script ran to its end
    assert seen.lrs == pytest.approx({5: ours, **{s: 4e-5 * (8 - (s - 1)) / 8 for s in range(6, 9)}}, rel=1e-6)


def test_a_script_resuming_ours_follows_its_own_schedule_and_cadence(tmp_path: Path, small_corpus: Path) -> None:
    """Issue 21 (6): with the callback, the first resumed step already runs at the script's lr (HF's linear
    decay of 4e-5 over 9 steps), and the script's save_steps (3) and logging_steps (500) rule, not ours
    (a save every 4 steps, a log every step)."""
    ckpt = ours_at_step_4(tmp_path, small_corpus)
    # as our checkpoints were written before: no TrainerControl entry (the callback adds it), and our peak lr
    # in scheduler.pt's base_lrs (the script's learning_rate replaces it)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["stateful_callbacks"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    scheduler = torch.load(ckpt / "scheduler.pt", weights_only=True)
    torch.save({**scheduler, "base_lrs": [1e-3, 1e-3]}, ckpt / "scheduler.pt")
    out = tmp_path / "runs" / "hf"
    seen = LrSeen()
    trainer = run_script(
        *script_argv(ckpt, small_corpus, out, "--model_name_or_path", str(ckpt), "--max_steps", "9"),
        "--learning_rate", "4e-5", "--resume_from_checkpoint", str(ckpt), "--tui", callbacks=[seen],
    )  # fmt: skip
    assert trainer.state.global_step == 9
    assert seen.lrs == pytest.approx({s: 4e-5 * (9 - (s - 1)) / 9 for s in range(5, 10)}, rel=1e-6)
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [6, 9]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e][-2:] == [6, 9]  # a log at each save only
    assert not [e for e in trainer.state.log_history if "loss" in e and e["step"] in (5, 7, 8)]


def test_a_callback_run_resumes_and_branches_here_with_its_own_settings(
    tmp_path: Path, small_corpus: Path, tokenizer_dir: Path
) -> None:
    """Issue 21 (2, 7): the run records the model's shape and the script's hyperparameters; resuming it
    here rebuilds that model (1 layer, 32 wide, not our 4 x 128) and trains at its lr and batch."""
    runs = tmp_path / "runs"
    run_script(*script_argv(tokenizer_dir, small_corpus, runs / "clm", "--max_steps", "6", "--tui"))
    store = RunStore(runs)
    recorded = store.read_record("clm")["config"]
    assert recorded["model"]["n_embd"] == 32 and recorded["optim"]["lr"] == 5e-5  # HF's default lr
    assert recorded["train"]["batch_size"] == 4 and recorded["checkpoint"]["every_steps"] == 3

    plan = plan_resume(store, "clm", [f"data.path={str(small_corpus)!r}", "train.max_steps=9"])
    assert plan.parent == ("clm", 6) and plan.run == "clm-from6"  # HF's folder is never trained in place
    assert (plan.config.model.n_layer, plan.config.model.n_embd, plan.config.model.block_size) == (1, 32, 32)
    assert (plan.config.optim.lr, plan.config.train.batch_size) == (5e-5, 4)
    assert not any("did not record" in n for n in plan.notes)  # everything but the data was recorded
    assert Trainer(store, plan).run() == State.FINISHED
    assert [c.step for c in store.run("clm-from6").checkpoints] == [9]  # saved on the HF run's cadence too
    lrs = {r["step"]: r["lr"] for r in store.metrics("clm-from6") if "lr" in r}
    assert 0 < lrs[7] <= 5e-5

    # a run recorded before the callback wrote settings (config {}): the shape still comes from config.json,
    # and the note names what is now unknown
    store.update_record("clm", config={})
    overrides = [f"data.path={str(small_corpus)!r}", "train.max_steps=9", "optim.warmup_steps=0"]
    plan = plan_branch(store, "clm@6", "old", overrides)
    assert (plan.config.model.n_layer, plan.config.model.n_embd) == (1, 32)
    note = next(n for n in plan.notes if "did not record" in n)
    assert "optim.lr" in note and "train.batch_size" in note and "optim.warmup_steps" not in note


def test_branching_an_hf_output_dir_takes_its_settings(hf_run, small_corpus) -> None:
    """Issue 21 (7): a plain output dir's batch size and max steps (trainer_state.json) and its peak lr
    (scheduler.pt, read without running any code); what it does not say is named in a note."""
    store, _ = hf_run
    plan = plan_branch(store, "hf@3", "settings", [f"data.path={str(small_corpus)!r}", "train.max_steps=10"])
    assert plan.config.optim.lr == pytest.approx(1e-2) and plan.config.train.batch_size == 4
    assert plan.config.checkpoint.every_steps == 3
    note = next(n for n in plan.notes if "did not record" in n)
    assert "optim.warmup_steps" in note and "train.grad_accum" in note and "data.path" not in note


def test_an_hf_run_of_another_family_branches_here_as_itself(
    tmp_path: Path, small_corpus, tokenizer_dir, capsys
) -> None:
    """Issue 21 (3): a Llama trained by the Trainer (with the callback) is asked for its family and shape
    (config.json) and continues here as that Llama, never as our default GPT-2 (a size-mismatch traceback)."""
    runs = tmp_path / "runs"
    out = runs / "llama"
    run_script(*script_argv(tokenizer_dir, small_corpus, out, "--model_type", "llama", "--max_steps", "3", "--tui"))
    store = RunStore(runs)
    assert store.read_record("llama")["config"]["model"]["arch"] == "llama"
    settings = ["--set", f"data.path={str(small_corpus)!r}", "--set", "train.max_steps=5", "--runs-dir", str(runs)]
    assert cli(["resume", "llama", "--headless", *settings]) == 0
    branch = store.run("llama-from3")
    assert branch.parent == ("llama", 3) and [c.step for c in branch.checkpoints] == [5]
    saved = json.loads((store.checkpoint_dir("llama-from3", 5) / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["hidden_size"] == 32
    assert branch.config["model"]["arch"] == "llama" and branch.config["optim"]["lr"] == 5e-5


def test_the_callback_counts_every_step_whatever_logging_steps_is(
    tmp_path: Path, small_corpus: Path, tokenizer_dir: Path, capsys
) -> None:
    """Issue 21 (4): logging_steps=500 on a 7-step run. The losses come from the model's forward on each
    step (the same accounting as HF's: reports at each save average exactly what HF logs there), tokens
    from the batches, and status / ls show the last step's loss; the output dir gains nothing unexpected."""
    from tui_trainer.integrations.hf import TuiTrainerCallback

    runs = tmp_path / "runs"
    out = runs / "clm"
    callback = TuiTrainerCallback(report_every_s=1e9)  # reports only where HF saves or stops
    trainer = run_script(*script_argv(tokenizer_dir, small_corpus, out, "--max_steps", "7"), callbacks=[callback])
    store = RunStore(runs)
    records = [r for r in store.metrics("clm") if "loss" in r]
    hf_logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(hf_logged) == [3, 6, 7]  # HF logged only because the callback asked, at each checkpoint
    assert {r["step"]: r["loss"] for r in records} == pytest.approx(hf_logged, rel=1e-5)
    assert all(r["tokens_per_s"] > 0 for r in records) and records[-1]["tokens"] == 7 * 4 * 16

    capsys.readouterr()  # what HF printed
    assert commands.status(store, "clm", as_json=True) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["step"]) == ("finished", 7) and status["loss"] == pytest.approx(hf_logged[7])
    assert cli(["ls", "--runs-dir", str(runs)]) == 0
    listed = capsys.readouterr().out
    assert "loss      –" not in listed and listed.count("no manifest (HF Trainer)") == 3
    assert store.read_record("clm")["hf_trainer"]["train_loss"] == pytest.approx(
        trainer.state.log_history[-1]["train_loss"]
    )
    ours = {"run.json", "metrics.jsonl", ".lock"}
    hf_files = {"config.json", "generation_config.json", "model.safetensors", "training_args.bin", "README.md",
                "tokenizer.json", "tokenizer_config.json", "train_results.json", "all_results.json",
                "trainer_state.json", "checkpoint-3", "checkpoint-6", "checkpoint-7"}  # fmt: skip
    assert set(os.listdir(out)) - hf_files == ours  # no empty checkpoints/ folder


def test_a_pause_ends_the_script_before_its_final_artifacts(tmp_path: Path, small_corpus, tokenizer_dir) -> None:
    """Issue 21 (5): the script in its own process; `tui-trainer pause` (the channel) saves a checkpoint,
    and the process then exits 0 without running what follows train(): no top-level model, metrics or
    model card claim a paused run finished. status reads paused, at that step, with its loss."""
    runs = tmp_path / "runs"
    out = runs / "clm"
    script = Path(__file__).parent / "support" / "hf_script.py"
    argv = script_argv(tokenizer_dir, small_corpus, out, "--max_steps", "100000", "--tui")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(Path(__file__).parent.parent)]),
    }
    log = tmp_path / "script.log"
    with log.open("w") as sink:
        proc = procs.popen([sys.executable, str(script), *argv], env=env, stdout=sink, stderr=subprocess.STDOUT)
    store = RunStore(runs)
    try:
        wait_for(lambda: live_runs(store).get("clm", {}).get("step", 0) > 3, 120, "the script training")
        assert commands.pause(store, "clm", as_json=False) == 0
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 0, err[-2000:]
    step = store.run("clm").newest.step
    assert f"tui-trainer: paused at step {step}" in err
    assert (out / f"checkpoint-{step}" / "model.safetensors").is_file()
    assert not {"model.safetensors", "all_results.json", "train_results.json", "README.md"} & set(os.listdir(out))
    status = disk_status(store, "clm")
    assert (status["state"], status["step"]) == ("paused", step) and status["loss"] is not None


def test_a_checkpoint_without_a_tokenizer_says_so_and_how_to_give_one(hf_run, small_corpus, tmp_path, capsys) -> None:
    """Issue 19: branching an HF checkpoint whose script passed no tokenizer said "data.path: ... is smaller
    than one block" about a 1 MB corpus (transformers builds an empty tokenizer from config.json)."""
    store, _ = hf_run
    runs = tmp_path / "runs"
    shutil.copytree(store.root, runs, symlinks=True)
    checkpoint = runs / "hf" / "checkpoint-3"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (checkpoint / name).unlink(missing_ok=True)
    data = f"data.path={str(small_corpus)!r}"
    args = ["branch", "hf@3", "--name", "untokenized", "--headless", "--set", data, "--runs-dir", str(runs)]
    assert cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert len(err) == 1, err  # (the notes before it name the settings the HF run did not record)
    assert err[0].startswith(f"tui-trainer: error: checkpoint: {checkpoint} has no tokenizer"), err
    assert f"tokenizer.save_pretrained('{checkpoint}')" in err[0] and "processing_class=tokenizer" in err[0]
    assert "smaller than one block" not in err[0]
    assert not (runs / "untokenized").exists()


def test_an_hf_schedulers_lr_is_read_without_running_code(tmp_path: Path) -> None:
    """scheduler.pt is a pickle in a zip: only plain values are read from it (its base_lrs, the HF run's peak
    lr); one that would call anything is ignored, and nothing in it runs."""
    import zipfile

    from tui_trainer.core.hf_runs import run_settings

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    for name, state in (("plain", {"base_lrs": [3e-4, 3e-4], "last_epoch": 7}), ("hostile", {"base_lrs": Payload()})):
        checkpoint = tmp_path / name / "checkpoint-7"
        checkpoint.mkdir(parents=True)
        with zipfile.ZipFile(checkpoint / "scheduler.pt", "w") as archive:
            archive.writestr("scheduler/data.pkl", pickle.dumps(state, protocol=2))
        settings = run_settings(checkpoint.parent, checkpoint)
        assert settings.get("optim", {}).get("lr") == (3e-4 if name == "plain" else None)
    assert not marker.exists()
