"""The real `tui-trainer` command in a subprocess: headless runs, browsing, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tui_trainer", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def headless_run(tmp_path_factory, small_corpus):
    from conftest import tiny_overrides

    cwd = tmp_path_factory.mktemp("cli")
    result = cli("train", "--run", "a", "--json", *sets(tiny_overrides(small_corpus)), cwd=cwd)
    return cwd, result


def test_headless_json_run_streams_events_and_finishes(headless_run):
    cwd, result = headless_run
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if not line.startswith("{")] == []
    events = [json.loads(line) for line in lines]
    kinds = {e["event"] for e in events}
    assert {"StateChanged", "StepLogged", "EvalLogged", "CheckpointSaved"} <= kinds
    assert [e["step"] for e in events if e["event"] == "StepLogged"] == list(range(1, 13))
    assert events[-1] == {**events[-1], "event": "StateChanged", "state": "Finished"}
    assert (cwd / "runs" / "a" / "checkpoints" / "step-00000012" / "manifest.json").is_file()


def test_headless_json_run_reports_data_preparation_before_the_first_step(headless_run):
    _, result = headless_run
    events = [json.loads(line) for line in result.stdout.splitlines()]
    first_step = next(i for i, e in enumerate(events) if e["event"] == "StepLogged")
    progress = [e for e in events if e["event"] == "DataProgress"]
    assert progress and all(events.index(e) < first_step for e in progress)
    order = list(dict.fromkeys(e["stage"] for e in progress))
    # "training tokenizer" is absent when an earlier test already trained (and cached) this corpus's tokenizer
    assert order in (["reading", "training tokenizer", "tokenizing"], ["reading", "tokenizing"]), order
    for stage in order:
        reports = [e for e in progress if e["stage"] == stage]
        assert reports[0]["done"] == 0 and reports[-1]["done"] == reports[-1]["total"] > 0, reports
    stages_in_order = [e["stage"] for e in progress]
    assert stages_in_order == sorted(stages_in_order, key=order.index), "stages must not interleave"


def test_ls_shows_the_tree_and_json(headless_run):
    cwd, _ = headless_run
    out = cli("ls", cwd=cwd)
    assert out.returncode == 0 and "a  [finished]" in out.stdout and "step      12" in out.stdout
    data = json.loads(cli("ls", "--json", cwd=cwd).stdout)
    assert data[0]["name"] == "a" and [c["step"] for c in data[0]["checkpoints"]] == [4, 8, 12]


def test_verify_rehashes_every_checkpoint(headless_run):
    cwd, _ = headless_run
    out = cli("verify", "a", cwd=cwd)
    assert out.returncode == 0 and "3 ok, 0 invalid" in out.stdout


def test_generate_prints_a_sample(headless_run):
    cwd, _ = headless_run
    out = cli("generate", "a@12", "--prompt", "KING:", "--max-new-tokens", "12", cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KING:")


def test_plain_output_when_not_a_terminal(tmp_path, tiny):
    out = cli("train", "--run", "p", "--headless", "--until-step", "3", *sets(tiny()), cwd=tmp_path)
    assert out.returncode == 0
    assert "Paused p" in out.stderr and "\r" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--set", "model.n_layers=2"], "model.n_layers: unknown key"),
        (["train", "--set", "train.batch_size=0"], "train.batch_size: must be > 0"),
        (["train", "--set", "optim.lr=0"], "optim.lr: must be > 0"),
        (["train", "--set", "train.max_steps=ten"], "train.max_steps: expected int"),
        (["train", "--set", "data.path=/nonexistent/corpus.txt"], "data.path: no such file"),
        (["train", "--set", "data.path="], "data.path: is empty"),
        (["train", "--run", "a/b"], "path separator"),
        (["resume", "a@x"], "RUN@STEP"),
        (["resume", "nosuchrun"], "no run named 'nosuchrun'"),
        (["train", "--config", "missing.toml"], "file not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = cli(*args, "--headless", cwd=tmp_path) if args[0] in ("train", "resume") else cli(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.block_size=4096", "model.pretrained=PRETRAINED"], "model.block_size"),
        (["model.pretrained=no-such/model-anywhere"], "model.pretrained: cannot load"),
        (["data.path=EMPTY"], "is empty"),
        (["data.path=TINY"], "smaller than one block"),
        (["data.path=JSONL", "data.text_column=body"], "data.text_column: no column 'body'"),
    ],
)
def test_bad_data_and_model_found_during_setup_write_nothing(tmp_path, tiny, extra, message, pretrained_dir):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    (tmp_path / "docs.jsonl").write_text('{"text": "hello there"}\n' * 50)
    subs = {
        "EMPTY": tmp_path / "empty.txt",
        "TINY": tmp_path / "tiny.txt",
        "JSONL": tmp_path / "docs.jsonl",
        "PRETRAINED": pretrained_dir,
    }
    extra = [e.split("=")[0] + "=" + repr(str(subs.get(e.split("=")[1], e.split("=")[1]))) for e in extra]
    out = cli("train", "--run", "x", "--headless", *sets([*tiny(), *extra]), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "x").exists()


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, headless_run) -> Path:
    """A local pretrained model: a checkpoint dir is a plain Hugging Face model dir."""
    cwd, _ = headless_run
    return cwd / "runs" / "a" / "checkpoints" / "step-00000012"


def test_training_from_a_local_pretrained_dir(tmp_path, tiny, pretrained_dir, headless_run):
    out = cli(
        "train",
        "--run",
        "ft",
        "--json",
        "--until-step",
        "2",
        *sets([*tiny(), f"model.pretrained={str(pretrained_dir)!r}"]),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    first = next(json.loads(line) for line in out.stdout.splitlines() if '"StepLogged"' in line)
    parent = [json.loads(line) for line in headless_run[1].stdout.splitlines() if '"StepLogged"' in line]
    # starts from the trained weights with their tokenizer: below where the random init started
    assert first["loss"] < parent[0]["loss"]
    ckpt = tmp_path / "runs" / "ft" / "checkpoints" / "step-00000002"
    assert (ckpt / "tokenizer.json").read_bytes() == (pretrained_dir / "tokenizer.json").read_bytes()


def test_config_command_prints_every_key_with_its_meaning(tmp_path):
    out = cli("config", cwd=tmp_path)
    assert out.returncode == 0
    assert "[optim]" in out.stdout and "lr = 0.001" in out.stdout and "# Peak learning rate" in out.stdout
