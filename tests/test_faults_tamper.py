"""Tampered checkpoints whose manifest was rewritten to match (so they verify): every load checks what it
loads has a home, of the right shape and type, and refuses anything else in one line (exit 2) before the
run is touched. The files are real checkpoints of a real run, edited the way an attacker or a bad copy would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.files import tree_digest

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import MANIFEST, RunStore, write_manifest
from tui_trainer.engine.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus) -> Path:
    """Run `a`: 8 steps, two layers, checkpoints at 4 and 8."""
    from conftest import tiny_overrides

    overrides = tiny_overrides(small_corpus, model__n_layer=2, train__max_steps=8)
    root = tmp_path_factory.mktemp("tamper") / "runs"
    store = RunStore(root)
    assert Trainer(store, plan_train(store, load_config(None, overrides), "a")).run() == State.FINISHED
    return root


@pytest.fixture
def store(trained, tmp_path) -> RunStore:
    shutil.copytree(trained, tmp_path / "runs")
    return RunStore(tmp_path / "runs")


def rehash(ckpt: Path) -> None:
    """What an attacker does after editing a file: a manifest that matches again."""
    meta = {k: v for k, v in json.loads((ckpt / MANIFEST).read_text()).items() if k not in ("format", "files")}
    write_manifest(ckpt, meta)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str) -> bool:
    """Exactly one line says what went wrong (progress lines of the data preparation may precede it)."""
    return [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]


def _optimizer(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)

    return tamper


def _moment_of_another_shape(state: dict) -> None:
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)


def _one_group_fewer_params(state: dict) -> None:
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]


def _config_layers(path: Path) -> None:
    config = json.loads(path.read_text())
    config["n_layer"] = 4  # the weights hold 2
    path.write_text(json.dumps(config))


TAMPERED: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "optimizer moment of another shape": (
        "optimizer.pt",
        _optimizer(_moment_of_another_shape),
        "exp_avg of parameter 0 is [3, 3]",
    ),
    "optimizer of another model": (
        "optimizer.pt",
        _optimizer(_one_group_fewer_params),
        "parameter groups of other sizes",
    ),
    "garbage rng.pt": ("rng.pt", lambda p: torch.save({"python": [1, 2, 3], "numpy": 5}, p), "not an RNG state"),
    "rng.pt a list": ("rng.pt", lambda p: torch.save([1, 2], p), "not an RNG state"),
    "garbage scheduler.pt": ("scheduler.pt", lambda p: torch.save({"last_epoch": "abc"}, p), "step is 'abc'"),
    "scheduler.pt overriding attributes": (
        "scheduler.pt",
        lambda p: torch.save({"last_epoch": 3, "optimizer": 5}, p),
        "unexpected keys optimizer",
    ),
    "state JSON a list": ("tui_trainer_state.json", lambda p: p.write_text("[]"), "not a JSON object"),
    "state JSON step abc": (
        "tui_trainer_state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "abc"})),
        "step is 'abc'",
    ),
    "state JSON loss a string": (
        "tui_trainer_state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "loss": "low"})),
        "loss is 'low'",
    ),
    "config.json 2 -> 4 layers": ("config.json", _config_layers, "does not match the weights (missing transformer.h.2"),
}


@pytest.mark.parametrize("kind", list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_in_one_line_and_the_run_is_untouched(store, capsys, kind):
    name, tamper, problem = TAMPERED[kind]
    ckpt = store.checkpoint_dir("a", 8)
    tamper(ckpt / name)
    rehash(ckpt)
    runs = ["--runs-dir", str(store.root)]
    assert run_cli(capsys, "verify", "a@8", *runs)[0] == 0, "the manifest matches: only a load can tell"
    before = tree_digest(store.root)

    for ref in ("a@8", "a"):
        code, _, err = run_cli(capsys, "resume", ref, "--headless", "--set", "train.max_steps=12", *runs)
        assert code == 2, err
        assert f"{ckpt / name}: " in err and problem in err, err
        assert one_error_line(err) and "Traceback" not in err, err
    code, _, err = run_cli(capsys, "branch", "a@8", "--name", "b", "--headless", "--set", "train.max_steps=12", *runs)
    assert code == 2 and problem in err and one_error_line(err), err
    assert tree_digest(store.root) == before, "a refused load writes nothing"
    assert store.read_record("a")["status"] == "finished", "nothing is left marked running"
    assert not store.exists("b")


def test_a_config_that_does_not_match_the_weights_is_refused_by_export_and_generate(store, tmp_path, capsys):
    ckpt = store.checkpoint_dir("a", 8)
    _config_layers(ckpt / "config.json")
    rehash(ckpt)
    runs = ["--runs-dir", str(store.root)]
    code, _, err = run_cli(capsys, "export", "a@8", str(tmp_path / "out"), *runs)
    assert code == 2 and "config.json: does not match the weights (missing transformer.h.2" in err, err
    assert one_error_line(err), err
    assert not (tmp_path / "out").exists(), "no model with randomly initialised layers is written"
    code, out, err = run_cli(capsys, "generate", "a@8", "--prompt", "KING:", "--max-new-tokens", "4", *runs)
    assert code == 2 and "config.json: does not match the weights" in err and not out, err
