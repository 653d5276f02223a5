"""Attaching the app to a run another process trains (`tui-trainer attach`), and the app's own run serving
the control channel. Real processes, real sockets, the real app through Pilot."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from faults_support import Proc, cli, sets
from support.app import NOW, fixed_probe, wait_for, write_run
from support.tmux import TMUX, Pane
from support.waiting import wait_for as wait_sync
from textual.widgets import Input, Static

from tui_trainer.control.live import connect_live, live_runs
from tui_trainer.control.protocol import LINK_NAME, event_from_record, event_record
from tui_trainer.control.server import ControlServer
from tui_trainer.core.config import Config, load_config
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import (
    CheckpointSaved,
    DataProgress,
    DeviceSample,
    EvalLogged,
    Failed,
    FaultKind,
    Notice,
    State,
    StateChanged,
    StepLogged,
)
from tui_trainer.core.launch import plan_argv
from tui_trainer.core.plan import plan_branch, plan_resume, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint, write_json_atomic
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.remote import RemoteSession
from tui_trainer.tui.screens.branch import BranchScreen
from tui_trainer.tui.widgets.run_tree import NodeRef

SIZE = (120, 40)
TIMEOUT = 90.0


def long_run(tiny: Any) -> list[str]:
    """A schedule far longer than any test: only a pause ends the run."""
    return tiny(train__max_steps=100_000, train__eval_every=0, checkpoint__every_steps=0)


def headless(tmp_path: Path, tiny: Any, name: str = "h") -> tuple[RunStore, Proc]:
    store = RunStore(tmp_path / "runs")
    proc = Proc(["train", "--run", name, "--headless", "--runs-dir", str(store.root), *sets(long_run(tiny))], tmp_path)
    # the link appears once the trainer holds the run's lock and left Starting
    wait_sync(lambda: (store.run_dir(name) / LINK_NAME).is_symlink() or not proc.alive(), TIMEOUT, "the socket link")
    assert proc.alive(), proc.stderr
    return store, proc


def attached_app(store: RunStore, run: str | None = None) -> TrainerApp:
    return TrainerApp(store.root, probe=fixed_probe, strict=True, remote=connect_live(store, run))


def status_text(app: TrainerApp) -> str:
    return app.main.status.text().plain


def q_says(app: TrainerApp) -> str:
    """What the footer calls the q key."""
    return app.screen.active_bindings["q"].binding.description


def curve_len(app: TrainerApp) -> int:
    curves = app.main.plot.curves
    return len(curves.loss) if curves is not None else 0


def test_every_event_survives_the_wire() -> None:
    events = [
        StateChanged("r", State.PAUSING, 7, "saving"),
        StepLogged("r", 3, math.nan, 1e-3, 96, 9000.0, 0.01, 100, math.inf),
        EvalLogged("r", 5, 2.5),
        CheckpointSaved("r", 4, "/x/step-4", 0.1, 1234, 0.02),
        DeviceSample("r", "cpu", "this process", rss_bytes=5, notes=("a", "b")),
        DataProgress("r", "tokenizing", 3, None),
        Notice("r", "careful"),
        Failed("r", 9, "disk full", FaultKind.DISK),
    ]
    for event in events:
        wire = json.loads(json.dumps(event_record(event), allow_nan=False))
        back = event_from_record(wire)
        assert type(back) is type(event)
        assert repr(back) == repr(event)  # repr: NaN compares unequal to itself
    assert isinstance(event_from_record(json.loads(json.dumps(event_record(events[0])))).state, State)
    assert event_from_record({"event": "FromTheFuture", "x": 1}) is None
    assert event_from_record({"event": "StepLogged", "run": "r"}) is None  # fields missing


@pytest.mark.slow
async def test_the_app_serves_its_own_run_to_pause_and_status(tmp_path: Path, tiny: Any) -> None:
    store = RunStore(tmp_path / "runs")
    plan = plan_train(store, load_config(None, long_run(tiny)), "own")
    app = TrainerApp(store.root, plan, probe=fixed_probe, strict=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.main.state == State.RUNNING, TIMEOUT, "Running")
        result: dict[str, Any] = {}

        def commands() -> None:  # the CLI blocks until the checkpoint lands: not on the app's loop
            result["status"] = cli("status", "own", "--json", "--runs-dir", str(store.root), cwd=tmp_path)
            result["pause"] = cli("pause", "own", "--json", "--runs-dir", str(store.root), cwd=tmp_path)

        thread = threading.Thread(target=commands)
        thread.start()
        await wait_for(pilot, lambda: not thread.is_alive(), TIMEOUT, "the CLI commands")
        status = json.loads(result["status"].stdout)
        assert status["live"] is True and status["state"] == "Running" and status["run"] == "own"
        assert result["pause"].returncode == 0, result["pause"].stderr
        paused = json.loads(result["pause"].stdout)
        await wait_for(pilot, lambda: app.main.state == State.PAUSED, TIMEOUT, "Paused on screen")
        assert f"paused at step {paused['step']}" in status_text(app)
        verify_checkpoint(Path(paused["checkpoint"]))
        await wait_for(pilot, lambda: not app.main.live, TIMEOUT, "the worker to end")
        assert not (store.run_dir("own") / LINK_NAME).is_symlink()  # the channel went with the run


def test_attach_names_the_problem_in_one_line(tmp_path: Path, tiny: Any) -> None:
    runs = str(tmp_path / "runs")
    none = cli("attach", "--runs-dir", runs, cwd=tmp_path)
    assert none.returncode == 2 and "no live run" in none.stderr and len(none.stderr.splitlines()) == 1
    missing = cli("attach", "nope", "--runs-dir", runs, cwd=tmp_path)
    assert missing.returncode == 2 and "no run named 'nope'" in missing.stderr


@pytest.mark.slow
def test_attach_without_a_terminal_is_refused_in_one_line_and_the_run_trains_on(tmp_path: Path, tiny: Any) -> None:
    """Issue 19: `attach` from a pipe painted the full-screen app into it forever (2.5 MB of escape codes in ten
    minutes). A live run is named, then refused in one line, exit 2; the run goes on."""
    store, proc = headless(tmp_path, tiny)
    try:
        out = cli("attach", "h", "--runs-dir", str(store.root), cwd=tmp_path, timeout=60)  # stdin/stdout: pipes
        assert out.returncode == 2 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1, out.stderr  # stdout is a pipe (stdin may be pytest's terminal)
        assert out.stderr.startswith("tui-trainer: error: tui-trainer attach opens the full-screen app, which needs")
        assert out.stderr.endswith("not one (tui-trainer status h prints how the run goes)\n"), out.stderr
        assert proc.alive() and _status(tmp_path, store)["live"]
    finally:
        proc.kill()


def _status(tmp_path: Path, store: RunStore, run: str = "h") -> dict[str, Any]:
    out = cli("status", run, "--json", "--runs-dir", str(store.root), cwd=tmp_path)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- in a real terminal


def tui_trainer_argv(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "tui-trainer"
    return [
        str(script) if script.exists() else sys.executable,
        *([] if script.exists() else ["-m", "tui_trainer"]),
        *args,
    ]


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
def test_app_detach_survives_the_terminal_closing_and_attach_pauses_it(tmp_path: Path, tiny: Any) -> None:
    store = RunStore(tmp_path / "runs")
    first = Pane(tmp_path)
    try:
        first.start(
            tui_trainer_argv("train", "--run", "d", "--detach", "--runs-dir", str(store.root), *sets(long_run(tiny)))
        )
        first.wait_for(r"Running.*step \d+", TIMEOUT)
        first.wait_for(r"q Detach", 5)
    finally:
        first.close()  # SIGHUP to the app, as when the terminal closes
    step = _status(tmp_path, store, "d")["step"]
    wait_sync(lambda: _status(tmp_path, store, "d")["step"] > step + 10, TIMEOUT, "the run to train on")

    second = Pane(tmp_path)
    try:
        second.start(tui_trainer_argv("attach", "--runs-dir", str(store.root)))
        second.wait_for(r"Running.*step \d+", TIMEOUT)
        second.send("p")
        screen = second.wait_for(r"paused .*newest valid checkpoint d@\d+", TIMEOUT)
        promised = int(re.search(r"d@(\d+)", screen).group(1))  # type: ignore[union-attr]
        verify_checkpoint(store.checkpoint_dir("d", promised))
        assert _status(tmp_path, store, "d")["live"] is False
    finally:
        second.close()


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
def test_detaching_leaves_one_line_saying_how_to_attach_again(tmp_path: Path, tiny: Any) -> None:
    store = RunStore(tmp_path / "runs")
    pane = Pane(tmp_path)
    try:
        pane.start(
            tui_trainer_argv("train", "--run", "big", "--detach", "--runs-dir", str(store.root), *sets(long_run(tiny)))
        )
        pane.wait_for(r"Running.*step \d+", TIMEOUT)
        pane.send("q")
        screen = pane.wait_for(r"EXIT=0", 30)
        rows = [row.strip() for row in screen.splitlines() if row.strip()]
        assert rows[-2:] == ["big keeps training: tui-trainer attach big", "EXIT=0"], screen
        assert _status(tmp_path, store, "big")["live"] is True
    finally:
        pane.close()
        cli("pause", "big", "--runs-dir", str(store.root), cwd=tmp_path)
    wait_sync(lambda: not _status(tmp_path, store, "big")["live"], TIMEOUT, "the background run to pause")


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
async def test_two_attached_apps_see_one_pause(tmp_path: Path, tiny: Any) -> None:
    store, proc = headless(tmp_path, tiny)
    pane = Pane(tmp_path)
    try:
        pane.start(tui_trainer_argv("attach", "h", "--runs-dir", str(store.root)))
        pane.wait_for(r"Running.*step \d+", TIMEOUT)
        app = attached_app(store, "h")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.main.state == State.RUNNING, TIMEOUT, "Running")
            await pilot.press("p")
            await wait_for(pilot, lambda: app.main.state == State.PAUSED, TIMEOUT, "Paused here")
            pane.wait_for(r"Paused.*\n?.*paused \(pid", TIMEOUT)  # and on the other app
        assert proc.wait(TIMEOUT) == 0
    finally:
        pane.close()
        proc.kill()


@pytest.mark.slow
async def test_attach_shows_a_headless_run_p_pauses_it_and_r_resumes_it_in_the_background(
    tmp_path: Path, tiny: Any
) -> None:
    store, proc = headless(tmp_path, tiny)
    pids: list[int] = []
    try:
        app = attached_app(store)  # RUN omitted: the only live one
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.main.state == State.RUNNING, TIMEOUT, "Running")
            await wait_for(pilot, lambda: curve_len(app) >= 3, TIMEOUT, "a curve")
            first = curve_len(app)
            await wait_for(pilot, lambda: curve_len(app) > first + 3, TIMEOUT, "the curve to grow")
            assert "h" in status_text(app) and "Running" in status_text(app)
            assert q_says(app) == "Detach"

            await pilot.press("p")
            seen: list[str] = []

            def promised_or_ended() -> bool:
                # a tiny run can pause before the promise's message is drawn: then the final line names the step
                if "Pausing after step" in status_text(app):
                    seen.append(status_text(app))
                return bool(seen) or not app.main.live

            await wait_for(pilot, promised_or_ended, TIMEOUT, "the promised step")
            await wait_for(pilot, lambda: not app.main.live, TIMEOUT, "the run to end")
            assert app.main.state == State.PAUSED
            final = status_text(app).split("newest valid checkpoint h@")[1]
            promised = int(re.match(r"\d+", final).group(0))  # type: ignore[union-attr]
            if seen:
                assert seen[0].split("Pausing after step ")[1].startswith(f"{promised}…"), (seen, final)
            assert f"newest valid checkpoint h@{promised}" in status_text(app), status_text(app)
            assert q_says(app) == "Quit"  # stays open for browsing; q now just quits
            assert proc.wait(TIMEOUT) == 0, proc.stderr
            verify_checkpoint(store.checkpoint_dir("h", promised))
            newest = store.run("h").newest
            assert newest is not None and newest.step == promised

            # r from an attached app: the resumed run trains in a background process of its own
            tree = app.main.runs_tree
            tree.move_cursor(tree._by_ref[NodeRef("h", promised)])
            await pilot.pause()
            await pilot.press("r")
            attached = lambda: app.main.live and app.main.training.attached  # noqa: E731
            await wait_for(pilot, attached, TIMEOUT, "attached to the resumed run")
            session = app.main.session
            assert isinstance(session, RemoteSession) and session.pid != os.getpid()
            pids.append(int(session.pid))  # type: ignore[arg-type]
            await wait_for(pilot, lambda: (session.last_step or newest).step > promised, TIMEOUT, "new steps")
            await pilot.press("q")  # detach: the resumed run goes on
        assert _status(tmp_path, store)["live"] is True
        assert cli("pause", "h", "--runs-dir", str(store.root), cwd=tmp_path).returncode == 0
    finally:
        proc.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_q_detaches_open_finds_the_run_a_reattaches_and_a_killed_process_is_lost(
    tmp_path: Path, tiny: Any
) -> None:
    store, proc = headless(tmp_path, tiny)
    try:
        app = attached_app(store, "h")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: curve_len(app) >= 3, TIMEOUT, "a curve")
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running, 10, "the app to close")
        assert app.return_code == 0
        step = _status(tmp_path, store)["step"]
        wait_sync(lambda: _status(tmp_path, store)["step"] > step + 5, TIMEOUT, "the run to keep training")
        assert cli("save", "h", "--runs-dir", str(store.root), cwd=tmp_path).returncode == 0  # one to point at

        browser = TrainerApp(store.root, probe=fixed_probe, strict=True)  # tui-trainer open
        async with browser.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "h" in browser.main.browse.others_live, TIMEOUT, "the live run to be found")
            await wait_for(pilot, lambda: "training elsewhere: h step" in status_text(browser), 5, "it said so")
            tree = browser.main.runs_tree
            assert "running" in tree._by_ref[NodeRef("h")].label.plain
            tree.move_cursor(tree._by_ref[NodeRef("h")])
            await pilot.pause()
            await pilot.press("a")
            await wait_for(pilot, lambda: browser.main.state == State.RUNNING, TIMEOUT, "Running")
            # metrics.jsonl gives everything before we came, the channel the rest
            await wait_for(pilot, lambda: curve_len(browser) > step, TIMEOUT, "the whole history")
            curves = browser.main.plot.curves
            assert curves is not None and curves.loss.x[0] <= 2
            assert q_says(browser) == "Detach"

            os.kill(proc.pid, signal.SIGKILL)
            await wait_for(pilot, lambda: not browser.main.live, TIMEOUT, "the channel to close")
            newest = store.run("h").newest
            assert newest is not None
            text = status_text(browser)
            assert "lost" in text and f"h@{newest.step}" in text, text
            assert browser.is_running  # stays open for browsing
    finally:
        proc.kill()


class _Idle:
    """A control surface with nothing behind it: enough for a server to be found and greeted."""

    def pause(self) -> int:
        return 0

    def save_now(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_attach_without_a_name_lists_the_live_runs_when_there_are_several(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    servers = []
    try:
        for name, step in (("a", 3), ("b", 5)):
            store.create_run(name, Config().to_dict(), None)
            server = ControlServer(store.run_dir(name), _Idle())
            server.start()
            server.publish(StateChanged(name, State.RUNNING, step))  # the link appears once it runs
            servers.append(server)
        wait_sync(lambda: len(live_runs(store)) == 2, 10, "both servers to be found")
        with pytest.raises(UserError, match=r"2 live runs in .*: name one \(a \(step 3\), b \(step 5\)\)"):
            connect_live(store, None)
        client = connect_live(store, "b")
        assert client.hello["run"] == "b"
        client.close()
    finally:
        for server in servers:
            server.close()


def test_a_branch_plan_becomes_the_command_line_that_plans_it_again(tmp_path: Path) -> None:
    """r / b from an attached app start `tui-trainer <argv> --headless` in the background: the child must
    train exactly the plan the dialog made (same name, start, and every changed key)."""
    store = RunStore(tmp_path / "runs")
    write_run(store, "base", created=NOW, steps=range(1, 101), checkpoints=[50, 100])
    plan = plan_branch(store, "base@50", "low", ["optim.lr=0.0001", "train.max_steps=900", "train.precision='fp32'"])
    argv = plan_argv(store, plan)
    assert argv[:4] == ["branch", "base@50", "--name", "low"]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "optim.lr=0.0001" in overrides and "train.max_steps=900" in overrides
    again = plan_branch(store, argv[1], argv[3], overrides)
    assert again.config.to_dict() == plan.config.to_dict() and again.parent == plan.parent == ("base", 50)
    assert plan_argv(store, plan_resume(store, "base"))[:2] == ["resume", "base"]


def test_an_attached_resume_of_a_data_parallel_run_goes_on_with_as_many_ranks(tmp_path: Path) -> None:
    """r on a 2-rank run's checkpoint from an attached app: the background job runs on 2 ranks again (so
    it continues the run in place), not on one (which would branch it)."""
    store = RunStore(tmp_path / "runs")
    write_run(store, "dp", created=NOW, steps=range(1, 101), checkpoints=[50, 100])
    record = store.read_record("dp")
    write_json_atomic(store.run_dir("dp") / "run.json", {**record, "world_size": 2})
    plan = plan_resume(store, "dp", world_size=store.run("dp").world_size)
    assert not plan.new_run and plan.world_size == 2
    argv = plan_argv(store, plan)
    assert argv[:2] == ["resume", "dp"] and argv[argv.index("--nproc") + 1] == "2"
    assert plan_resume(store, "dp").new_run, "on one rank the same resume is a branch"


async def test_an_attached_branch_of_a_data_parallel_run_asks_for_its_ranks(tmp_path: Path) -> None:
    """b on a 2-rank run's checkpoint from an attached app: the dialog has a ranks field set to 2, refuses a
    count that is not one, and its plan carries the ranks into the background job's command line."""
    store = RunStore(tmp_path / "runs")
    write_run(store, "dp", created=NOW, steps=range(1, 101), checkpoints=[50, 100])
    record = store.read_record("dp")
    write_json_atomic(store.run_dir("dp") / "run.json", {**record, "world_size": 2})
    app = TrainerApp(store.root, probe=fixed_probe, strict=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: NodeRef("dp", 100) in app.main.runs_tree._by_ref, TIMEOUT, "the tree")
        app.main.runs_tree.move_cursor(app.main.runs_tree._by_ref[NodeRef("dp", 100)])
        await pilot.press("b")  # browsing in this process: the branch trains here, on one process
        await wait_for(pilot, lambda: isinstance(app.screen, BranchScreen), TIMEOUT, "the branch dialog")
        assert not app.screen.query("#ranks")
        await pilot.press("escape")
        app.main.lifecycle.detached_mode = True  # what attaching to a background run sets
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, BranchScreen), TIMEOUT, "the branch dialog")
        dialog = app.screen
        ranks = dialog.query_one("#ranks", Input)
        assert ranks.value == "2"
        ranks.value = "two"
        await pilot.press("enter")
        await pilot.pause()
        assert "ranks: 'two' is not a number of processes" in str(dialog.query_one("#branch-error", Static).render())
        await pilot.press("escape")
        # the dialog's own start path (enter, the plan verified on a worker) returns a plan on 4 ranks
        plans: list[Any] = []
        ckpt = store.run("dp").newest
        assert ckpt is not None
        dialog = BranchScreen(store, ckpt, store.run("dp").config, ranks=2)
        app.push_screen(dialog, plans.append)
        await wait_for(pilot, lambda: app.screen is dialog and bool(dialog.query("#ranks")), TIMEOUT, "the dialog")
        dialog.query_one("#ranks", Input).value = "4"
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(plans), TIMEOUT, "the plan")
        assert plans[0].world_size == 4 and plans[0].parent == ("dp", 100)
        argv = plan_argv(store, plans[0])
        assert argv[0] == "branch" and argv[argv.index("--nproc") + 1] == "4"


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
def test_nproc_on_a_terminal_opens_the_app_on_rank_0_and_p_pauses_every_rank(tmp_path: Path, tiny: Any) -> None:
    store = RunStore(tmp_path / "runs")
    pane = Pane(tmp_path)
    try:
        argv = ["train", "--name", "dp", "--nproc", "2", "--runs-dir", str(store.root), *sets(long_run(tiny))]
        pane.start(tui_trainer_argv(*argv))
        pane.wait_for(r"Running.*step \d+", TIMEOUT)
        pane.wait_for(r"q Detach", 5)  # the job trains in the background: q would leave it training
        pane.send("p")
        screen = pane.wait_for(r"paused .*newest valid checkpoint dp@\d+", TIMEOUT)
        promised = int(re.search(r"dp@(\d+)", screen).group(1))  # type: ignore[union-attr]
    finally:
        pane.close()
    verify_checkpoint(store.checkpoint_dir("dp", promised))
    assert store.run("dp").world_size == 2
    wait_sync(lambda: not _status(tmp_path, store, "dp")["live"], TIMEOUT, "the job to end")
    # rank 1 paused on the step rank 0 promised (its one line goes to the job's log)
    log = (store.run_dir("dp") / "train.log").read_text(errors="replace")
    assert f"rank 1: paused dp at step {promised}" in log.lower(), log[-2000:]


async def test_a_on_a_run_that_stopped_meanwhile_says_so_and_the_app_goes_on_browsing(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    store.create_run("gone", Config().to_dict(), None)
    server = ControlServer(store.run_dir("gone"), _Idle())
    server.start()
    server.publish(StateChanged("gone", State.RUNNING, 3))
    app = TrainerApp(store.root, probe=fixed_probe, strict=True)  # tui-trainer open
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "gone" in app.main.browse.others_live, TIMEOUT, "the live run to be found")
            server.close()  # it ends between the tree's look and the key
            tree = app.main.runs_tree
            tree.move_cursor(tree._by_ref[NodeRef("gone")])
            await pilot.pause()
            await pilot.press("a")
            error = app.main.query_one("#error")
            await wait_for(pilot, lambda: "gone is not training any more" in str(error.content), 10, "the reason")
            assert not app.main.live and app.main.lifecycle.doing(Job.CONNECTING) is None and app.is_running
    finally:
        server.close()
