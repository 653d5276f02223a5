"""`tui-trainer export`: a real tiny checkpoint becomes a clean Hugging Face model dir that loads and generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tui_trainer.cli import main

TRAINING_ONLY = {"optimizer.pt", "scheduler.pt", "rng.pt", "scaler.pt", "trainer_state.json", "manifest.json"}


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> Path:
    """runs/ with `a` (12 steps, checkpoints at 4, 8, 12) and `b`, branched from a@8 with a lower lr."""
    from conftest import tiny_overrides

    runs = tmp_path_factory.mktemp("export") / "runs"
    tiny = sets(tiny_overrides(small_corpus))
    assert main(["train", "--run", "a", "--headless", "--runs-dir", str(runs), *tiny]) == 0
    assert main(["branch", "a@8", "--run", "b", "--set", "optim.lr=5e-4", "--headless", "--runs-dir", str(runs)]) == 0
    return runs


def export(runs: Path, *args: str) -> int:
    return main(["export", *args, "--runs-dir", str(runs)])


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("tui-trainer: error: ")
    return err[0]


def test_exported_dir_generates_through_the_pipeline_and_holds_no_training_state(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, pipeline

    out = tmp_path / "model"
    assert export(trained, "b", str(out)) == 0
    assert "exported b@12 (fp32, " in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert files == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    }
    assert not files & TRAINING_ONLY
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dir left beside it

    generate = pipeline("text-generation", model=str(out))
    text = generate("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    # the same weights as the checkpoint the run saved (fp32 export: bit for bit)
    from safetensors.torch import load_file

    saved = load_file(str(trained / "b" / "checkpoints" / "step-00000012" / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert torch.equal(saved["transformer.wte.weight"], exported["transformer.wte.weight"])


def test_model_card_states_lineage_losses_and_config(trained, tmp_path):
    out = tmp_path / "card"
    assert export(trained, "b@12", str(out)) == 0
    card = (out / "README.md").read_text()
    manifest = json.loads((trained / "b" / "checkpoints" / "step-00000012" / "manifest.json").read_text())
    assert "pipeline_tag: text-generation" in card
    assert "- `a` up to step 8, where the next run branched off" in card
    assert "- `b` up to step 12 (this checkpoint)" in card
    assert f"| {manifest['loss']:.4f} | {manifest['eval_loss']:.4f} (step 12) |" in card
    assert "lr = 0.0005" in card  # the branch's own config, not its parent's
    assert "[checkpoint]" in card and "block_size = 32" in card


def test_bf16_export_stores_bf16_weights(trained, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert export(trained, "a@8", str(out), "--dtype", "bf16") == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_corrupt_checkpoint_is_refused_naming_the_file_and_nothing_is_written(trained, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    weights = runs / "a" / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the checksum can tell
    weights.write_bytes(bytes(data))
    out = tmp_path / "out" / "model"
    assert export(runs, "a@4", str(out)) == 2
    line = one_error_line(capsys)
    assert str(weights) in line and "does not match the manifest" in line
    assert not (tmp_path / "out").exists()


def test_force_replaces_a_previous_export_and_nothing_else(trained, tmp_path, capsys):
    out = tmp_path / "model"
    assert export(trained, "a@8", str(out)) == 0
    capsys.readouterr()
    assert export(trained, "a", str(out)) == 2
    assert "not empty; pass --force to replace a previous export" in one_error_line(capsys)
    assert export(trained, "a", str(out), "--force") == 0
    assert "- `a` up to step 12 (this checkpoint)" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the replaced dir is gone, no temp dirs

    # a user's file beside the export files: --force would delete it, so it is refused and kept
    (out / "notes.txt").write_text("mine")
    assert export(trained, "a", str(out), "--force") == 2
    assert "holds notes.txt, not a model export; --force only replaces a previous export" in one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    (tmp_path / "project" / "src").mkdir(parents=True)
    assert export(trained, "a", str(tmp_path / "project"), "--force") == 2
    assert "holds src/, not a model export" in one_error_line(capsys)
    assert (tmp_path / "project" / "src").is_dir()


def test_no_path_inside_a_runs_dir_is_exported_to_with_or_without_force(trained, tmp_path, capsys):
    """Issue 19: `export demo runs/demo/checkpoints/step-N --force` overwrote a checkpoint (the best one, a
    branch's parent). The runs dir, a run, a checkpoint, a new dir among them, a symlink to one, and a
    checkpoint of another runs dir are all refused, --force or not, and every checkpoint still verifies."""
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs)
    elsewhere = tmp_path / "other-runs"
    shutil.copytree(trained, elsewhere)
    (tmp_path / "link").symlink_to(runs / "a" / "checkpoints" / "step-00000008")
    (tmp_path / "runs-link").symlink_to(runs)
    targets = [
        runs,
        runs / "a",
        runs / "a" / "checkpoints",
        runs / "a" / "checkpoints" / "step-00000008",  # b's parent
        runs / "a" / "checkpoints" / "step-00000008" / "model",  # inside a checkpoint
        runs / "exports",  # a new dir in the runs dir
        tmp_path / "link",
        tmp_path / "runs-link" / "b",
        elsewhere / "b" / "checkpoints" / "step-00000012",
    ]
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for target in targets:
        for force in ([], ["--force"]):
            assert export(runs, "b", str(target), *force) == 2, (target, force)
            line = one_error_line(capsys)
            assert "export somewhere outside the runs dir" in line and str(target) in line, line
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert main(["verify", "--runs-dir", str(runs)]) == 0
    assert main(["resume", "a@8", "--name", "again", "--until-step", "9", "--headless", "--runs-dir", str(runs)]) == 0


def test_unwritable_destination_is_one_line_and_leaves_nothing(trained, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert export(trained, "a", str(tmp_path / "afile" / "model")) == 2
    line = one_error_line(capsys)
    assert "cannot write" in line and str(tmp_path / "afile") in line
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


async def test_export_key_writes_the_selected_checkpoint_on_a_worker_and_says_where(trained, tmp_path):
    """The app's `e`: the dialog (default ./exports/<run>-<step>), a real export on a worker thread, one
    notification with the result; a refused target is one error notification, nothing written."""
    from support.app import wait_for
    from textual.widgets import Input

    from tui_trainer.tui.app import TrainerApp
    from tui_trainer.tui.widgets.run_tree import NodeRef

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    app = TrainerApp(trained, strict=True)
    async with app.run_test(size=(120, 40)) as pilot:
        assert app.main.runs_tree.select_ref(NodeRef("a", 12))
        await pilot.pause()

        async def export_to(target: Path) -> str:
            await pilot.press("e")
            await pilot.pause()
            field = app.screen.query_one("#dir", Input)
            assert field.value == "./exports/a-12"
            field.value = str(target)
            await pilot.press("enter")
            await wait_for(pilot, lambda: bool(results()), 120, "the export's notification")
            done = results()[-1]
            app.clear_notifications()
            return done

        def results() -> list[str]:
            return [str(n.message) for n in app._notifications if str(n.message).startswith(("exported", "export f"))]

        said = await export_to(tmp_path / "out")
        assert said.startswith("exported a@12 (fp32") and str(tmp_path / "out") in said
        assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in (tmp_path / "out").iterdir()}
        said = await export_to(tmp_path / "taken")
        assert said.startswith("export failed:") and "taken" in said
        assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
