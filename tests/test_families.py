"""Model families (engine/models): a user's own Llama / Qwen2 / GPT-NeoX dir trains as itself, pauses and
resumes bit for bit, exports to a dir `pipeline` loads as that family, and is never written; a dir that is
not a causal LM, or whose weights do not fit its config, is refused in one line before anything is written.

The tiny pretrained dirs come from conftest.py `family_dirs` (built once per session)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from support.files import tree_digest
from support.models import FAMILIES

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import State, StepLogged
from tui_trainer.core.plan import plan_resume, plan_train
from tui_trainer.core.store import RunStore
from tui_trainer.engine.export import export_checkpoint
from tui_trainer.engine.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def losses(events: list) -> list[float]:
    return [e.loss for e in events if isinstance(e, StepLogged)]


def weight_names(checkpoint: Path) -> set[str]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pretrained_dir_trains_as_itself_resumes_bit_exact_and_exports(tmp_path, tiny, family_dirs, family):
    from transformers import AutoTokenizer, pipeline

    source = family_dirs[family]
    before = tree_digest(source)
    store = RunStore(tmp_path / "runs")
    config = load_config(
        None,
        tiny(model__pretrained=str(source), train__max_steps=6, checkpoint__every_steps=3, train__eval_every=3),
    )
    straight: list = []
    assert Trainer(store, plan_train(store, config, "straight"), straight.append).run() == State.FINISHED
    first: list = []
    assert Trainer(store, plan_train(store, config, "p"), first.append, until_step=3).run() == State.PAUSED
    rest: list = []
    assert Trainer(store, plan_resume(store, "p"), rest.append).run() == State.FINISHED
    assert losses(first) + losses(rest) == losses(straight), "pause + resume must match bit for bit"

    ckpt = store.checkpoint("p", None).path
    saved = json.loads((ckpt / "config.json").read_text())
    assert (
        saved["model_type"] == family
        and saved["architectures"] == json.loads((source / "config.json").read_text())["architectures"]
    )
    # the model's own tensors (transformers saves GPT-NeoX's head under its legacy name embed_out; the
    # checkpoint holds the module's name lm_head, which from_pretrained reads as well)
    ours, theirs = weight_names(ckpt), weight_names(source)
    assert len(ours) == len(theirs) and len(ours ^ theirs) <= 2, ours ^ theirs
    # the dir's own tokenizer as transformers loads it (for a qwen2 dir that is Qwen2Tokenizer's reading of it)
    text = "ROMEO: But soft, what light through yonder window breaks?"
    assert AutoTokenizer.from_pretrained(ckpt)(text) == AutoTokenizer.from_pretrained(source)(text)

    out = export_checkpoint(store, "p", tmp_path / "export").path
    generate = pipeline("text-generation", model=str(out))
    assert generate.model.config.model_type == family
    assert type(generate.model).__name__ == saved["architectures"][0]
    assert generate("ROMEO:", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("ROMEO:")
    assert f"tags: [{family}, tui-trainer]" in (out / "README.md").read_text()
    assert tree_digest(source) == before, "the pretrained dir is never written"


def test_a_new_llama_from_the_architecture_keys(tmp_path, tiny):
    store = RunStore(tmp_path / "runs")
    config = load_config(None, tiny(model__arch="llama", model__n_head=4, model__n_kv_head=2, train__max_steps=4))
    events: list = []
    assert Trainer(store, plan_train(store, config, "l"), events.append).run() == State.FINISHED
    saved = json.loads((store.checkpoint("l", None).path / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert (saved["hidden_size"], saved["num_hidden_layers"], saved["num_attention_heads"]) == (32, 1, 4)
    assert (saved["num_key_value_heads"], saved["max_position_embeddings"]) == (2, 32)
    assert len(losses(events)) == 4


def refused(capsys, root: Path, extra: list[str], tiny) -> str:
    """Run `tui-trainer train` in-process; assert exit 2, one error line, nothing written; return the line."""
    args = ["train", "--run", "x", "--headless", "--runs-dir", str(root)]
    for item in [*tiny(), *extra]:
        args += ["--set", item]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert [line for line in err if "error" in line] == err[-1:], err
    assert not root.exists() or not any(root.iterdir()), "bad input must write nothing"
    return err[-1]


def test_a_dir_that_is_not_a_causal_lm_is_refused(tmp_path, tiny, capsys, family_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    encoder = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(encoder)
    family_tokenizer.save_pretrained(encoder)
    before = tree_digest(encoder)
    line = refused(capsys, tmp_path / "runs", [f"model.pretrained={str(encoder)!r}"], tiny)
    assert f"{encoder / 'config.json'}: BertForMaskedLM is not a causal language model" in line
    assert tree_digest(encoder) == before


def test_a_gpt2_config_over_llama_weights_is_refused(tmp_path, tiny, capsys, family_dirs):
    """The silent-random-GPT-2 bug: never train a random init the user did not ask for."""
    from transformers import GPT2Config

    mixed = tmp_path / "mixed"
    shutil.copytree(family_dirs["llama"], mixed)
    GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=2).save_pretrained(mixed)
    line = refused(capsys, tmp_path / "runs", [f"model.pretrained={str(mixed)!r}"], tiny)
    assert f"{mixed / 'model.safetensors'} does not fit its config.json (GPT2LMHeadModel)" in line
    assert re.search(r"missing \d+ .*unexpected \d+ \(e\.g\. model\.", line), line


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json is missing: not a Hugging Face model dir"),
        (lambda d: (d / "model.safetensors").unlink(), "holds no weights"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is unreadable"),
    ],
    ids=["no config", "no weights", "broken config"],
)
def test_a_broken_model_dir_is_refused_naming_the_file(tmp_path, tiny, capsys, family_dirs, setup, message):
    broken = tmp_path / "broken"
    shutil.copytree(family_dirs["qwen2"], broken)
    setup(broken)
    assert message in refused(capsys, tmp_path / "runs", [f"model.pretrained={str(broken)!r}"], tiny)


def test_block_size_is_held_to_the_pretrained_context(tmp_path, tiny, capsys, family_dirs):
    source = family_dirs["llama"]
    line = refused(capsys, tmp_path / "runs", [f"model.pretrained={str(source)!r}", "model.block_size=65"], tiny)
    assert "model.block_size: 65 is more than the model's 64 positions" in line


def test_no_module_outside_engine_models_names_a_model_class():
    """The family seam: the rest of the package asks engine/models, never a concrete model class."""
    pattern = re.compile(r"\b(\w*LMHeadModel|\w*ForCausalLM|GPT2\w+|Llama\w+)\b")
    offenders = []
    for path in (REPO / "tui_trainer").rglob("*.py"):
        if "engine/models" in path.as_posix():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()  # a string (a model card's usage text) may name one
            if pattern.search(line) and not text.startswith(('"', "'", 'f"', "f'")):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_names_its_blocks_and_decays_matrices_only(family_dirs, family):
    """What gradient checkpointing / FSDP wrap and what the optimizer decays, for every family alike."""
    from tui_trainer.engine import models

    model = models.load_pretrained(str(family_dirs[family]), 0.0)
    spec = models.family_of(model)
    assert len(spec.block_modules(model)) == 2  # num_hidden_layers
    decay, no_decay = spec.decay_split(model)
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() == 1 for p in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_the_details_line_names_family_base_and_lora_rank():
    from tui_trainer.core.fmt import model_line

    assert model_line({"model": {"arch": "gpt2", "pretrained": ""}}) == ""  # the default says nothing
    assert model_line({"model": {"arch": "llama"}}) == "llama"
    lora = {"model": {"pretrained": "/models/SmolLM2-135M/"}, "lora": {"r": 16}}
    assert model_line(lora) == "from SmolLM2-135M · LoRA r=16"


def test_a_bf16_model_dir_trains_in_fp32_master_weights(tmp_path, tiny, family_dirs):
    """A dir saved in bf16 is upcast on load (README "Fine-tune a model you have": fp32 weights and optimizer
    state, autocast for the compute): the checkpoint's weights and its config.json say float32; the source
    dir stays bf16 and untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(family_dirs["llama"]).to(torch.bfloat16).save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(family_dirs["llama"] / name, source / name)
    before = tree_digest(source)
    store = RunStore(tmp_path / "runs")
    settings = tiny(model__pretrained=str(source), train__max_steps=1, optim__warmup_steps=0, train__precision="bf16")
    config = load_config(None, settings)
    assert Trainer(store, plan_train(store, config, "b")).run() == State.FINISHED
    ckpt = store.checkpoint("b", None).path
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 - not a dict
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    assert tree_digest(source) == before
