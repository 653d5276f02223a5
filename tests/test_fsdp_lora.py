"""LoRA under FSDP (engine/fsdp_lora.py), for real: 2 gloo ranks on the CPU under torchrun, the session's tiny
pretrained Llama (conftest.py `family_dirs`). Only the adapters train; the base stays as it was, bit for bit;
a checkpoint is an ordinary LoRA checkpoint (the adapter gathered on rank 0), so it continues on 2 ranks
exactly, on 1 process within float noise, and exports as every LoRA checkpoint does.

One module-scoped set of runs, three torchrun launches (the rest in this process):
- lo  (dropout on) 2 ranks to step 6, checkpoints at 3 and 6; rank 0 keeps the base's weights at step 6
- lo3 (dropout on) lo@3 branched unchanged on 2 ranks to 6: lo's steps 4-6 again
- z   (dropout 0)  lo@3 branched on 2 ranks to 6;  z1: the same branch on 1 process (this process)
- lo, continued in place on 1 process to step 8 (a LoRA checkpoint of FSDP continues at any world size)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from faults_support import losses, sets
from test_fsdp import fsdp_overrides, launch

from tui_trainer.core.plan import plan_branch, plan_resume
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.trainer import Trainer

pytestmark = pytest.mark.slow

BASE_ENV = "TUI_TEST_BASE_WEIGHTS"  # where base_weights_at_6 writes the frozen weights as training left them
NO_DROPOUT = ["lora.dropout=0.0", "model.dropout=0.0"]


def base_weights_at_6() -> object:
    """TUI_TRAINER_FAULTS factory: after step 6 every rank gathers the model's frozen weights (a collective)
    and rank 0 saves them, so the test can hold them against the pretrained files, with the shape of the
    piece of each that rank 0 holds between steps (None: not sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from tui_trainer.engine import faults

    def after_step(step: int, model: torch.nn.Module) -> None:
        if step == 6:
            held = {
                n: (tuple(p.shape), tuple(p.to_local().shape) if hasattr(p, "to_local") else None)
                for n, p in model.named_parameters()
                if not p.requires_grad
            }
            whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if os.environ["RANK"] == "0":
                base = {k: v for k, v in whole.items() if "lora_" not in k}
                torch.save({"weights": base, "held": held}, os.environ[BASE_ENV])

    return faults.Hooks(after_optimizer_step=after_step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus, family_dirs):
    tmp = tmp_path_factory.mktemp("fsdp-lora")
    store = RunStore(tmp / "runs")
    root = ["--headless", "--runs-dir", str(store.root), "--until-step", "6"]
    base = family_dirs["llama"]
    overrides = fsdp_overrides(
        small_corpus, model__pretrained=str(base), lora__r=4, lora__dropout=0.1, checkpoint__every_steps=3
    )
    out: dict[str, object] = {"store": store, "base": base}

    def ok(args: list[str], env: dict[str, str] | None = None) -> str:
        job = launch(tmp, args, env)
        assert job.wait(timeout=300) == 0, job.stderr
        assert job.rank_codes() == {0: 0, 1: 0}, job.stderr
        return job.stderr

    weights = tmp / "base.pt"
    env = {"TUI_TRAINER_FAULTS": "test_fsdp_lora:base_weights_at_6", BASE_ENV: str(weights)}
    out["lo"] = ok(["train", "--name", "lo", *sets(overrides), *root], env)
    out["base-at-6"] = torch.load(weights, weights_only=True)
    out["lo3"] = ok(["branch", "lo@3", "--name", "lo3", *root])
    out["z"] = ok(["branch", "lo@3", "--name", "z", *sets(NO_DROPOUT), *root])
    out["z1"] = Trainer(store, plan_branch(store, "lo@3", "z1", NO_DROPOUT), until_step=6).run()
    out["lo-one-plan"] = plan = plan_resume(store, "lo", world_size=1)
    out["lo-one"] = Trainer(store, plan, until_step=8).run()
    return out


def test_fsdp_trains_only_the_adapters_and_checkpoints_them_as_an_ordinary_lora_checkpoint(runs):
    from safetensors.torch import load_file

    store, base = runs["store"], runs["base"]
    assert "Running lo (2 ranks (FSDP, gloo), effective batch 16 = 4 x 2 x 2)" in runs["lo"]
    # the frozen base is sharded too: rank 0 holds half of every base weight (FSDP2 splits dim 0)
    held = runs["base-at-6"]["held"]
    assert held and all(mine is not None and mine[0] == (full[0] + 1) // 2 for full, mine in held.values()), held
    # the base's weights after six optimizer steps on 2 ranks: exactly the pretrained ones
    trained = {
        k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
        for k, v in runs["base-at-6"]["weights"].items()
    }
    pretrained = load_file(str(base / "model.safetensors"))
    assert pretrained.keys() <= trained.keys()
    for name, value in pretrained.items():
        assert torch.equal(trained[name], value), name
    # the checkpoint: PEFT's adapter files and the adapters' optimizer state, whole, no shards and no base
    ckpt = store.checkpoint_dir("lo", 6)
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= names
    assert not [n for n in names if n.endswith(".distcp") or n in (".metadata", "model.safetensors", "config.json")]
    assert "sharded" not in verify_checkpoint(ckpt)
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items()), "the adapters trained"
    moments = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(moments["state"]) == len(adapter)  # AdamW's state for every adapter weight, for nothing else
    reference = json.loads((ckpt / "tui_trainer_state.json").read_text())["lora_base"]
    assert reference["path"] == str(Path(base).absolute())


def test_an_fsdp_lora_checkpoint_continues_on_two_ranks_bit_for_bit(runs):
    store = runs["store"]
    reference, again = losses(store, "lo"), losses(store, "lo3")
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):  # dropout on: each rank's RNG restored exactly
        assert again[step] == reference[step], step


def test_an_fsdp_lora_checkpoint_continues_on_one_process(runs):
    store = runs["store"]
    two, one = losses(store, "z"), losses(store, "z1")
    assert runs["z1"] == "Paused" and sorted(one) == sorted(two) == [4, 5, 6]
    for step in (4, 5, 6):  # dropout 0: only the float sums' order differs
        assert one[step] == pytest.approx(two[step], abs=1e-3), step
    # the newest checkpoint continues in place on one process: the same run, not a branch
    plan = runs["lo-one-plan"]
    assert not plan.new_run and "continuing lo on 1 rank(s) (it ran on 2): same global batch" in plan.notes
    assert runs["lo-one"] == "Paused" and sorted(losses(store, "lo")) == list(range(1, 9))
    assert store.run("lo").parent is None


def test_an_fsdp_lora_checkpoint_exports_merged_and_as_the_adapter(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tui_trainer.engine.export import export_checkpoint

    store, base = runs["store"], runs["base"]
    ckpt = store.checkpoint_dir("lo", 6)
    merged = export_checkpoint(store, "lo@6", tmp_path / "merged").path
    alone = export_checkpoint(store, "lo@6", tmp_path / "adapter", adapter=True).path
    assert (merged / "model.safetensors").is_file() and (alone / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 42, 7]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(ckpt)).eval()
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(alone)).eval()
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, want, atol=1e-5)
        assert torch.equal(exported(input_ids=ids).logits, want)
