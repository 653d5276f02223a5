"""Corrupt and malicious checkpoints: a flipped byte, a truncated or missing file is marked invalid and
refused naming the file, `resume RUN` falls back to the newest valid checkpoint and says so; a pickle
payload planted in optimizer.pt / scheduler.pt / rng.pt never runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from faults_support import losses, reference
from support.files import tree_digest

from tui_trainer.cli import main
from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import MANIFEST, RunStore, write_manifest
from tui_trainer.engine.trainer import Trainer


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, small_corpus) -> tuple[Path, list[str]]:
    """Run `a`: 12 steps, checkpoints at 4, 8 and 12."""
    from conftest import tiny_overrides

    overrides = tiny_overrides(small_corpus)
    root = tmp_path_factory.mktemp("pristine") / "runs"
    store = RunStore(root)
    assert Trainer(store, plan_train(store, load_config(None, overrides), "a")).run() == State.FINISHED
    return root, overrides


@pytest.fixture
def store(trained_runs, tmp_path) -> RunStore:
    root, _ = trained_runs
    shutil.copytree(root, tmp_path / "runs")
    return RunStore(tmp_path / "runs")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


CORRUPTIONS = {
    "flipped byte": ("model.safetensors", flip_byte, "xxh3_128 does not match the manifest"),
    "truncated": ("optimizer.pt", lambda p: os.truncate(p, p.stat().st_size // 2), "manifest says"),
    "missing file": ("rng.pt", Path.unlink, "missing file listed in the manifest"),
    "missing manifest": (MANIFEST, Path.unlink, "missing manifest"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_invalid_and_refused_naming_the_file(store, capsys, kind):
    name, corrupt, problem = CORRUPTIONS[kind]
    path = store.checkpoint_dir("a", 12) / name
    corrupt(path)
    runs = ["--runs-dir", str(store.root)]
    before = tree_digest(store.root)

    code, out, _ = run_cli(capsys, "verify", "a", *runs)
    assert code == 1
    assert f"INVALID  a@12: {path}: " in out and problem in out, out
    assert "ok       a@8" in out and "2 ok, 1 invalid" in out

    # the browser's cheap scan (no hashing) catches everything but a same-size corruption
    ckpt = store.run("a").checkpoints[-1]
    assert ckpt.valid == (kind == "flipped byte")
    if not ckpt.valid:
        assert str(path) in ckpt.problem and problem in ckpt.problem
        code, out, _ = run_cli(capsys, "ls", "--json", *runs)
        listed = json.loads(out)[0]["checkpoints"][-1]
        assert code == 0 and listed["valid"] is False and name in listed["problem"]

    code, _, err = run_cli(capsys, "resume", "a@12", "--headless", *runs)
    assert code == 2
    assert f"tui-trainer: error: cannot resume a@12: {path}: " in err and problem in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert tree_digest(store.root) == before, "a refused resume writes nothing"


def test_resume_run_falls_back_to_the_newest_valid_checkpoint_and_says_so(store, trained_runs, capsys):
    _, overrides = trained_runs
    bad = store.checkpoint_dir("a", 12) / "model.safetensors"
    flip_byte(bad)
    before = tree_digest(store.run_dir("a"))
    code, _, err = run_cli(capsys, "resume", "a", "--headless", "--runs-dir", str(store.root))
    assert code == 0, err
    assert f"note: skipping invalid checkpoint a@12: {bad}: xxh3_128 does not match" in err
    assert "note: falling back to the newest valid checkpoint a@8" in err
    # a@8 is not the run's newest: the continuation is a branch, and `a` (with its evidence) is untouched
    assert "continuing in a new branch run 'a-from8'" in err
    assert tree_digest(store.run_dir("a")) == before
    assert store.read_record("a-from8")["parent"] == {"run": "a", "step": 8}
    expected = reference(overrides)[0]
    assert losses(store, "a-from8") == {s: expected[s] for s in range(9, 13)}


class Payload:
    """Unpickling this runs a shell command: the classic malicious-checkpoint payload."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant(path: Path, sentinel: Path) -> None:
    if path.suffix == ".pt":
        torch.save({"state": Payload(f"touch {sentinel}"), "param_groups": []}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(f"touch {sentinel}")))


def test_the_payload_is_real(tmp_path):
    """Control: loaded the unsafe way, the planted file does run its command."""
    sentinel = tmp_path / "pwned-control"
    plant(tmp_path / "x.pt", sentinel)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt", "model.safetensors"])
@pytest.mark.parametrize("manifest", ["forged", "stale"])
def test_planted_pickle_payload_never_runs(store, tmp_path, capsys, name, manifest):
    """'forged': the attacker also rewrote manifest.json so every hash matches; 'stale': they did not."""
    sentinel = tmp_path / "pwned"
    ckpt = store.checkpoint_dir("a", 12)
    plant(ckpt / name, sentinel)
    if manifest == "forged":
        meta = {k: v for k, v in json.loads((ckpt / MANIFEST).read_text()).items() if k not in ("format", "files")}
        write_manifest(ckpt, meta)
    runs = ["--runs-dir", str(store.root)]
    before = tree_digest(store.root)

    for ref in ("a@12", "a"):
        # a@12 is where the run finished: a larger max_steps is needed to resume it at all
        code, _, err = run_cli(capsys, "resume", ref, "--headless", "--set", "train.max_steps=16", *runs)
        if manifest == "stale" and ref == "a":
            # the hash check catches it first: skipped, and the run continues from a@8 (a branch)
            assert code == 0 and f"skipping invalid checkpoint a@12: {ckpt / name}" in err, err
            assert "continuing in a new branch run 'a-from8'; 'a' is left untouched" in err, err
            continue
        assert code == 2, err
        assert str(ckpt / name) in err and "Traceback" not in err, err
        if manifest == "forged":  # the hashes match: torch.load(weights_only=True) / safetensors refuse it
            assert "refused to load (Weights only load failed" in err or "cannot read weights" in err, err
        else:
            assert "does not match the manifest" in err or "manifest says" in err, err
    assert run_cli(capsys, "ls", *runs)[0] == 0
    assert run_cli(capsys, "verify", *runs)[0] == (0 if manifest == "forged" else 1)
    assert not sentinel.exists(), "the payload ran"
    assert {k: v for k, v in tree_digest(store.root).items() if k.startswith("a/")} == {
        k: v for k, v in before.items() if k.startswith("a/")
    }


def test_generate_from_a_checkpoint_with_a_planted_payload_runs_nothing(store, tmp_path, capsys):
    """Weights come from safetensors only: the .pt files are never opened to generate."""
    sentinel = tmp_path / "pwned"
    ckpt = store.checkpoint_dir("a", 12)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        plant(ckpt / name, sentinel)
    meta = {k: v for k, v in json.loads((ckpt / MANIFEST).read_text()).items() if k not in ("format", "files")}
    write_manifest(ckpt, meta)
    code, out, err = run_cli(
        capsys, "generate", "a@12", "--prompt", "KING:", "--max-new-tokens", "4", "--runs-dir", str(store.root)
    )
    assert code == 0, err
    assert out.startswith("KING:") and not sentinel.exists()
