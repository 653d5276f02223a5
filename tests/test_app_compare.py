"""Pilot tests of what people reach for while a run trains: compare runs, zoom / pan / follow the step axis,
page through logged samples, perplexity. Real app, real store files (support.app), no torch."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from rich.text import Text
from support.app import (
    NOW,
    HeldTrainer,
    build_demo_store,
    continued_demo,
    fixed_clock,
    fixed_probe,
    plot_ready,
    step_event,
    wait_for,
    write_run,
)
from textual.events import MouseScrollUp

from tui_trainer.core.events import EvalLogged, SampleLogged, State, StateChanged
from tui_trainer.core.store import RunStore
from tui_trainer.tui.app import TrainerApp
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.widgets.run_tree import NodeRef


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    return build_demo_store(tmp_path / "runs")


def make_app(store: RunStore) -> TrainerApp:
    return TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True)


def legend(app: TrainerApp) -> str:
    return str(app.main.plot.border_subtitle)


async def select(pilot, ref: NodeRef) -> None:  # type: ignore[no-untyped-def]
    assert pilot.app.main.runs_tree.select_ref(ref)
    await wait_for(pilot, lambda: pilot.app.main.browse.wanted_run == ref.run, 10, f"{ref.run} highlighted")
    await plot_ready(pilot)


async def test_two_marked_runs_overlay_with_both_names_in_the_legend(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        await pilot.press("space")  # demo
        await select(pilot, NodeRef("scratch"))
        await pilot.press("space")
        await wait_for(pilot, lambda: "scratch" in legend(app) and "demo" in legend(app), what="both in the legend")
        assert app.main.runs_tree.marked == ("demo", "scratch")
        assert "2 runs" in str(app.main.plot.border_title)
        assert set(app.main.plot.drawn) == {"demo", "scratch"}  # one line per run
        # the tree marks each compared run with a dot in its plot colour
        assert str(app.main.runs_tree._by_ref[NodeRef("demo")].label).startswith("● demo")
        # every view works on the overlay, eval loss on its own included
        views = []
        for _ in range(4):
            await pilot.press("v")
            views.append(app.main.plot.view)
            assert set(app.main.plot.drawn) == {"demo", "scratch"}, app.main.plot.view
        assert views == ["eval", "lr", "tok/s", "loss"]


async def test_the_baseline_stays_when_the_marks_are_cleared(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        await pilot.press("B")  # demo is the baseline
        await select(pilot, NodeRef("demo-lr3e-4"))
        await pilot.press("space")
        await select(pilot, NodeRef("scratch"))
        await pilot.press("space")
        three = {"demo (baseline)", "demo-lr3e-4", "scratch"}
        await wait_for(pilot, lambda: set(app.main.plot.drawn) == three, 10, "3 runs")
        assert "demo (baseline)" in legend(app)
        await pilot.press("c")
        await pilot.pause()
        assert app.main.runs_tree.marked == ()
        # the baseline stays, beside the highlighted run; the cleared mark is gone from the plot and the tree
        assert set(app.main.plot.drawn) == {"demo (baseline)", "scratch"}
        assert "demo (baseline)" in legend(app) and "demo-lr3e-4" not in legend(app)
        assert not str(app.main.runs_tree._by_ref[NodeRef("demo-lr3e-4")].label).startswith("●")
        await pilot.press("c")  # nothing marked: the key says why
        await pilot.pause()
        assert any("no runs marked" in str(n.message) for n in app._notifications)


async def test_more_marked_runs_than_the_legend_fits_are_counted_not_cut(store: RunStore) -> None:
    names = [f"sweep-lr{i}e-4-warmup{10 * i}" for i in range(1, 13)]
    for i, name in enumerate(names):
        write_run(store, name, created=NOW - 600 + i, steps=range(1, 51), checkpoints=[50])
    app = make_app(store)
    async with app.run_test(size=(100, 40)) as pilot:
        await plot_ready(pilot)
        for name in names:
            await select(pilot, NodeRef(name))
            await pilot.press("space")
        await wait_for(pilot, lambda: len(app.main.plot.drawn) == 12, 10, "12 runs drawn")
        shown = Text.from_markup(legend(app)).plain
        assert len(shown) <= app.main.plot.size.width - 4  # all of it inside the border
        named = [name for name in names if name in shown]
        assert 0 < len(named) < 12
        assert f"+{12 - len(named)} more" in shown  # the rest counted, none cut mid-name
        assert shown.endswith("x: step")


def write_long_run(store: RunStore, name: str, steps: int) -> None:
    """A long history written fast (one format string per line, no json.dumps)."""
    write_run(store, name, created=NOW - 900, steps=range(1, 11), checkpoints=[10])
    lines = "".join(f'{{"step": {s}, "loss": {3 + (s % 7) / 10}, "lr": 0.001}}\n' for s in range(1, steps + 1))
    store.metrics_path(name).write_text(lines, encoding="utf-8")


async def test_zooming_into_1000_steps_of_a_long_run_draws_every_one_of_them(store: RunStore) -> None:
    write_long_run(store, "long", 100_000)
    app = make_app(store)
    # wide enough that 2 points per column cover 1,000 steps: the window, not the run, is downsampled
    async with app.run_test(size=(480, 30)) as pilot:
        await select(pilot, NodeRef("long"))
        plot = app.main.plot
        plot.smoothing = 0.0  # raw loss only (what [ pressed down to 0 does), one line to count
        assert plot.drawn["train"] <= 2 * plot.buckets() < 2_000  # the whole run: downsampled
        for _ in range(7):  # each + halves the window: 100,000 / 2^7 = 781 newest steps
            await pilot.press("plus")
        lo, hi = plot.x_range or (0, 0)
        assert hi == 100_000 and 700 < hi - lo <= 1_000
        assert plot.drawn["train"] == sum(1 for s in range(1, 100_001) if lo <= s <= hi)  # every step in view
        assert "steps 99k–100k" in str(plot.border_title)
        await pilot.press("comma")  # pan left a quarter of the window
        lo2, hi2 = plot.x_range or (0, 0)
        assert (lo2, hi2) == pytest.approx((lo - (hi - lo) / 4, hi - (hi - lo) / 4))
        await pilot.press("0")
        assert plot.x_range == (1, 100_000)
        await pilot.press("comma")  # nothing to pan at the whole-run view: the key says why
        await pilot.pause()
        assert any("whole run is in view" in str(n.message) for n in app._notifications)
        # the mouse wheel zooms around the step under the pointer (the middle of the plot: ~step 50k)
        await pilot._post_mouse_events([MouseScrollUp], widget=plot, offset=(plot.size.width // 2, 5))
        await pilot.pause()
        lo, hi = plot.x_range or (0, 0)
        assert 47_000 < hi - lo < 53_000 and lo < 50_000 < hi
        await select(pilot, NodeRef("demo"))  # a window showing nothing of the next run gives way to its whole
        assert plot.window is None and plot.x_range == (1, 400)


async def test_follow_keeps_the_newest_steps_in_view_as_points_arrive(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        session = TrainingSession(store, continued_demo(store), app.main.post_message)
        session._trainer = HeldTrainer()  # type: ignore[assignment]
        app.main.training.attach(session)
        session.sink(StateChanged("demo", State.RUNNING, 400))
        await plot_ready(pilot)
        plot = app.main.plot
        await pilot.press("plus", "plus", "f")  # the newest 100 of 400 steps, then follow them
        assert plot.follow == 100 and plot.x_range == (300, 400)
        for step in range(401, 461):
            session.sink(step_event("demo", step))
        await wait_for(pilot, lambda: plot.x_range == (360, 460), what="the window to follow step 460")
        assert plot.drawn["train"] == 101  # steps 360..460: every one
        await pilot.press("comma")  # panning stops following
        assert plot.follow is None and plot.window == (335, 435)


def write_samples(store: RunStore, run: str, steps: list[int]) -> None:
    lines = [{"step": s, "prompt": "To be", "text": f" sample at {s}", "time": NOW} for s in steps]
    store.samples_path(run).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn', encoding="utf-8")


async def test_samples_panel_pages_through_samples_jsonl_and_takes_live_ones(store: RunStore) -> None:
    write_samples(store, "demo", [100, 200, 300])
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        panel = app.main.sample
        assert "sample at 300" in panel.text and "demo@300 · 3/3" in str(panel.border_title)
        await pilot.press("left_curly_bracket", "left_curly_bracket")
        assert "sample at 100" in panel.text and "1/3" in str(panel.border_title)
        await pilot.press("left_curly_bracket")  # the oldest: stays, says so
        await pilot.pause()
        assert "1/3" in str(panel.border_title)
        assert any("oldest sample" in str(n.message) for n in app._notifications)
        await pilot.press("right_curly_bracket")
        assert "sample at 200" in panel.text
        # a run without samples says why { does nothing
        await select(pilot, NodeRef("scratch"))
        assert panel.samples == [] and "press g" in panel.text
        # a live sample of the selected run lands on screen at once (after paging to the newest)
        await select(pilot, NodeRef("demo"))
        session = TrainingSession(store, continued_demo(store), app.main.post_message)
        session._trainer = HeldTrainer()  # type: ignore[assignment]
        app.main.training.attach(session)
        session.sink(SampleLogged("demo", 450, "To be", " a live one", 0.2))
        await wait_for(pilot, lambda: "a live one" in panel.text, what="the live sample")
        assert "demo@450 · 4/4" in str(panel.border_title)


async def test_perplexity_beside_eval_loss_in_details_and_status(store: RunStore) -> None:
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, NodeRef("demo", 400))
        ckpt = store.checkpoint("demo", 400)
        assert ckpt.eval_loss is not None
        ppl = f"ppl {math.exp(ckpt.eval_loss):.2f}"
        # the details panel fills in after the selection (it reads the checkpoint off the UI thread)
        await wait_for(pilot, lambda: ppl in str(app.main.query_one("#details").render()), what="ppl in the details")
        session = TrainingSession(store, continued_demo(store), app.main.post_message)
        session._trainer = HeldTrainer()  # type: ignore[assignment]
        app.main.training.attach(session)
        session.sink(StateChanged("demo", State.RUNNING, 400))
        session.sink(step_event("demo", 401))
        session.sink(EvalLogged("demo", 401, 2.0))
        await wait_for(pilot, lambda: "ppl 7.39" in str(app.main.status.text()), what="perplexity in the status")


async def test_grad_norm_gets_a_view_only_where_metrics_carry_it(store: RunStore) -> None:
    lines = [json.dumps({"step": s, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5 + s / 100}) for s in range(1, 101)]
    write_run(store, "withgrad", created=NOW - 600, steps=range(1, 2), checkpoints=[1])
    store.metrics_path("withgrad").write_text("\n".join(lines) + "\n", encoding="utf-8")
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        plot = app.main.plot
        assert "grad" not in plot.views()  # demo's metrics have no grad_norm
        await select(pilot, NodeRef("withgrad"))
        assert plot.views() == ["loss", "lr", "tok/s", "grad"]
        await pilot.press("v", "v", "v")
        assert plot.view == "grad" and "grad norm" in str(plot.border_title)
        assert plot.drawn == {"grad norm": 100}
        await select(pilot, NodeRef("demo"))  # a run without it falls back to the loss view
        await wait_for(pilot, lambda: plot.view == "loss", 10, "the loss view")


def test_store_samples_skip_torn_lines_and_perplexity_formats(tmp_path: Path) -> None:
    from tui_trainer.core import fmt

    store = build_demo_store(tmp_path / "runs")
    assert store.samples("demo") == []  # no samples.jsonl
    write_samples(store, "demo", [5, 10])
    assert [s["step"] for s in store.samples("demo")] == [5, 10]  # the torn last line is skipped
    assert fmt.perplexity(math.log(6.42)) == "6.42"
    assert fmt.perplexity(None) == "–" and fmt.perplexity(float("nan")) == "–"
    assert fmt.perplexity(800.0) == "inf" and fmt.perplexity(math.log(12345)) == "12,345"


async def test_the_live_run_gets_a_grad_norm_view(store: RunStore) -> None:
    """demo's history has no grad_norm; the steps its live run logs do: `v` reaches a grad-norm view."""
    app = make_app(store)
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        plot = app.main.plot
        assert "grad" not in plot.views()
        session = TrainingSession(store, continued_demo(store), app.main.post_message)
        session._trainer = HeldTrainer()  # type: ignore[assignment]
        app.main.training.attach(session)
        session.sink(StateChanged("demo", State.RUNNING, 400))
        for step in range(401, 421):
            session.sink(replace(step_event("demo", step), grad_norm=0.4 + step / 1000))
        await wait_for(pilot, lambda: "grad" in plot.views(), 10, "the live grad norms")
        await pilot.press("v", "v", "v")
        assert plot.view == "grad" and "grad norm" in str(plot.border_title)
        await wait_for(pilot, lambda: plot.drawn.get("grad norm") == 20, 10, "20 grad norms drawn")


async def test_a_checkpoint_row_shows_its_runs_samples_and_pages_them(store: RunStore) -> None:
    write_samples(store, "demo", [100, 200, 300])
    app = TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True, generator=lambda path: "made up")
    async with app.run_test(size=(120, 40)) as pilot:
        await plot_ready(pilot)
        panel = app.main.sample
        await select(pilot, NodeRef("demo", 200))  # the sample logged by the checkpoint's step
        await wait_for(pilot, lambda: "demo@200 · 2/3" in str(panel.border_title), 10, "demo@200's sample")
        assert "sample at 200" in panel.text
        await pilot.press("left_curly_bracket")
        assert "sample at 100" in panel.text and "demo@100 · 1/3" in str(panel.border_title)
        await pilot.press("right_curly_bracket", "right_curly_bracket")
        assert "sample at 300" in panel.text and "demo@300 · 3/3" in str(panel.border_title)
        # a sample generated with g, then { goes back to the run's logged samples (not "None@…")
        await pilot.press("g")
        await wait_for(pilot, lambda: "made up" in panel.text, 10, "the generated sample")
        await pilot.press("left_curly_bracket")
        assert "sample at 300" in panel.text and "demo@300 · 3/3" in str(panel.border_title)
        # a run without samples: { says which run has none, and nothing of demo's stays on screen
        await select(pilot, NodeRef("demo-lr3e-4", 300))
        await wait_for(pilot, lambda: panel.run is None, 10, "demo's samples to leave the panel")
        assert panel.samples == [] and "press g" in panel.text and "demo@" not in str(panel.border_title)
        assert app.main.why_not("sample_page") is not None and "demo-lr3e-4" in str(app.main.why_not("sample_page"))


async def test_a_long_run_name_leaves_the_eta_in_the_status_line_at_80_columns(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs")
    app = TrainerApp(store.root, clock=fixed_clock, probe=fixed_probe, strict=True)
    async with app.run_test(size=(80, 24)) as pilot:
        status = app.main.status
        status.run, status.state, status.detail = "a-rather-long-run-name-for-demo", State.RUNNING, ""
        status.show_step(step_event("a-rather-long-run-name-for-demo", 192, max_steps=2000))
        await pilot.pause()
        line = status.text().plain
        assert line.rstrip().endswith("ETA 6m47s") and len(line) <= 80, line
