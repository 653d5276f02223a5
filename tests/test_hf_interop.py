"""Two-way with the Hugging Face Trainer: our checkpoints resume under transformers.Trainer, an HF output dir
is a (read-only) run of the store that branches into ours, and TuiTrainerCallback puts a live HF run on our
control channel. Real training on a tiny GPT-2 on the CPU throughout."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from support.files import tree_digest
from support.waiting import wait_for

from tui_trainer.cli import main as cli
from tui_trainer.control import commands
from tui_trainer.core.config import load_config
from tui_trainer.core.events import Notice, State
from tui_trainer.core.plan import plan_branch, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.trainer import Trainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402


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
        first = optimizer.param_groups[0]["params"][0]
        self.step = state.global_step
        self.exp_avg = optimizer.state[first]["exp_avg"].clone()
        self.scheduler = lr_scheduler
        self.last_epoch = lr_scheduler.last_epoch


def test_our_checkpoint_resumes_under_the_hf_trainer(tmp_path: Path, small_corpus: Path) -> None:
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny_overrides(small_corpus, train__max_steps=4, train__eval_every=2))
    assert Trainer(store, plan_train(store, config, "ours")).run() == State.FINISHED
    ckpt = store.checkpoint_dir("ours", 4)
    ours = torch.load(ckpt / "optimizer.pt", weights_only=True)
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"tui_trainer_state.json", "trainer_state.json", "rng_state.pth", "rng.pt"} <= set(listed)

    model = GPT2LMHeadModel(GPT2Config.from_pretrained(ckpt))
    seen = Seen()
    data = blocks_dataset(
        torch.randint(0, model.config.vocab_size, (32, 32), generator=torch.Generator().manual_seed(0))
    )
    trainer = transformers.Trainer(
        model=model, args=hf_args(tmp_path / "hf", max_steps=6), train_dataset=data, callbacks=[seen]
    )
    trainer.train(resume_from_checkpoint=str(ckpt))

    assert seen.step == 4  # HF's global_step starts at ours
    assert torch.equal(seen.exp_avg, ours["state"][0]["exp_avg"])  # its AdamW holds our moments, same order
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


def live_hf_trainer(runs: Path):  # -> (transformers.Trainer, TuiTrainerCallback)
    """A tiny HF Trainer set for 100k steps, recorded as run "live" through the callback (not started)."""
    from tui_trainer.integrations.hf import TuiTrainerCallback

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    data = blocks_dataset(torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0)))
    callback = TuiTrainerCallback()
    trainer = transformers.Trainer(
        model=model, args=hf_args(runs / "live", max_steps=100_000), train_dataset=data, callbacks=[callback]
    )
    return trainer, callback


def test_an_hf_trainer_with_the_callback_pauses_from_the_cli(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    trainer, callback = live_hf_trainer(runs)
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
    assert done.is_set()  # train() returned
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
    from conftest_app import fixed_clock, fixed_probe, plot_ready

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
    assert tree_digest(store.root / "hf") == before


def test_samples_come_from_an_hf_checkpoint(hf_run) -> None:
    from tui_trainer.engine.generate import generate_text

    store, before = hf_run
    text = generate_text(store.checkpoint("hf", 6).path, prompt="ROMEO:", max_new_tokens=8)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    assert tree_digest(store.root / "hf") == before
