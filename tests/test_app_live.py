"""Pilot tests that drive the real engine on a tiny model: every key that acts on a live run."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from faults_support import install
from support.app import fixed_probe, wait_for
from textual.widgets import Input

from tui_trainer.core.config import load_config
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_branch, plan_train
from tui_trainer.core.store import RunStore, verify_checkpoint
from tui_trainer.engine.faults import Hooks
from tui_trainer.engine.trainer import Trainer
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.screens.branch import BranchScreen
from tui_trainer.tui.widgets.run_tree import NodeRef

SIZE = (120, 40)
TIMEOUT = 90.0  # generous: the first test in a process also imports torch


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return RunStore(tmp_path / "runs")


def start_app(store: RunStore, tiny, name: str = "live", until_step: int | None = None, **extra: object):  # type: ignore[no-untyped-def]
    plan = plan_train(store, load_config(None, tiny(**extra)), name)
    return TrainerApp(store.root, plan, until_step, probe=fixed_probe, strict=True)


def record_status(app: TrainerApp) -> list[str]:
    """Every text the status line shows, in order (wraps its redraw)."""
    seen: list[str] = []
    status = app.main.status
    redraw = status._redraw

    def spy() -> None:
        seen.append(status.text().plain)
        redraw()

    status._redraw = spy  # type: ignore[method-assign]
    return seen


def steps_done(app: TrainerApp) -> int:
    last = app.main.session.last_step if app.main.session else None
    return last.step if last else 0


async def test_live_run_plots_and_pause_is_acknowledged_then_saves(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=0, train__eval_every=4)
    async with app.run_test(size=SIZE) as pilot:
        seen = record_status(app)
        await wait_for(pilot, lambda: steps_done(app) >= 8 and app.main.state == "Running", TIMEOUT, "8 steps")
        await wait_for(pilot, lambda: app.main.plot.curves is not None, 10, "the live curve")
        assert app.main.plot.curves is not None and app.main.plot.curves.run == "live"
        curves = app.main.plot.curves
        await wait_for(pilot, lambda: len(curves.loss) >= 8 and len(curves.eval) > 0, 10, "points on the plot")
        await wait_for(pilot, lambda: app.main.plot.points_drawn > 0, 10, "a plot redraw")
        assert app.main.runs_tree.selected == NodeRef("live")
        device = app.main.device.text().plain
        assert "no GPU" in device and "tok/s" in device and "ms/step" in device
        status = app.main.status.text().plain
        assert "Running" in status and "live" in status and "loss" in status and "tok/s" in status
        assert app.main.check_action("pause", ()) is True and app.main.check_action("resume", ()) is None

        await pilot.press("p")
        await wait_for(pilot, lambda: not app.main.live, TIMEOUT, "the pause to finish")
        pausing = [s for s in seen if "Pausing after step" in s]
        assert pausing, seen
        promised = int(pausing[0].split("Pausing after step ")[1].split("…")[0])
        assert app.main.state == "Paused"
        step = int(app.main.status.text().plain.split("paused at step ")[1].split(";")[0])
        assert step == promised, "the step announced at once is the step that was saved"
        assert seen.index(pausing[0]) < next(i for i, s in enumerate(seen) if s.lstrip().startswith("Paused"))
        ckpt = store.checkpoint_dir("live", step)
        verify_checkpoint(ckpt)  # deep: the checksum of every file
        assert json.loads((store.run_dir("live") / "run.json").read_text())["status"] == "paused"
        assert NodeRef("live", step) in app.main.runs_tree._by_ref
        assert app.main.check_action("resume", ()) is True and app.main.check_action("pause", ()) is None


async def test_resume_older_checkpoint_branches_and_newest_continues(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, until_step=8, train__max_steps=12, checkpoint__every_steps=4)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.main.state == "Paused" and not app.main.live, TIMEOUT, "pause at step 8")
        assert [c.step for c in store.run("live").checkpoints] == [4, 8]

        assert app.main.runs_tree.select_ref(NodeRef("live", 4))
        await pilot.press("r")
        await wait_for(
            pilot, lambda: app.main.state == "Finished" and not app.main.live, TIMEOUT, "the branch to finish"
        )
        branch = store.run("live-from4")
        assert branch.parent == ("live", 4)
        assert [c.data for c in app.main.runs_tree._by_ref[NodeRef("live", 4)].children] == [NodeRef("live-from4")]
        assert [c.step for c in store.run("live").checkpoints] == [4, 8], "the original run is untouched"
        await wait_for(pilot, lambda: app.main.browse.history.get("live-from4") is not None, 10, "the branch's curve")
        curves = app.main.browse.history.get("live-from4")
        assert curves.own_from == 4 and curves.branch_points == [("live", 4)]

        assert app.main.runs_tree.select_ref(NodeRef("live"))  # a run line means its newest checkpoint: live@8
        await pilot.press("r")
        await wait_for(pilot, lambda: app.main.state == "Finished" and not app.main.live, TIMEOUT, "live to finish")
        assert store.run("live").checkpoints[-1].step == 12
        assert sorted(store.run_names()) == ["live", "live-from4"]


async def test_branch_dialog_starts_a_run_with_the_new_lr(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, until_step=4, train__max_steps=8, checkpoint__every_steps=4)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.main.state == "Paused" and not app.main.live, TIMEOUT, "pause at step 4")
        app.main.runs_tree.select_ref(NodeRef("live", 4))
        await pilot.press("b")
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        dialog.query_one("#name", Input).value = "slow"
        dialog.query_one("#lr", Input).value = ""
        dialog.query_one("#lr", Input).focus()
        await pilot.press(*"0.0005", "enter")
        await wait_for(pilot, lambda: app.main.session is not None and app.main.session.run_name == "slow", 10, "start")
        await wait_for(
            pilot, lambda: app.main.state == "Finished" and not app.main.live, TIMEOUT, "the branch to finish"
        )
        record = json.loads((store.run_dir("slow") / "run.json").read_text())
        assert record["parent"] == {"run": "live", "step": 4}
        assert record["config"]["optim"]["lr"] == 0.0005
        lrs = [r["lr"] for r in store.metrics("slow") if "lr" in r]
        assert lrs and max(lrs) <= 0.0005
        await wait_for(
            pilot, lambda: app.main.plot.curves is not None and app.main.plot.curves.run == "slow", 10, "plot"
        )
        assert app.main.plot.curves.own_from == 4  # drawn over live's first 4 steps


async def test_save_now_then_generate_a_sample(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: steps_done(app) >= 3, TIMEOUT, "3 steps")
        await pilot.press("s")
        await wait_for(pilot, lambda: bool(store.run("live").checkpoints), 30, "a checkpoint from s")
        saved = store.run("live").checkpoints[0].step
        assert app.main.live, "save-now keeps training"
        await pilot.press("p")
        await wait_for(pilot, lambda: not app.main.live, TIMEOUT, "pause")
        app.main.runs_tree.select_ref(NodeRef("live", saved))
        await pilot.press("g")
        await wait_for(pilot, lambda: app.main.lifecycle.doing(Job.GENERATING) is None, TIMEOUT, "the sample")
        text = app.main.sample.text
        assert text and "could not" not in text and "generating" not in text
        assert f"live@{saved}" in str(app.main.sample.border_title)


async def test_quit_while_training_saves_first(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: steps_done(app) >= 3, TIMEOUT, "3 steps")
        await pilot.press("q")
        assert app.main.lifecycle.quitting
        await wait_for(pilot, lambda: app.return_code is not None, TIMEOUT, "exit")
    assert app.return_code == 0
    ckpts = store.run("live").checkpoints
    assert ckpts and ckpts[-1].valid
    assert json.loads((store.run_dir("live") / "run.json").read_text())["status"] == "paused"


async def test_ctrl_c_saves_and_quits_like_q(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: steps_done(app) >= 3, TIMEOUT, "3 steps")
        await pilot.press("ctrl+c")
        assert app.main.lifecycle.quitting
        await wait_for(pilot, lambda: app.return_code is not None, TIMEOUT, "exit")
    assert app.return_code == 0
    ckpts = store.run("live").checkpoints
    assert ckpts and ckpts[-1].valid and ckpts[-1].step >= 3
    assert store.read_record("live")["status"] == "paused"


async def test_a_second_ctrl_c_quits_without_waiting_for_the_save(store: RunStore, tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def slow_pause_save(step: int, blocking: bool) -> None:
        if blocking:  # the pause's save (periodic ones are not blocking): a big model takes a while
            release.wait(TIMEOUT)

    install(monkeypatch, Hooks(before_save=slow_pause_save))
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: steps_done(app) >= 3, TIMEOUT, "3 steps")
        await pilot.press("ctrl+c")
        assert app.main.lifecycle.quitting and app.return_code is None  # saving first
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.return_code is not None, 5, "exit at once")
    assert app.abandoned and app.return_code == 130
    release.set()
    assert app.main.session is not None and app.main.session.finished.wait(TIMEOUT)
    assert all(c.valid for c in store.run("live").checkpoints)  # whatever was saved is whole


async def test_a_diverged_loss_pauses_and_offers_a_lower_lr_branch(store: RunStore, tiny) -> None:  # type: ignore[no-untyped-def]
    overrides = tiny(optim__min_lr=0.0, optim__warmup_steps=0, optim__grad_clip=0.0, checkpoint__every_steps=1)
    plan = plan_train(store, load_config(None, overrides), "live")
    plan.config.optim.lr = 1e30  # config validation refuses this lr; set past it so the model really diverges
    app = TrainerApp(store.root, plan, None, probe=fixed_probe, strict=True)
    async with app.run_test(size=SIZE) as pilot:
        # The worker's divergence event pushes the dialog; wait until it has mounted its fields, not just been pushed.
        await wait_for(
            pilot, lambda: isinstance(app.screen, BranchScreen) and app.screen.is_mounted, TIMEOUT, "the branch dialog"
        )
        assert app.main.state == "Paused"
        banner = str(app.main.query_one("#error").content)
        assert "Paused at step 2" in banner and "nan" in banner
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        assert dialog.checkpoint.ref == "live@1"  # the last good checkpoint; nothing diverged was saved
        assert float(dialog.query_one("#lr", Input).value) == 5e29
        assert "non-finite at step 2" in str(dialog.query_one("#branch-error").content)
        await pilot.press("escape")
        await pilot.pause()
        assert [c.step for c in store.run("live").checkpoints] == [1]
        assert app.main.check_action("resume", ()) is True and app.main.check_action("branch", ()) is True


async def test_a_branch_diverging_before_its_first_checkpoint_offers_its_parent_checkpoint(  # type: ignore[no-untyped-def]
    store: RunStore, tiny
) -> None:
    parent = plan_train(store, load_config(None, tiny(optim__warmup_steps=0)), "p")
    assert Trainer(store, parent, until_step=2).run() == State.PAUSED
    hot = plan_branch(store, "p@2", "hot", ["optim.min_lr=0.0", "optim.grad_clip=0.0"])
    hot.config.optim.lr = 1e30  # config validation refuses this lr; set past it so the branch really diverges
    app = TrainerApp(store.root, hot, probe=fixed_probe, strict=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(
            pilot, lambda: isinstance(app.screen, BranchScreen) and app.screen.is_mounted, TIMEOUT, "the branch dialog"
        )
        banner = str(app.main.query_one("#error").content)
        assert "last good checkpoint (p@2, where this branch started)" in banner, banner
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        assert dialog.checkpoint.ref == "p@2"  # the branch saved nothing: its parent's checkpoint is the good one
        assert float(dialog.query_one("#lr", Input).value) == 5e29
        assert app.main.runs_tree.selected == NodeRef("p", 2)
    assert store.run("hot").checkpoints == []


async def test_a_setup_error_shows_on_screen(store: RunStore, tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("hi\n")  # passes planning, fails in the engine's setup: too little text
    app = start_app(store, tiny, data__path=str(tiny_text))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: not app.main.live and app.main.session is not None, TIMEOUT, "the worker to end")
        assert app.main.state == "Failed"
        banner = str(app.main.query_one("#error").content)
        assert "Failed at step 0" in banner and "tiny.txt" in banner, banner
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, 5, "exit")
    assert app.return_code == 1


def parse_duration(text: str) -> float:
    """fmt.duration back to seconds: 12s, 4m05s, 2h13m, 3d04h."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", text)))


async def test_eta_is_the_steps_left_times_the_step_time_shown(store: RunStore, tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The first step is slow (allocations, caches); the ETA must not average it in for a hundred steps."""
    first = threading.Event()

    def slow_first_step(step: int, model: object) -> None:
        if not first.is_set():
            first.set()
            time.sleep(1.5)

    install(monkeypatch, Hooks(after_optimizer_step=slow_first_step))
    app = start_app(store, tiny, train__max_steps=100_000, checkpoint__every_steps=0, train__eval_every=0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: steps_done(app) >= 20, TIMEOUT, "20 steps")
        app.main.live_view.show_progress()
        shown = app.main.device.text().plain
        ms = re.search(r"(\d+) ms/step · ETA (\S+)", shown)
        assert ms is not None, shown
        event = app.main.device.step
        assert event is not None
        left = event.max_steps - event.step
        expected = left * int(ms.group(1)) / 1000
        # the panel rounds the step time to 1 ms and the ETA to its coarsest unit
        assert abs(parse_duration(ms.group(2)) - expected) <= left * 0.0005 + 60, shown
        status = app.main.status.text().plain
        assert f"ETA {ms.group(2)}" in status, status
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, TIMEOUT, "the quit")
