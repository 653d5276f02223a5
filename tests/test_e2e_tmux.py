"""End to end: the real `tui-trainer` command in a real terminal (tmux), driven by keys, read off the screen.

The default suite runs `test_e2e_train_pause_resume_branch_quit` (marked slow, still collected).
`-m benchmark` adds the measurements reported in the issue: time to first frame, `p` to "Pausing" on
screen, and training throughput with the app open versus headless on the same config:

    pytest -m benchmark tests/test_e2e_tmux.py -s
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from support.tmux import TMUX, Pane

from tui_trainer.core.store import RunStore, verify_checkpoint

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")


def tui_trainer_command() -> list[str]:
    script = Path(sys.executable).parent / "tui-trainer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tui_trainer"]


@pytest.fixture
def pane(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Pane(tmp_path)
    yield p
    p.close()


def status_line(screen: str) -> str:
    lines = [line for line in screen.splitlines() if line.strip()]
    return lines[-2] if len(lines) >= 2 else ""


def status_loss(screen: str) -> float | None:
    m = re.search(r"loss (\d+\.\d+)", status_line(screen))
    return float(m.group(1)) if m else None


def status_step(screen: str) -> int:
    m = re.search(r"step (\d+)/", status_line(screen))
    return int(m.group(1)) if m else -1


def train_argv(tiny: Callable[..., list[str]], run: str, **extra: object) -> list[str]:
    argv = [*tui_trainer_command(), "train", "--run", run]
    for item in tiny(**extra):
        argv += ["--set", item]
    return argv


@pytest.mark.slow
def test_e2e_train_pause_resume_branch_quit(pane: Pane, tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(tmp_path / "runs")
    argv = train_argv(tiny, "e2e", train__max_steps=100_000, checkpoint__every_steps=10, train__eval_every=10)
    pane.start(argv)

    # the first frame comes before torch is imported; then the run trains live
    pane.wait_for(r"Runs", 20)
    screen = pane.wait_for(lambda s: "Running" in status_line(s) and status_loss(s) is not None, 90)
    first_loss = status_loss(screen)
    screen = pane.wait_for(lambda s: status_step(s) >= 25 and "━━ EMA" in s, 90)
    assert "CPU · no GPU" in screen and re.search(r"RSS \d", screen) and "tok/s" in screen
    assert "━━ train" in screen and "━━ EMA" in screen  # the plot's legend: curves are drawn
    assert re.search(r"▼ e2e running", screen)
    assert re.search(r"\b\d+ [★◆⚑ ]{4}\d+\.\d{3}/(\d+\.\d{3}|–)", screen), "checkpoints are listed with their losses"
    last_loss = status_loss(screen)
    assert first_loss is not None and last_loss is not None and last_loss < first_loss, (first_loss, last_loss)

    # p: acknowledged ("Pausing after step N"), then a verified checkpoint and Paused. How fast the
    # acknowledgement comes is measured by test_measure_pause_acknowledgement (a benchmark), not asserted here.
    offset = pane.output_size()
    pane.send("p")
    pane.wait_for_output("Pausing after step", offset, 30)
    screen = pane.wait_for(r"Paused .*paused at step (\d+)", 60)
    paused_at = int(re.search(r"paused at step (\d+)", screen).group(1))  # type: ignore[union-attr]
    verify_checkpoint(store.checkpoint_dir("e2e", paused_at))
    assert json.loads((store.run_dir("e2e") / "run.json").read_text())["status"] == "paused"

    # still usable at 80x24
    pane.resize(80, 24)
    screen = pane.wait_for(lambda s: max(map(len, s.splitlines())) <= 80 and "Paused" in status_line(s), 10)
    assert "r Resume" in screen and "b Branch" in screen, "the footer keeps the main keys at 80 columns"
    pane.resize(120, 40)
    pane.wait_for(lambda s: max(map(len, s.splitlines())) > 100, 10)

    # select an older checkpoint (the first under the run; retention keeps the newest 3) and resume it:
    # a branch run appears and trains
    pane.send("Down")
    pane.send("r")
    screen = pane.wait_for(r"Running\s+e2e-from\d+\b", 90)
    branch = re.search(r"Running\s+(e2e-from(\d+))\b", screen).group(1)  # type: ignore[union-attr]
    older = int(branch.removeprefix("e2e-from"))
    assert older < paused_at
    pane.wait_for(lambda s: status_step(s) >= older + 2, 60)
    assert store.run(branch).parent == ("e2e", older)
    assert re.search(rf"└ ▼ {branch} ", pane.text()) or branch in pane.text()
    pane.send("p")
    pane.wait_for(rf"Paused\s+{branch} ", 60)

    # b on the branch's newest checkpoint, change lr, Enter: a new run with that lr and its parent recorded
    pane.send("b")
    pane.wait_for(r"Branch from", 10)
    pane.send("Tab")  # from the run name (focused first) to the lr field
    pane.send("C-u")  # clear it; wait for that, as a person would, before typing
    pane.wait_for(lambda s: not re.search(r"learning rate\W+\d", s), 10)
    pane.type("0.0005")
    pane.wait_for(r"learning rate\W+0\.0005", 10)
    pane.send("Enter")
    screen = pane.wait_for(rf"Running\s+{branch}-from\d+", 90)
    new_run = re.search(rf"Running\s+({branch}-from\d+)", screen).group(1)  # type: ignore[union-attr]
    record = json.loads((store.run_dir(new_run) / "run.json").read_text())
    assert record["config"]["optim"]["lr"] == 0.0005 and record["parent"]["run"] == branch
    pane.wait_for(lambda s: "Running" in status_line(s) and status_step(s) > record["parent"]["step"] + 2, 60)
    assert f"━━ {branch}" in pane.text(), "the branch is drawn over its parent's history"

    # q: saves first, then exits 0
    pane.send("q")
    pane.wait_for(r"EXIT=0", 60)
    newest = store.run(new_run).checkpoints[-1]
    assert newest.valid and newest.step > record["parent"]["step"]
    assert json.loads((store.run_dir(new_run) / "run.json").read_text())["status"] == "paused"


@pytest.mark.slow
def test_quitting_leaves_one_line_saying_where_the_run_paused(pane: Pane, tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    store = RunStore(tmp_path / "runs")
    pane.start(train_argv(tiny, "demo", train__max_steps=100_000, checkpoint__every_steps=0))
    pane.wait_for(lambda s: "Running" in status_line(s) and status_step(s) >= 3, 90)
    pane.send("q")
    screen = pane.wait_for(r"EXIT=0", 60)
    newest = store.run("demo").newest
    assert newest is not None and newest.valid
    line = f"demo paused at step {newest.step}: runs/demo/checkpoints/{newest.path.name}"
    assert [row.strip() for row in screen.splitlines() if row.strip()][-2:] == [line, "EXIT=0"], screen


@pytest.mark.slow
def test_e2e_closed_terminal_saves_and_exits(pane: Pane, tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """An SSH drop (SIGHUP to the app when tmux goes away) pauses with a checkpoint and ends the process."""
    store = RunStore(tmp_path / "runs")
    pane.start(train_argv(tiny, "hup", train__max_steps=100_000, checkpoint__every_steps=0))
    pane.wait_for(lambda s: "Running" in status_line(s) and status_step(s) >= 3, 90)
    apps = [
        p
        for p in psutil.process_iter(["cmdline", "cwd"])
        if p.info["cwd"] == str(tmp_path) and "hup" in (p.info["cmdline"] or []) and "train" in p.info["cmdline"]
    ]
    assert apps, "the app process was not found"
    pane.close()  # kill-server: the pane's processes get SIGHUP
    _, alive = psutil.wait_procs(apps, timeout=60)
    assert not alive, f"the app lingers after its terminal closed: {alive}"
    checkpoints = store.run("hup").checkpoints
    assert checkpoints and checkpoints[-1].valid
    verify_checkpoint(checkpoints[-1].path)
    assert json.loads((store.run_dir("hup") / "run.json").read_text())["status"] == "paused"


# ---------------------------------------------------------------- measurements (-m benchmark)


@pytest.mark.benchmark
def test_measure_time_to_first_frame(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """Launch -> first frame on screen, for `open` (browse) and `train` (before torch is imported)."""
    results = {}
    for label, argv in (
        ("open", [*tui_trainer_command(), "open"]),
        ("train", train_argv(tiny, "ttff", train__max_steps=100_000)),
    ):
        times = []
        for i in range(5):
            cwd = tmp_path / f"{label}{i}"
            cwd.mkdir()
            pane = Pane(cwd)
            try:
                started = pane.start(argv)
                pane.wait_for(r"Runs", 30, poll=0.005)
                times.append(time.monotonic() - started)
                if label == "train":
                    pane.wait_for(r"Running", 90)
            finally:
                pane.close()
        results[label] = times
        print(f"\ntime to first frame, tui-trainer {label}: median {statistics.median(times):.3f}s  {times}")


@pytest.mark.benchmark
def test_measure_pause_acknowledgement(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """`p` sent to the terminal (tmux send-keys) -> "Pausing after step N" written to the terminal, while
    training flat out (a fresh run each time). Read from the pane's output stream (pipe-pane)."""
    latencies = []
    for i in range(int(os.environ.get("TUI_TRAINER_BENCH_REPEATS", "8"))):
        cwd = tmp_path / f"p{i}"
        cwd.mkdir()
        pane = Pane(cwd)
        try:
            pane.start(train_argv(tiny, "lat", train__max_steps=100_000, checkpoint__every_steps=0))
            pane.wait_for(lambda s: "Running" in status_line(s) and status_step(s) > 0, 90)
            time.sleep(1.0)  # a steady state
            offset = pane.output_size()
            sent = time.monotonic()
            pane.send("p")
            latencies.append(pane.wait_for_output("Pausing after step", offset, 5) - sent)
            pane.wait_for(r"Paused\s", 60)
        finally:
            pane.close()
    ms = [round(x * 1000, 1) for x in latencies]
    print(
        f"\np -> 'Pausing after step' written to the terminal: "
        f"median {statistics.median(ms)} ms, max {max(ms)} ms  {ms}"
    )


def steady_tokens_per_s(metrics: Path, skip: int = 50) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "time" in r][skip:]
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["time"] - rows[0]["time"])


@pytest.mark.benchmark
def test_measure_throughput_app_vs_headless(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """Same config, alternating app (in tmux, 120x40) and headless runs; tokens/s over the steady part.

    TUI_TRAINER_BENCH_STEPS (default 600) and TUI_TRAINER_BENCH_MODEL=demo pick the run; OMP_NUM_THREADS
    is passed to both sides."""
    steps = int(os.environ.get("TUI_TRAINER_BENCH_STEPS", "600"))
    extra: dict[str, object] = {"train__max_steps": steps, "checkpoint__every_steps": 0, "train__eval_every": 0}
    if os.environ.get("TUI_TRAINER_BENCH_MODEL") == "demo":  # the default model (4 x 128, block 128, batch 16)
        extra.update(
            model__n_layer=4,
            model__n_head=4,
            model__n_embd=128,
            model__block_size=128,
            train__batch_size=16,
            model__vocab_size=4096,
        )
    app, headless = [], []
    for i in range(3):
        cwd = tmp_path / f"app{i}"
        cwd.mkdir()
        pane = Pane(cwd)
        try:
            pane.start(train_argv(tiny, "bench", **extra))
            pane.wait_for(r"Finished", 600, poll=0.5)
        finally:
            pane.close()
        app.append(steady_tokens_per_s(cwd / "runs" / "bench" / "metrics.jsonl", skip=max(5, steps // 10)))
        cwd = tmp_path / f"headless{i}"
        cwd.mkdir()
        subprocess.run([*train_argv(tiny, "bench", **extra), "--headless"], cwd=cwd, check=True, capture_output=True)
        headless.append(steady_tokens_per_s(cwd / "runs" / "bench" / "metrics.jsonl", skip=max(5, steps // 10)))
    ratio = statistics.median(app) / statistics.median(headless)
    print(
        f"\nthroughput tokens/s: app {[round(x) for x in app]}  headless {[round(x) for x in headless]}"
        f"  ratio (medians) {ratio:.3f}"
    )
