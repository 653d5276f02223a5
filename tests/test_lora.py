"""LoRA ([lora], engine/lora.py) on a tiny pretrained Llama (conftest.py `family_dirs`): only the adapters
train and are stored, in PEFT's format; pause and resume are bit for bit; the merged export is a plain
model dir; a changed base, or a branch that changes the adapter's shape, is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.files import tree_digest
from support.models import make_model_dir

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.errors import ConfigError, UserError
from tui_trainer.core.events import DataProgress, State, StepLogged
from tui_trainer.core.plan import plan_branch, plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.export import export_checkpoint
from tui_trainer.engine.trainer import Trainer


def losses(events: list) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepLogged)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, small_corpus, family_dirs):
    """Run `straight` (6 LoRA steps), run `p` (paused at 3, resumed to 6) and run `full` (full fine-tuning,
    paused at 3), all on the session's tiny Llama; returns (store, their losses, the base dir)."""
    from conftest import tiny_overrides

    base = family_dirs["llama"]
    store = RunStore(tmp_path_factory.mktemp("lora") / "runs")
    common = {"model__pretrained": str(base), "train__max_steps": 6, "checkpoint__every_steps": 3}
    config = load_config(None, tiny_overrides(small_corpus, lora__r=4, **common))
    straight: list = []
    assert Trainer(store, plan_train(store, config, "straight"), straight.append).run() == State.FINISHED
    paused: list = []
    assert Trainer(store, plan_train(store, config, "p"), paused.append, until_step=3).run() == State.PAUSED
    assert Trainer(store, plan_resume(store, "p"), paused.append).run() == State.FINISHED
    full = load_config(None, tiny_overrides(small_corpus, **common))
    assert Trainer(store, plan_train(store, full, "full"), until_step=3).run() == State.PAUSED
    return store, losses(straight), losses(paused), base


def test_lora_pauses_and_resumes_bit_for_bit(lora_runs):
    _, straight, paused, _ = lora_runs
    assert len(straight) == 6 and paused == straight


def test_a_lora_checkpoint_is_the_adapter_in_peft_format_and_small(lora_runs):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    store, _, _, base = lora_runs
    ckpt = store.checkpoint("p", 3).path
    full = store.checkpoint("full", 3).path
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "config.json"}, "the base is not copied"
    # the adapter and its optimizer state are a small fraction of the whole model's
    ours = (ckpt / "adapter_model.safetensors").stat().st_size + (ckpt / "optimizer.pt").stat().st_size
    theirs = (full / "model.safetensors").stat().st_size + (full / "optimizer.pt").stat().st_size
    assert ours < 0.2 * theirs, (ours, theirs)
    assert dir_bytes(ckpt) < 0.5 * dir_bytes(full)
    reference = json.loads((ckpt / "tui_trainer_state.json").read_text())["lora_base"]
    assert reference["path"] == str(base.absolute()) and "model.safetensors" in reference["files"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt))
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and saved[k].abs().sum() > 0 for k in saved), "the adapter trained"


def test_export_merges_the_adapter_or_writes_it_alone(lora_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, pipeline

    store, _, _, base = lora_runs
    ckpt = store.checkpoint("p", None).path
    before = tree_digest(base)
    merged = export_checkpoint(store, "p", tmp_path / "merged").path
    assert not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    generate = pipeline("text-generation", model=str(merged))
    assert type(generate.model).__name__ == "LlamaForCausalLM"
    # the merged weights compute what base + adapter compute
    ids = torch.tensor([[5, 17, 42, 7]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt)).eval()
    with torch.no_grad():
        assert torch.allclose(generate.model(ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    assert "base_model: " in (merged / "README.md").read_text()

    alone = export_checkpoint(store, "p", tmp_path / "adapter", adapter=True).path
    assert {p.name for p in alone.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert not (alone / "model.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(alone))
    assert tree_digest(base) == before, "the base dir is never written"


def test_a_changed_base_is_refused_on_resume(tmp_path, tiny, capsys, family_dirs, family_tokenizer):
    base = tmp_path / "base"
    shutil.copytree(family_dirs["llama"], base)
    root = tmp_path / "runs"
    store = RunStore(root)
    config = load_config(None, tiny(model__pretrained=str(base), lora__r=4))
    assert Trainer(store, plan_train(store, config, "a"), until_step=4).run() == State.PAUSED
    make_model_dir(base, "llama", family_tokenizer, seed=1)  # the same shape, other weights
    before = tree_digest(root)
    capsys.readouterr()
    assert main(["resume", "a", "--headless", "--runs-dir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tui-trainer: error: model.pretrained: ") and "differs from the base a@4" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert tree_digest(root) == before
    # refused before the data is prepared (a big corpus takes minutes): no data stage starts
    events: list = []
    with pytest.raises(UserError, match="differs from the base a@4"):
        Trainer(store, plan_resume(store, "a"), events.append).run()
    assert not [e for e in events if isinstance(e, DataProgress)]


def test_a_branch_may_change_lr_and_dropout_but_not_the_adapter(lora_runs):
    store, _, _, _ = lora_runs
    for change in (["lora.r=8"], ["lora.target_modules='q_proj'"], ["lora.alpha=4"], ["lora.r=0"]):
        with pytest.raises(ConfigError, match=r"cannot change the adapter .* start one with"):
            plan_branch(store, "p@3", None, change)
    plan = plan_branch(store, "p@3", "p-lr", ["optim.lr=0.0005", "lora.dropout=0.0", "train.max_steps=5"])
    events: list = []
    assert Trainer(store, plan, events.append).run() == State.FINISHED
    assert len(losses(events)) == 2


def test_lora_trains_with_gradient_checkpointing(tmp_path, tiny, family_dirs):
    """Frozen embeddings under recomputed blocks: the adapters still get gradients and move."""
    from safetensors.torch import load_file

    store = RunStore(tmp_path / "runs")
    config = load_config(
        None,
        tiny(
            model__pretrained=str(family_dirs["llama"]),
            lora__r=4,
            train__grad_checkpointing=True,
            train__max_steps=2,
            optim__warmup_steps=0,
        ),
    )
    events: list = []
    assert Trainer(store, plan_train(store, config, "gc"), events.append).run() == State.FINISHED
    adapter = load_file(str(store.checkpoint("gc", None).path / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items()), "the adapters trained"


def test_lora_needs_a_pretrained_model(tiny):
    with pytest.raises(ConfigError, match=r"lora\.r: LoRA adapts a pretrained model"):
        load_config(None, tiny(lora__r=4))


@pytest.mark.slow
def test_lora_as_a_person_runs_it(tmp_path, tiny, family_dirs):
    """The real command end to end: train LoRA to a pause, resume to the end, export merged and adapter."""
    from faults_support import cli as run_cli
    from faults_support import sets

    def cli(*args: str, cwd: Path):  # a loaded 2-core machine: each process imports torch, transformers, peft
        return run_cli(*args, cwd=cwd, timeout=300)

    base = family_dirs["llama"]
    settings = sets([*tiny(model__pretrained=str(base), lora__r=4, train__max_steps=6, checkpoint__every_steps=3)])
    first = cli("train", "--name", "lo", "--headless", "--json", "--until-step", "3", *settings, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rest = cli("resume", "lo", "--headless", "--json", cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "Warning" not in first.stderr + rest.stderr, "no library warning leaks into the output"
    assert "it/s]" not in first.stderr + rest.stderr, "no library progress bar (Loading weights, ...) either"
    steps = [json.loads(line) for line in (first.stdout + rest.stdout).splitlines() if '"StepLogged"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    merged = cli("export", "lo", str(tmp_path / "merged"), cwd=tmp_path)
    adapter = cli("export", "lo", str(tmp_path / "adapter"), "--adapter", cwd=tmp_path)
    assert merged.returncode == 0 and adapter.returncode == 0, merged.stderr + adapter.stderr
    assert "it/s]" not in merged.stderr + adapter.stderr, "no Writing model shards / Loading weights bars"
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # the merged dir needs no peft: pipeline loads it in an interpreter where importing peft fails
    without_peft = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import pipeline\n"
        f"g = pipeline('text-generation', model={str(tmp_path / 'merged')!r})\n"
        "print(type(g.model).__name__, g('ROMEO:', max_new_tokens=3, do_sample=False)[0]['generated_text'])"
    )
    loaded = subprocess.run([sys.executable, "-c", without_peft], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.startswith("LlamaForCausalLM ROMEO:"), loaded.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    generated = cli("generate", "lo", "--prompt", "ROMEO:", "--max-new-tokens", "5", cwd=tmp_path)
    assert generated.returncode == 0 and generated.stdout.startswith("ROMEO:"), generated.stderr
