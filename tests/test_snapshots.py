"""Snapshot tests of the main screen states (pytest-textual-snapshot). Deterministic: a store written by
support.app with fixed times, a fixed clock and device probe, and no live training — running, pausing
and failed states are played from fixed events. Update after a deliberate change with
`pytest tests/test_snapshots.py --snapshot-update` and look at the SVGs in tests/__snapshots__/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.app import (
    NOW,
    HeldTrainer,
    build_demo_store,
    build_long_names_store,
    continued_demo,
    demo_loss,
    fixed_clock,
    fixed_probe,
    plot_ready,
    scripted,
    step_event,
    wait_for,
)
from textual.pilot import Pilot
from textual.widgets import Input

from tui_trainer.core.events import DeviceSample, EvalLogged, Failed, State, StateChanged
from tui_trainer.core.store import RunStore
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.widgets import device_panel
from tui_trainer.tui.widgets.run_tree import NodeRef

BIG, SMALL, HUGE = (120, 40), (80, 24), (200, 50)
SIZES = pytest.mark.parametrize("size", [BIG, SMALL, HUGE], ids=["120x40", "80x24", "200x50"])


@pytest.fixture(autouse=True)
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device panel counts CPU use in the machine's cores: pin the count so snapshots match anywhere."""
    monkeypatch.setattr(device_panel, "CORES", 2)


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return build_demo_store(tmp_path / "runs")


def make_app(store: RunStore, **kwargs: object) -> TrainerApp:
    return TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True, **kwargs)  # type: ignore[arg-type]


async def settle(pilot: Pilot) -> None:  # type: ignore[type-arg]
    app: TrainerApp = pilot.app  # type: ignore[assignment]
    await plot_ready(pilot)
    app.main.plot.redraw()
    await pilot.pause()


def play_running(app: TrainerApp, store: RunStore) -> TrainingSession:
    """Put the app in the Running state of a resumed `demo` by feeding the sink fixed events (no worker)."""
    plan = continued_demo(store)
    session = TrainingSession(store, plan, app.main.post_message)
    session._trainer = HeldTrainer()  # type: ignore[assignment]
    app.main.training.attach(session)  # as start_training does, without starting a worker
    session.sink(StateChanged("demo", State.RUNNING, 400))
    for step in range(401, 411):
        session.sink(step_event("demo", step))
    session.sink(EvalLogged("demo", 410, 1.93))
    session.sink(DeviceSample("demo", "cpu", "cpu", rss_bytes=612 * 2**20, cpu_percent=195.0, notes=("no GPU",)))
    return session


async def show_running(pilot: Pilot, app: TrainerApp, store: RunStore) -> None:  # type: ignore[type-arg]
    """The scripted run at step 410, selected, plotted, with its numbers on screen."""
    play_running(app, store)
    await wait_for(pilot, lambda: app.main.state == State.RUNNING and app.main.session.last_step.step == 410, 5)  # type: ignore[union-attr]
    app.main.browse.refresh_tree(select=NodeRef("demo"))
    await plot_ready(pilot)
    app.main.live_view.show_progress()  # flush the throttled numbers now rather than on the next tick


@SIZES
def test_main_screen_browsing(store: RunStore, snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(store), terminal_size=size, run_before=settle)


def test_branch_drawn_over_parent_history(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await pilot.press("down", "down", "down")
        await settle(pilot)

    assert snap_compare(make_app(store), terminal_size=BIG, run_before=run_before)


def test_a_restart_is_marked_on_the_plot(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    """demo continued by itself at step 300 (a torchrun restart's resume marker, the lost tail logged
    again): one curve, and a red ↻ on the bottom row at step 300, named in the legend."""
    with open(store.metrics_path("demo"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": "resume", "step": 300, "time": NOW, "reason": "elastic restart"}) + "\n")
        fh.writelines(json.dumps({"step": s, "loss": demo_loss(s), "lr": 1e-3}) + "\n" for s in range(301, 401))
    assert snap_compare(make_app(store), terminal_size=BIG, run_before=settle)


def test_log_scale_lr_view(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(store), terminal_size=BIG, press=["l", "v"], run_before=settle)


@SIZES
def test_running(store: RunStore, snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    app = make_app(store)

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await show_running(pilot, app, store)
        await settle(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_pausing_is_shown_at_once(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    app = make_app(store)

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await show_running(pilot, app, store)
        await pilot.press("p")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_failed_run_shows_the_error(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    events = [StateChanged("demo", State.RUNNING, 400)]
    events += [step_event("demo", s) for s in range(401, 406)]
    events += [Failed("demo", 406, "RuntimeError: the data loader died", "error")]
    events += [StateChanged("demo", State.FAILED, 405, "RuntimeError: the data loader died")]
    plan = continued_demo(store)
    app = make_app(store, plan=plan, trainer_factory=scripted(events, State.FAILED))

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await wait_for(
            pilot, lambda: not app.main.live and app.main.lifecycle.failure is not None, 10, "the scripted failure"
        )
        await settle(pilot)

    assert snap_compare(app, terminal_size=BIG, run_before=run_before)


@SIZES
def test_branch_dialog_with_an_error(store: RunStore, snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    app = make_app(store)

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.press("b")
        app.screen.query_one("#lr", Input).value = "fast"
        await pilot.press("enter")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_help_screen(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    assert snap_compare(make_app(store), terminal_size=SMALL, press=["question_mark"])


def test_compare_two_runs_with_a_baseline(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    """demo as the baseline (white), demo-lr3e-4 marked: one line per run, named in the legend, dots in the tree."""

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await pilot.press("B", "down", "down", "down", "space")
        await wait_for(pilot, lambda: len(pilot.app.main.plot.drawn) == 2, 10, "both runs drawn")  # type: ignore[attr-defined]
        await settle(pilot)

    assert snap_compare(make_app(store), terminal_size=BIG, run_before=run_before)


def test_export_dialog(store: RunStore, snap_compare) -> None:  # type: ignore[no-untyped-def]
    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        await pilot.press("down", "e")
        await wait_for(pilot, lambda: pilot.app.screen.query("#export-dialog"), 10, "the export dialog")  # type: ignore[attr-defined]

    assert snap_compare(make_app(store), terminal_size=SMALL, run_before=run_before)


@SIZES
def test_long_names_and_nested_branches_fit(tmp_path: Path, snap_compare, size: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    """Every label whole or cut after a word with an ellipsis; each run's checkpoint columns in line."""
    store = build_long_names_store(tmp_path / "runs")

    async def run_before(pilot: Pilot) -> None:  # type: ignore[type-arg]
        pilot.app.main.runs_tree.select_ref(NodeRef("demo-lr3e-4-from300-longer", 301))  # type: ignore[attr-defined]
        await settle(pilot)

    assert snap_compare(make_app(store), terminal_size=size, run_before=run_before)
