"""The real `tui-trainer` command in a subprocess: headless runs, browsing, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import procs

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return procs.run(
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
        (["train", "--config", "."], "--config: cannot read"),
        (["config", "--set", "optim.lr=inf"], "optim.lr: must be a finite number, got inf"),
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


def test_bare_command_continues_the_paused_demo_then_starts_a_fresh_one(tmp_path, tiny, monkeypatch):
    """`tui-trainer` with no arguments: a paused demo continues where it stopped (it used to start demo-2
    from scratch); a finished one stays as it is and a fresh demo run starts beside it."""
    from tui_trainer.cli import demo_plan
    from tui_trainer.core.config import load_config
    from tui_trainer.core.events import State
    from tui_trainer.core.plan import plan_train
    from tui_trainer.core.store import RunStore
    from tui_trainer.engine.trainer import Trainer

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the default data.path is ./sample_data
    store = RunStore(tmp_path / "runs")
    first = demo_plan(store)
    assert (first.run, first.new_run, first.notes) == ("demo", True, [])

    assert Trainer(store, plan_train(store, load_config(None, tiny()), "demo"), until_step=4).run() == State.PAUSED
    plan = demo_plan(store)
    assert (plan.run, plan.new_run, plan.start_step) == ("demo", False, 4)
    assert "continuing the paused demo run from step 4" in plan.notes

    assert Trainer(store, plan).run() == State.FINISHED
    fresh = demo_plan(store)
    assert (fresh.run, fresh.new_run, fresh.start_step) == ("demo-2", True, 0)
    assert fresh.notes == ["demo finished at step 12; starting a fresh demo run 'demo-2'"]


def test_default_run_names_are_short_and_count_up(tmp_path):
    from tui_trainer.core.plan import default_run_name
    from tui_trainer.core.store import RunStore

    store = RunStore(tmp_path / "runs")
    assert default_run_name(store) == "run-1"
    store.create_run("run-1", {}, None)
    store.create_run("run-7", {}, None)
    assert default_run_name(store) == "run-8"
    assert default_run_name(store, "demo") == "demo"


def feed_a_run(progress) -> None:
    """Data prep, 40 steps of a max_steps=2000 run with --until-step 40, a checkpoint, then the pause."""
    from tui_trainer.core import events as ev

    progress(ev.StateChanged("demo", "Running", 0, ""))
    for done in (0, 42, 100):
        progress(ev.DataProgress("demo", "tokenizing", done, 100))
    for step in range(1, 41):
        progress(ev.StepLogged("demo", step, 5.0 - step / 100, 1e-3, step * 100, 9000.0, 0.1, 2000, 200.0))
        if step == 20:
            progress(ev.CheckpointSaved("demo", 20, "x", 0.1, 16_357_000))
    progress(ev.StateChanged("demo", "Paused", 40, "checkpoint step 40 saved"))
    progress.close()


def test_terminal_progress_fits_the_width_and_counts_to_until_step():
    import io
    import re

    from tui_trainer.cli.headless import _Progress

    out = io.StringIO()
    feed_a_run(_Progress(False, out, until_step=40, tty=True, width=60))
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()).replace("\r", "\n")
    assert max(len(line) for line in screen.splitlines()) <= 60  # nothing wraps at 60 columns
    assert "40/40" in screen and "/2000" not in screen and "eta 0s" in screen
    assert "checkpoint step 20 saved (15.6M, 0.10s)" in screen and "tokenizing 100%" in screen
    assert screen.rstrip().endswith("Paused demo at step 40 (checkpoint step 40 saved)")


def test_plain_progress_lines_are_throttled_and_readable():
    import io

    from tui_trainer.cli.headless import _Progress
    from tui_trainer.core import events as ev

    out = io.StringIO()
    feed_a_run(_Progress(False, out, until_step=40, tty=False))
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert [line for line in lines if line.startswith("tokenizing")] == ["tokenizing 0%", "tokenizing 100%"]
    steps = [line for line in lines if line.startswith("step ")]
    assert steps[0].startswith("step 1/40  loss 4.990") and steps[-1].startswith("step 40/40  loss 4.600")
    assert len(steps) < 10  # throttled to one line per two seconds (plus the last): not one per step

    out = io.StringIO()
    progress = _Progress(False, out, tty=False)
    progress(ev.StateChanged("lr-half", "Finished", 50, "reached max_steps=50"))
    assert out.getvalue() == "Finished lr-half at step 50 (reached max_steps=50)\n"

    out = io.StringIO()
    progress = _Progress(False, out, tty=False)
    progress(ev.SampleLogged("lr-half", 200, "To be", ", or not\nto be" + " x" * 60, 0.3))
    line = out.getvalue()
    assert line.startswith("step 200  sample (0.30s): To be, or not to be x x") and line.endswith("…\n")


def test_ls_speaks_the_apps_vocabulary(tmp_path, capsys):
    """Same marks, decimals and sizes as the app's tree; an invalid checkpoint shows the bytes on disk."""
    from tui_trainer.cli import main
    from tui_trainer.core.store import RunStore, write_manifest

    store = RunStore(tmp_path / "runs")
    store.create_run("a", {}, None)
    for step, loss, eval_loss in ((4, 5.12345, 5.3), (8, 4.5, 4.61), (12, 4.4, 4.7)):
        path = store.checkpoint_dir("a", step)
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"x" * 16_357_000 if step == 4 else b"x" * 2048)
        write_manifest(path, {"step": step, "loss": loss, "eval_loss": eval_loss})
    (store.checkpoint_dir("a", 12) / "manifest.json").unlink()
    store.set_pinned("a", 4, True)
    assert main(["ls", "--runs-dir", str(store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a  [created]  3 checkpoints"
    assert lines[1].split() == ["step", "4", "loss", "5.123", "eval", "5.300", "15.6M", "⚑"]
    assert lines[2].split() == ["step", "8", "loss", "4.500", "eval", "4.610", "2.0K", "★◆"]
    assert lines[3].split()[:7] == ["step", "12", "loss", "–", "eval", "–", "2.0K"]
    assert "✗ invalid: " in lines[3] and "missing manifest" in lines[3]


def test_help_and_errors_read_as_sentences(tmp_path, capsys):
    from tui_trainer.cli import build_parser, main
    from tui_trainer.core.store import RunStore

    text = build_parser().format_help()
    assert "With no command, `tui-trainer` opens the app on ./runs and trains the demo" in text
    for command in ("train", "resume", "branch", "ls", "verify", "generate", "open", "config"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert sub.description and undocumented == [], (command, undocumented)

    assert main(["generate"]) == 2
    assert capsys.readouterr().err == "tui-trainer: error: generate: the following arguments are required: RUN[@STEP]\n"
    RunStore(tmp_path).create_run("empty", {}, None)
    assert main(["generate", "empty", "--runs-dir", str(tmp_path)]) == 2
    assert "run 'empty' has no valid checkpoint to generate from" in capsys.readouterr().err


def test_each_front_end_words_the_remedy_of_a_fault_its_own_way():
    """The engine's Failed carries kind and last good checkpoint; the CLI names commands, the app keys."""
    from tui_trainer.cli.headless import _Progress
    from tui_trainer.core import fmt
    from tui_trainer.core.events import Failed, FaultKind

    nan = Failed("r", 6, "loss is nan at step 6", FaultKind.NAN, "r@4")
    assert _Progress._remedy(nan) == (
        "loss is nan at step 6: branch from it with a lower optim.lr (`tui-trainer branch r@4 --set optim.lr=…`)"
    )
    disk = Failed("r", 6, "could not write x", FaultKind.DISK, "r@4")
    assert _Progress._remedy(disk).endswith("free space or fix permissions, then `tui-trainer resume r`")
    assert fmt.remedy(disk, resume="press r", branch="b").endswith("then press r")
    oom = Failed("b", 3, "out of memory at step 3", FaultKind.OOM, "p@2")
    assert "resume the last checkpoint (p@2, where this branch started): press r" in fmt.remedy(
        oom, resume="press r", branch="b"
    )
    error = Failed("r", 1, "ValueError: x", FaultKind.ERROR)
    assert fmt.remedy(error, resume="press r", branch="b") == "ValueError: x"


@pytest.mark.parametrize(
    ("args", "not_terminals"),
    [
        ([], "stdin and stdout are"),
        (["open"], "stdin and stdout are"),
        ([], "stdin is"),  # stdout on a terminal (a pty), stdin from /dev/null
        (["open"], "stdout is"),  # stdin on a terminal, stdout into a pipe
    ],
)
def test_the_app_without_a_terminal_is_refused_in_one_line(tmp_path, args, not_terminals):
    """Issue 19: `attach`, `open` and bare `tui-trainer` painted the full-screen app into a pipe forever
    (2.5 MB of escape codes in ten minutes). Without a terminal on stdin and stdout: one line, exit 2, no
    runs dir made. The timeout is the old hang."""
    import pty

    master, terminal = pty.openpty()
    try:
        stdin = terminal if not_terminals == "stdout is" else subprocess.DEVNULL
        stdout = terminal if not_terminals == "stdin is" else subprocess.PIPE
        proc = subprocess.run(
            [sys.executable, "-m", "tui_trainer", *args],
            cwd=tmp_path,
            env=ENV,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(master)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert len(err) == 1 and err[0].startswith("tui-trainer: error: "), err
    assert "opens the full-screen app, which needs a terminal" in err[0] and f"{not_terminals} not one" in err[0]
    assert not proc.stdout  # not one escape code
    assert list(tmp_path.iterdir()) == []


def test_a_short_schedule_trains_with_the_default_warmup_and_an_explicit_one_is_refused(tmp_path, tiny):
    """Issue 19: `train --set train.max_steps=12` was refused (exit 2) because the *default* warmup, 50, is not
    below it. Unset, the warmup follows max_steps (recorded in run.json); given, it is checked."""
    unset = [o for o in tiny() if not o.startswith("optim.warmup_steps")]
    result = cli("train", "--run", "short", "--headless", "--runs-dir", "runs", *sets(unset), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "runs" / "short" / "run.json").read_text())
    assert record["config"]["train"]["max_steps"] == 12 and record["config"]["optim"]["warmup_steps"] == 1
    refused = cli("train", "--headless", "--runs-dir", "runs", *sets([*unset, "optim.warmup_steps=12"]), cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == (
        "tui-trainer: error: optim.warmup_steps: 12 is not below train.max_steps=12; the learning rate would never "
        "leave warmup (lower optim.warmup_steps)\n"
    )
    printed = cli("config", "--set", "train.max_steps=12", cwd=tmp_path)
    assert "warmup_steps = 1  # not set: derived from train.max_steps=12" in printed.stdout
