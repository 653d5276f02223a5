"""Pilot tests of the app on a store with pre-existing runs: tree, plot, keys and dialogs (no training)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.style import Style
from rich.text import Text
from support.app import (
    NOW,
    build_demo_store,
    build_long_names_store,
    continued_demo,
    fixed_clock,
    fixed_probe,
    plot_ready,
    screen_text,
    wait_for,
    write_run,
)
from textual import events
from textual.widgets import Input, Select, Tree
from textual.widgets._toast import Toast

from tui_trainer.core.events import DataProgress
from tui_trainer.core.store import RunStore, iter_tree
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.screens.branch import BranchScreen
from tui_trainer.tui.screens.help import HelpScreen
from tui_trainer.tui.series import Curves
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.widgets.key_bar import KeyBar
from tui_trainer.tui.widgets.run_tree import NodeRef


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return build_demo_store(tmp_path / "runs")


def make_app(store: RunStore, **kwargs: object) -> TrainerApp:
    return TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True, **kwargs)  # type: ignore[arg-type]


def labels(app: TrainerApp) -> list[str]:
    out = []

    def walk(node, depth):  # type: ignore[no-untyped-def]
        for child in node.children:
            out.append("  " * depth + str(child.label))
            walk(child, depth + 1)

    walk(app.main.runs_tree.root, 0)
    return out


async def test_tree_nests_a_branch_under_the_checkpoint_it_started_from(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        tree = app.main.runs_tree
        branch_point = tree._by_ref[NodeRef("demo", 200)]
        assert [c.data for c in branch_point.children] == [NodeRef("demo-lr3e-4")]
        text = "\n".join(labels(app))
        assert "demo paused" in text and "scratch failed" in text
        assert "★◆" in text  # demo@400: newest and best
        assert "⚑" in text  # demo@100 pinned
        assert "40 ✗   invalid" in text  # scratch@40 is truncated
        assert app.main.runs_tree.selected == NodeRef("demo")
        assert app.main.plot.curves is not None and app.main.plot.curves.run == "demo"


async def test_tree_lists_runs_in_the_same_order_as_ls(store: RunStore) -> None:
    """Two branches of demo@200 (the later-made one first by name) and one whose start checkpoint is gone:
    the app's run lines come in `tui-trainer ls` order, each branch under the checkpoint it started from."""
    t0 = NOW - 3600
    write_run(store, "demo-b", created=t0, steps=range(201, 211), checkpoints=[210], parent=("demo", 200))
    write_run(store, "demo-a", created=t0 + 60, steps=range(201, 211), checkpoints=[210], parent=("demo", 200))
    write_run(store, "demo-gone", created=t0, steps=range(351, 361), checkpoints=[360], parent=("demo", 350))
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        tree = app.main.runs_tree
        shown = [node.data.run for node in tree._by_ref.values() if node.data and node.data.step is None]
        assert shown == [run.name for _, run in iter_tree(store)]
        assert shown[:5] == ["demo", "demo-a", "demo-b", "demo-lr3e-4", "demo-gone"]
        under_200 = [c.data for c in tree._by_ref[NodeRef("demo", 200)].children]
        assert under_200 == [NodeRef("demo-a"), NodeRef("demo-b"), NodeRef("demo-lr3e-4")]
        assert tree._by_ref[NodeRef("demo-gone")].parent is tree._by_ref[NodeRef("demo")]


async def test_best_is_marked_only_where_an_eval_was_measured(store: RunStore) -> None:
    """scratch evaluates every 50 steps and has checkpoints at 20 and 40: nothing there is "best"."""
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        tree = app.main.runs_tree
        assert "◆" not in str(tree._by_ref[NodeRef("scratch", 20)].label)
        assert "◆" in str(tree._by_ref[NodeRef("demo", 400)].label)
        assert tree.select_ref(NodeRef("scratch", 20))
        await pilot.pause()
        details = str(app.main.query_one("#details").content)
        assert "not evaluated" in details and "best" not in details


async def test_plot_follows_the_highlighted_run_and_overlays_the_parent(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("down", "down", "down")  # demo, @100, @200, demo-lr3e-4
        assert app.main.runs_tree.selected == NodeRef("demo-lr3e-4")
        await plot_ready(pilot)
        curves = app.main.plot.curves
        assert curves is not None and curves.run == "demo-lr3e-4"
        assert curves.own_from == 200, "the parent's first 200 steps come first"
        assert curves.branch_points == [("demo", 200)]
        assert "demo-lr3e-4" in str(app.main.plot.border_title)
        await pilot.press("down")
        assert "demo-lr3e-4@250" in str(app.main.query_one("#details").content)


async def test_keys_that_cannot_apply_are_greyed_out(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        assert app.main.check_action("pause", ()) is None  # nothing is training
        assert app.main.check_action("save", ()) is None
        # a run line means its newest checkpoint: demo@400 is at train.max_steps, so only branch applies
        assert app.main.check_action("resume", ()) is None and app.main.check_action("branch", ()) is True
        assert app.main.check_action("pin", ()) is None  # pin needs a checkpoint line
        await pilot.press("down")
        assert app.main.check_action("pin", ()) is True and app.main.check_action("resume", ()) is True
        assert app.main.runs_tree.select_ref(NodeRef("scratch", 40))
        await pilot.pause()
        for action in ("resume", "branch", "pin", "generate"):
            assert app.main.check_action(action, ()) is None, action
        # the footer shows them dimmed, not hidden; pressing one does nothing but say why
        await pilot.press("p", "r", "g", "left_square_bracket")
        assert app.main.session is None and app.main.state == "Idle"
        assert app.main.lifecycle.doing(Job.GENERATING) is None
        said = [n.message for n in app._notifications]
        assert said[0] == "nothing is training: r resumes the selected checkpoint"
        assert said[1] == said[2] and said[1].startswith("scratch@40 is invalid: model.safetensors: size 10 bytes")
        assert len(said) == 3  # the loss view is showing: [ works
        await pilot.press("v", "right_square_bracket")
        assert app.main.plot.smoothing == 0.8 and "smooth the loss view" in [n.message for n in app._notifications][-1]


async def test_pin_and_unpin_write_run_json(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.press("x")
        record = json.loads((store.run_dir("demo") / "run.json").read_text())
        assert record["pinned"] == [100, 300]
        assert "⚑" in str(app.main.runs_tree.cursor_node.label)
        await pilot.press("x")
        assert json.loads((store.run_dir("demo") / "run.json").read_text())["pinned"] == [100]


async def test_log_scale_view_and_smoothing_keys(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        plot = app.main.plot
        await pilot.press("l")
        assert plot.log_scale and "log" in str(plot.border_title)
        await pilot.press("l")
        assert not plot.log_scale
        await pilot.press("v")
        assert plot.view == "lr" and "learning rate" in str(plot.border_title)
        await pilot.press("v")
        assert plot.view == "tok/s"
        await pilot.press("v")
        assert plot.view == "loss"
        await pilot.press("right_square_bracket")
        assert plot.smoothing == 0.95
        await pilot.press("left_square_bracket", "left_square_bracket")
        assert plot.smoothing == 0.8
        assert plot.curves is not None and plot.curves.smoothing == 0.8


async def test_help_screen_opens_and_closes(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert app.main.check_action("pin", ()) is False  # main keys are off while a dialog is open
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("question_mark", "question_mark")
        assert not isinstance(app.screen, HelpScreen)


async def test_branch_dialog_rejects_invalid_input_and_starts_nothing(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.press("b")
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        assert dialog.query_one("#name", Input).value == "demo-from300"
        assert dialog.query_one("#lr", Input).value == "0.001"
        assert dialog.query_one("#name", Input).has_focus  # the first field

        dialog.query_one("#lr", Input).value = ""
        dialog.query_one("#lr", Input).focus()
        await pilot.press(*"fast", "enter")
        error = dialog.query_one("#branch-error")
        assert "optim.lr" in str(error.content) and error.display
        assert app.screen is dialog and app.main.session is None

        dialog.query_one("#lr", Input).value = "-1"
        await pilot.press("enter")
        assert "optim.lr: must be > 0" in str(error.content)
        for typed, message in (("1e400", "optim.lr: must be a finite number"), ("1e9", "optim.lr: AdamW learning")):
            dialog.query_one("#lr", Input).value = typed
            await pilot.press("enter")
            assert message in str(error.content) and app.main.session is None

        dialog.query_one("#lr", Input).value = "0.0005"
        dialog.query_one("#max_steps", Input).value = "200"
        await pilot.click("#start")
        assert "train.max_steps: 200 is not past the starting step 300 of demo@300" in str(error.content)

        dialog.query_one("#lr", Input).value = "0.0005"
        dialog.query_one("#max_steps", Input).value = "0"
        await pilot.click("#start")
        assert "train.max_steps" in str(error.content)

        dialog.query_one("#max_steps", Input).value = "400"
        dialog.query_one("#name", Input).value = "demo-lr3e-4"  # taken
        dialog.query_one("#name", Input).focus()
        await pilot.press("enter")
        assert "already exists" in str(error.content)

        dialog.query_one("#name", Input).value = "bad/name"
        await pilot.press("enter")
        assert "path separator" in str(error.content)
        assert app.screen is dialog and app.main.session is None

        await pilot.press("escape")
        assert not isinstance(app.screen, BranchScreen)
        assert app.main.session is None and sorted(store.run_names()) == ["demo", "demo-lr3e-4", "scratch"]


async def test_branch_dialog_builds_the_plan_it_validated(store: RunStore) -> None:
    started = []
    app = make_app(store)
    app.main.training.start = started.append  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 200))
        await pilot.press("b")
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        dialog.query_one("#lr", Input).value = "3e-4"
        dialog.query_one("#grad_accum", Input).value = "2"
        dialog.query_one("#precision", Select).value = "bf16"
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(started), 5, "the dialog to return a plan")
    plan = started[0]
    assert plan.run == "demo-from200" and plan.parent == ("demo", 200) and plan.start_step == 200
    assert plan.config.optim.lr == 3e-4 and plan.config.train.grad_accum == 2
    assert plan.config.train.precision == "bf16"
    assert plan.config.train.batch_size == 16  # untouched fields keep the parent's values


async def test_quit_when_idle_exits_at_once(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("q")
        await wait_for(pilot, lambda: app.return_code is not None, 5, "exit")
    assert app.return_code == 0


async def test_empty_runs_dir_says_how_to_start(tmp_path: Path) -> None:
    app = TrainerApp(tmp_path / "nothing", clock=fixed_clock, probe=fixed_probe, strict=True)
    async with app.run_test(size=(80, 24)) as pilot:
        assert "no runs" in app.main.status.text().plain
        assert app.main.check_action("resume", ()) is None and app.main.check_action("generate", ()) is None
        await pilot.press("l", "v", "v", "v")  # log scale of an empty plot must not crash plotext
        await pilot.pause()
        assert app.main.plot.log_scale and app.return_code is None


async def test_a_million_points_draw_as_few_points_as_a_thousand(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        steps = np.arange(1, 1_000_001, dtype=float)
        big = Curves(run="huge")
        big.loss.extend(steps, 2 + np.sin(steps / 1000))
        big.lr.extend(steps, np.full_like(steps, 1e-3))
        big.set_smoothing(0.9)
        app.main.plot.set_curves(big)
        await pilot.pause()
        drawn_big = app.main.plot.points_drawn
        small = Curves(run="small")
        small.add_records({"step": s, "loss": 2.0, "lr": 1e-3} for s in range(1, 1001))
        app.main.plot.set_curves(small)
        await pilot.pause()
        buckets = app.main.plot.buckets()
        assert drawn_big <= 3 * 2 * (buckets + 1)  # raw + smoothed, two points per column at most
        assert app.main.plot.points_drawn <= drawn_big


async def test_a_long_history_loads_off_the_ui_thread(store: RunStore) -> None:
    lines = "".join(f'{{"step": {s}, "loss": {2 + 1 / s}, "lr": 0.001}}\n' for s in range(1, 100_001))
    store.metrics_path("scratch").write_text(lines, encoding="utf-8")
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        assert app.main.runs_tree.select_ref(NodeRef("scratch"))
        await pilot.press("l")  # keys work while it loads
        assert app.main.plot.log_scale
        await plot_ready(pilot)
        assert app.main.plot.curves is not None and app.main.plot.curves.run == "scratch"
        assert len(app.main.plot.curves.loss) == 100_000
        assert app.main.plot.points_drawn <= 3 * 2 * (app.main.plot.buckets() + 1)


def test_live_points_wait_for_a_loading_history() -> None:
    from tui_trainer.tui.history import History

    history = History()
    assert history.needs_load("r") and not history.needs_load("r")  # one load at a time
    assert history.add_live("r", [{"step": 11, "loss": 1.0, "lr": 0.1}]) is None
    loaded = Curves(run="r")
    loaded.add_records({"step": s, "loss": 2.0, "lr": 0.1} for s in range(1, 12))
    curves = history.loaded("r", loaded)
    assert len(curves.loss) == 11, "a live point the disk already had is not doubled"
    assert history.add_live("r", [{"step": 12, "loss": 1.0, "lr": 0.1}]) is curves and len(curves.loss) == 12
    assert not history.needs_load("r")
    history.forget("r")
    assert history.needs_load("r")


async def test_a_corrupt_checkpoint_is_caught_before_anything_starts(store: RunStore) -> None:
    weights = store.checkpoint_dir("demo", 300) / "model.safetensors"
    weights.write_bytes(b"\1" * weights.stat().st_size)  # same size: only the checksum (on a worker) sees it
    started = []
    app = make_app(store)
    app.main.training.start = started.append  # type: ignore[method-assign]
    async with app.run_test(size=(120, 40)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.press("b")
        dialog = app.screen
        assert isinstance(dialog, BranchScreen)
        await pilot.press("enter")
        error = dialog.query_one("#branch-error")
        await wait_for(pilot, lambda: "does not match the manifest" in str(error.content), 10, "the verification error")
        assert app.screen is dialog and not error.has_class("-busy")
        await pilot.press("escape")
        await pilot.press("r")
        await wait_for(pilot, lambda: app.main.lifecycle.doing(Job.PLANNING) is None, 10, "the resume check")
        assert not started and app.main.session is None


async def test_data_preparation_progress_shows_in_the_status_line(store: RunStore) -> None:
    """The engine's DataProgress events (before the first step) reach the status line, newest only."""
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        session = TrainingSession(store, continued_demo(store), app.main.post_message)
        app.main.training.attach(session)
        for done in (0, 10_000, 42_000):
            session.sink(DataProgress("demo", "tokenizing", done, 100_000))
        await wait_for(pilot, lambda: "preparing data: tokenizing 42%" in app.main.status.text().plain, 5, "progress")
        assert app.main.status.text().plain.startswith(" Starting  demo")


async def test_the_branch_dialog_focuses_its_first_field(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.press("b")
        await wait_for(pilot, lambda: isinstance(app.screen, BranchScreen) and app.screen.is_mounted, 5, "dialog")
        assert app.focused is not None and app.focused.id == "name"
        assert app.focused.styles.background != app.screen.query_one("#lr", Input).styles.background


def type_at_once(app: TrainerApp, *keys: str) -> None:
    """Keys as a terminal delivers typed-ahead ones: all queued before the app handles the first."""
    for key in keys:
        app.post_message(events.Key(key, key if len(key) == 1 else None))


async def test_keys_typed_while_the_branch_dialog_opens_reach_the_field_that_gets_focus(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo", 300))
        await pilot.pause()
        type_at_once(app, "b", "tab", "5")
        await wait_for(pilot, lambda: isinstance(app.screen, BranchScreen) and app.screen.is_mounted, 5, "dialog")
        dialog = app.screen
        await wait_for(pilot, lambda: dialog.query_one("#lr", Input).value == "5", 5, "5 in the lr field")
        assert dialog.query_one("#name", Input).value == "demo-from300"
        assert app.focused is dialog.query_one("#lr", Input)
        # and in the open dialog, Tab moves on before the next key lands: 2 goes to batch size
        type_at_once(app, "tab", "2")
        await wait_for(pilot, lambda: dialog.query_one("#batch_size", Input).value == "2", 5, "2 in batch size")
        assert dialog.query_one("#lr", Input).value == "5"


async def test_ages_refresh_from_one_clock_in_the_tree_and_the_details(store: RunStore) -> None:
    now = [NOW]
    app = TrainerApp(store.root, clock=lambda: now[0], probe=fixed_probe, strict=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        assert app.main.runs_tree.select_ref(NodeRef("scratch", 20))
        await pilot.pause()
        created = app.main.runs_tree.selected_checkpoint().created  # type: ignore[union-attr]
        now[0] = created + 16
        await wait_for(pilot, lambda: "16s" in str(app.main.runs_tree.cursor_node.label), 5, "the tree's age")  # type: ignore[union-attr]
        assert "saved 16s ago" in str(app.main.query_one("#details").content)
        now[0] = created + 45
        await wait_for(pilot, lambda: "45s" in str(app.main.runs_tree.cursor_node.label), 5, "a newer age")  # type: ignore[union-attr]
        assert "saved 45s ago" in str(app.main.query_one("#details").content)


async def test_details_name_an_invalid_checkpoints_problem_and_count_in_words(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        await plot_ready(pilot)
        assert "3 runs ·" in app.main.status.text().plain
        assert app.main.runs_tree.select_ref(NodeRef("scratch", 40))
        await pilot.pause()
        details = str(app.main.query_one("#details").content)
        assert "✗ invalid: model.safetensors: size 10 bytes, manifest says" in details, details
        assert app.main.runs_tree.select_ref(NodeRef("demo-lr3e-4"))
        await pilot.pause()
        assert "3 checkpoints" in str(app.main.query_one("#details").content)
        store.update_record("scratch", pinned=[])
        shutil.rmtree(store.checkpoint_dir("scratch", 40))
        app.main.browse.refresh_tree(select=NodeRef("scratch"))
        await pilot.pause()
        assert "1 checkpoint ·" in str(app.main.query_one("#details").content)  # not "1 checkpoints"


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)])
async def test_runs_panel_grows_with_the_terminal_and_toasts_clear_the_status_line(  # type: ignore[no-untyped-def]
    store: RunStore, size
) -> None:
    app = make_app(store)
    async with app.run_test(size=size, notifications=True) as pilot:
        await plot_ready(pilot)
        left = app.main.query_one("#left")
        assert left.outer_size.width == {80: 34, 120: 38, 200: 60}[size[0]]
        tree = app.main.runs_tree
        assert not tree.show_horizontal_scrollbar
        # the marks come right after the step, inside the visible width even at 80 columns
        line = "├   400 ★◆"
        assert len(line) <= tree.content_region.width and "★◆" in str(tree._by_ref[NodeRef("demo", 400)].label)
        app.notify("saved demo@400")
        await wait_for(pilot, lambda: bool(app.screen.query(Toast)), 5, "the toast")
        await pilot.pause()
        toast = app.screen.query_one(Toast)
        status = app.main.status.region
        assert toast.region.bottom <= status.y, (toast.region, status)


def cut_or_whole(shown: str, full: str) -> bool:
    """Whole, or cut after a whole word with an ellipsis (never inside a word, a number or an age); a name
    longer than the room, after one of its joints ("demo-lr3e-4-from300-…")."""
    if shown == full:
        return True
    kept = shown[:-1]
    return shown.endswith("…") and full.startswith(kept) and (full[len(kept)] in " ·" or kept[-1] in "-_@/.")


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (200, 50)], ids=["80x24", "120x40", "200x50"])
async def test_tree_labels_are_whole_or_cut_at_a_word_and_columns_line_up(tmp_path: Path, size) -> None:  # type: ignore[no-untyped-def]
    store = build_long_names_store(tmp_path / "runs")
    app = make_app(store)
    async with app.run_test(size=size) as pilot:
        await plot_ready(pilot)
        tree = app.main.runs_tree
        tree.select_ref(NodeRef("demo-from200"))
        await pilot.pause()
        step_ends: dict[str, set[int]] = {}
        rows = [tree.render_line(y).text.rstrip() for y in range(tree.last_line + 1)]
        for y, row in enumerate(rows):
            node = tree.get_node_at_line(y)
            assert node is not None and node.data is not None
            depth, parent = 0, node.parent
            while parent is not None and parent is not tree.root:
                depth, parent = depth + 1, parent.parent
            shown = row[depth * tree.guide_depth :]
            full = Tree.render_label(tree, node, Style(), Style()).plain.rstrip()
            assert cut_or_whole(shown, full), (size, row, full)
            step = re.match(r"[▼▶]?\s*\d+", shown)
            if node.data.step is not None and step:  # a checkpoint: its steps line up with its run's others
                step_ends.setdefault(node.data.run, set()).add(depth * tree.guide_depth + step.end())
        assert len(step_ends) == 4 and all(len(ends) == 1 for ends in step_ends.values()), step_ends
        if size != (80, 24):  # the nested branch's 13s-old checkpoint shows its whole age where it fits
            assert any(" 13s" in row for row in rows), rows
        for row in screen_text(app).splitlines():
            assert "none sa" not in row.replace("none saved", "")


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
async def test_the_footer_shows_the_most_used_keys_and_the_way_to_the_rest(store: RunStore, size) -> None:  # type: ignore[no-untyped-def]
    app = make_app(store)
    async with app.run_test(size=size) as pilot:
        await plot_ready(pilot)
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1].rstrip()
        for keys in ("p Pause", "r Resume", "b Branch", "e Export", "{ } Samples", "+ - Zoom", "? More keys"):
            assert keys in footer, footer
        assert footer.endswith("q Quit") and len(footer) <= size[0], footer
        if size[0] >= 120:
            assert "s Save" in footer and "v View" in footer, footer


async def test_the_sample_title_is_whole_or_cut_at_a_word(store: RunStore) -> None:
    write_run(store, "demo-lr3e-4-from300-longer", created=NOW - 13, steps=range(301, 302), checkpoints=[301])
    lines = [{"step": 301, "prompt": "", "text": " to be", "time": NOW}]
    store.samples_path("demo-lr3e-4-from300-longer").write_text("".join(json.dumps(r) + "\n" for r in lines))
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.main.runs_tree.select_ref(NodeRef("demo-lr3e-4-from300-longer", 301))
        await wait_for(pilot, lambda: app.main.sample.samples != [], 5, "the sample")
        await pilot.pause()
        rows = screen_text(app).splitlines()
        title = next(row for row in rows if "─ Device ─" in row).partition("─ Device ─")[2]
        # at 80 columns the panel is 23 wide: "Sample · demo-lr3e-4-from300-longer@301 · 1/1" does not fit
        assert "─ demo-lr3e-4-… ─" in title, title  # not "Sample · demo-lr3e…"


async def test_the_details_break_a_long_name_after_a_joint_not_inside_a_word(store: RunStore) -> None:
    long = "demo-from200-with-a-long-name"
    write_run(store, long, created=NOW - 600, steps=range(201, 262), checkpoints=[260], parent=("demo", 200))
    write_run(store, f"{long}-from260", created=NOW - 60, steps=range(261, 265), checkpoints=[], parent=(long, 260))
    app = make_app(store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.main.runs_tree.select_ref(NodeRef(f"{long}-from260"))
        await wait_for(pilot, lambda: "branched" in str(app.main.query_one("#details").render()), 5, "the details")
        await pilot.pause()
        rows = [row[1:33].strip() for row in screen_text(app).splitlines()[-8:-3]]  # inside the left panel
        assert rows[:2] == ["demo-from200-with-a-long-name-", "from260"], rows
        assert rows[-2:] == ["branched from demo-from200-", "with-a-long-name@260"], rows


async def test_an_error_with_brackets_is_shown_as_written_not_read_as_markup(store: RunStore) -> None:
    """A rank that lost its peer fails with Gloo's `[/path/pair.cc:537] Connection closed by peer`: the
    banner shows those words (read as markup, the closing tag crashed the app an attached user watched)."""
    from support.app import scripted

    from tui_trainer.core.events import Failed, State, StateChanged

    message = "another rank left the job at step 6 ([/__w/gloo/transport/tcp/pair.cc:537] Connection closed by peer)"
    events = [StateChanged("demo", State.RUNNING, 400), Failed("demo", 406, message, "error")]
    events.append(StateChanged("demo", State.FAILED, 405, message))
    app = make_app(store, plan=continued_demo(store), trainer_factory=scripted(events, State.FAILED))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.main.lifecycle.failure is not None and not app.main.live, 10, "the failure")
        await pilot.pause()
        assert app.is_running
        assert "[/__w/gloo/transport/tcp/pair.cc:537] Connection" in screen_text(app)


async def test_the_footer_offers_zoom_once_the_history_is_plotted(store: RunStore) -> None:
    # the keys that need a curve (+ - , . 0 f) wake up when the history lands, not at the next key press
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        assert app.main.why_not("zoom") is None
        bar = app.main.query_one(KeyBar)

        def zoom_offered() -> bool:
            shown = bar.content
            assert isinstance(shown, Text)
            at = shown.plain.index("Zoom")
            return all("dim" not in str(span.style) for span in shown.spans if span.start <= at < span.end)

        await wait_for(pilot, zoom_offered, 5, "the footer to show Zoom enabled")
