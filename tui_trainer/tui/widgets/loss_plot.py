"""The loss plot: raw and EMA-smoothed train loss, eval loss, a branch over its parent's history, a ↻ at
each step where the run restarted itself (metrics.jsonl's resume markers with a reason); log scale,
LR / tokens-per-second / grad-norm views, other runs overlaid for comparison, and a step window
(zoom, pan, follow the newest steps).

Drawing is throttled: new points only mark the plot dirty and a timer redraws at most twice a second.
Every series is downsampled to the plot's width first (min/max per bucket), so the cost of a frame
depends on the terminal size, not on the length of the run. The maths (the step window, downsampling,
ticks, which restart steps to mark) is in plot_maths.py, textual-free; this module draws.
"""

from __future__ import annotations

import time

import numpy as np
from rich.text import Text
from textual import events
from textual.app import RenderResult
from textual.geometry import Region
from textual.reactive import reactive
from textual.strip import Strip
from textual_plotext import PlotextPlot

from tui_trainer.tui.series import Curves
from tui_trainer.tui.widgets import plot_maths as pm
from tui_trainer.tui.widgets.plot_maths import TITLES, short_number
from tui_trainer.tui.widgets.text_fit import BORDER_LABEL_MARGIN, first_that_fits

REDRAW_INTERVAL_S = 0.5
MAX_DRAW_SHARE = 0.03

RAW, PARENT, SMOOTH, EVAL, OTHER, RESTART = "cyan", "gray", "orange", "green+", "magenta", "red"
# the same colours for the legend, which lives in the border (no plot rows spent on it)
LEGEND_COLORS = {RAW: "cyan", PARENT: "gray", SMOOTH: "orange", EVAL: "lime", OTHER: "magenta", RESTART: "red"}
RESTART_GLYPH = "↻"  # on the bottom row at each step where the run continued by itself (one cell wide)


class LossPlot(PlotextPlot):
    """Plots one run's Curves; call `set_curves` to switch runs and `mark_dirty` after appending."""

    view: reactive[str] = reactive("loss")
    log_scale: reactive[bool] = reactive(False)
    smoothing: reactive[float] = reactive(0.9)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.curves: Curves | None = None
        self.dirty = True
        self.points_drawn = 0  # points handed to plotext in the last draw (all series)
        self.drawn: dict[str, int] = {}  # points handed to plotext per legend label, in the last draw
        self._drawn_at = 0.0
        self._held_until = 0.0
        self._frame_cost = 0.05  # seconds per frame (redraw + plotext build + strips), smoothed
        self._redraw_cost = 0.0  # the last redraw()'s share of the frame it prepared
        self._rendered = False  # set by render(): the next render_lines builds a new frame, not a cached one
        self.compared: list[Curves] = []  # other runs overlaid (marked, and the baseline)
        self.baseline: str | None = None
        self.window: tuple[float, float] | None = None  # the visible steps; None: the whole run
        self.follow: int | None = None  # keep the newest `follow` steps in view
        self.x_range: tuple[float, float] | None = None  # the steps the last draw covered

    def on_mount(self) -> None:
        super().on_mount()
        self.border_title = "Loss"
        self.set_interval(REDRAW_INTERVAL_S, self._tick)
        self.redraw()

    def set_curves(self, curves: Curves | None) -> None:
        self.curves = curves
        if curves is not None:
            curves.set_smoothing(self.smoothing)
        extent = self.extent()
        window = self.window
        if window is not None and extent is not None and (window[0] > extent[1] or window[1] < extent[0]):
            self.window = None  # the zoom window of another run shows nothing of this one: the whole run
        self.redraw()

    def set_compared(self, curves: list[Curves], baseline: str | None) -> None:
        """Overlay these runs (besides `curves`, the selected one), each in its own colour; `baseline` names
        the one drawn white that stays while marks come and go."""
        self.compared = curves
        self.baseline = baseline
        for c in curves:
            c.set_smoothing(self.smoothing)
        self.redraw()

    @property
    def comparing(self) -> bool:
        return any(c is not self.curves for c in self.compared)

    def _set_border(self, title: str | None = None, subtitle: str | None = None) -> None:
        # only on change: setting a border text refreshes the widget, and this runs twice a second
        if title is not None and title != self.border_title:
            self.border_title = title
        if subtitle is not None and subtitle != self.border_subtitle:
            self.border_subtitle = subtitle

    def render(self) -> RenderResult:
        self._rendered = True
        try:
            return super().render()
        except Exception as exc:  # plotext has edge cases (e.g. log scale of an empty view): never crash the app
            return Text(f"cannot draw this view: {type(exc).__name__}: {exc}", style="dim")

    def render_lines(self, crop: Region) -> list[Strip]:
        # A frame costs more than render(): redraw() first (slicing, downsampling, plotext calls), and Textual
        # then turns plotext's ANSI text into styled strips (+20-40 % at 120x40). The throttle counts it all.
        start = time.perf_counter()
        self._rendered = False
        strips = super().render_lines(crop)
        if self._rendered:
            cost = self._redraw_cost + time.perf_counter() - start
            self._frame_cost = 0.7 * self._frame_cost + 0.3 * cost
            self._drawn_at = time.monotonic()
            self._redraw_cost = 0.0
        return strips

    def show_loading(self, run: str) -> None:
        """A placeholder while the run's history loads on a worker thread."""
        self.curves = None
        self.redraw(placeholder=f"loading {run}…")

    def mark_dirty(self) -> None:
        self.dirty = True

    def hold(self, seconds: float) -> None:
        """Skip redraws for a moment, so a frame that acknowledges a key is not held up behind a plot render."""
        self._held_until = time.monotonic() + seconds

    def _tick(self) -> None:
        # New points redraw at most every REDRAW_INTERVAL_S, and never so often that drawing takes more than
        # MAX_DRAW_SHARE of the UI thread: plotext is pure Python and holds the GIL the trainer needs.
        now = time.monotonic()
        if self.dirty and now >= self._held_until and now - self._drawn_at >= self._frame_cost / MAX_DRAW_SHARE:
            self.redraw()

    def watch_view(self) -> None:
        self.redraw()

    def watch_log_scale(self) -> None:
        self.redraw()

    def watch_smoothing(self, value: float) -> None:
        for c in self._all_curves():
            c.set_smoothing(value)
        self.redraw()

    def _all_curves(self) -> list[Curves]:
        runs = [] if self.curves is None else [self.curves]
        return runs + [c for c in self.compared if c is not self.curves]

    def views(self) -> list[str]:
        """The views `v` cycles through: eval loss on its own only when comparing runs (alone, the loss view
        shows it), grad norm only where metrics carry it."""
        out = ["loss"] + (["eval"] if self.comparing else []) + ["lr", "tok/s"]
        return out + (["grad"] if any(len(c.grad) for c in self._all_curves()) else [])

    def step_smoothing(self, direction: int) -> None:
        """[ and ]: less (-1) or more (+1) EMA smoothing of the loss view."""
        self.smoothing = pm.next_smoothing(self.smoothing, direction)

    def cycle_view(self) -> None:
        views = self.views()
        self.view = views[(views.index(self.view) + 1) % len(views)] if self.view in views else views[0]

    # ---- the step window

    def extent(self) -> tuple[float, float] | None:
        """The steps any drawn run covers."""
        return pm.extent_of(self._all_curves())

    def shown_steps(self) -> tuple[float, float] | None:
        """The step range to draw: the follow window, the zoom window, or the whole extent."""
        return pm.shown_steps(self.extent(), self.window, self.follow)

    def zoom(self, factor: float, anchor: float | None = None) -> None:
        """Scale the visible width by `factor` (<1 zooms in) keeping `anchor` (a step; default the right
        edge, i.e. the newest steps) where it is on screen. Zooming out past the run shows the whole run."""
        extent = self.extent()
        if extent is None:
            return
        self.window, self.follow = pm.zoom(extent, self.window, self.follow, factor, anchor)
        self.redraw()

    def pan(self, direction: int) -> None:
        """Move the window a quarter of its width left (-1) or right (+1); stops following."""
        extent = self.extent()
        moved = None if extent is None else pm.pan(extent, self.window, self.follow, direction)
        if moved is None:
            return
        self.window, self.follow = moved, None
        self.redraw()

    def reset_window(self) -> None:
        self.window = None
        self.follow = None
        self.redraw()

    def toggle_follow(self) -> None:
        """Follow the newest steps (as many as are in view when zoomed, else FOLLOW_DEFAULT), or stop."""
        self.window, self.follow = pm.toggle_follow(self.extent(), self.window, self.follow)
        self.redraw()

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.zoom(0.5, self._step_at(event.x))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.zoom(2.0, self._step_at(event.x))

    def _step_at(self, column: int) -> float | None:
        return pm.step_at(self.shown_steps(), column, self.size.width)

    def buckets(self) -> int:
        """One bucket per column of the canvas (the y-axis labels take about 8)."""
        return max(8, self.size.width - 8)

    def redraw(self, placeholder: str = "no metrics yet") -> None:
        start = time.perf_counter()
        try:
            self._prepare(placeholder)
        finally:
            self._redraw_cost += time.perf_counter() - start

    def _prepare(self, placeholder: str) -> None:
        self.dirty = False
        if not self.is_mounted:
            return
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        self.points_drawn = 0
        self.drawn = {}
        self._legend: list[tuple[str, str]] = []
        self._y_range: tuple[float, float] | None = None
        c = self.curves
        if self.view not in self.views():
            self.view = "loss"  # e.g. the eval view after the marks were cleared (the watcher redraws)
            return
        self._set_border(title=self._title())
        if c is None or len(c.loss) + len(c.eval) == 0:
            plt.yscale("linear")  # plotext cannot log-scale an empty plot
            plt.title(placeholder)
            self._set_border(subtitle="")
            self.x_range = None
            self.refresh()
            return
        plt.yscale("log" if self.log_scale else "linear")
        self.x_range = self.shown_steps()
        if self.comparing:
            self._draw_compared()
        elif self.view == "loss":
            self._draw_loss(c)
        else:
            series = pm.view_series(c, self.view, self.smoothing)
            self._line(series.x, series.y, EVAL if self.view == "eval" else OTHER, TITLES[self.view], minmax=True)
        self._draw_axes(c)
        self.refresh()

    def _title(self) -> str:
        run = f" · {self.curves.run}" if self.curves else ""
        if self.comparing:
            run = f" · {len(self._all_curves())} runs"
        candidates = pm.title_candidates(self.view, self.log_scale, self.smoothing, self.window, self.follow, run)
        return first_that_fits(candidates, self.outer_size.width - BORDER_LABEL_MARGIN)

    def _draw_axes(self, c: Curves) -> None:
        lo, hi = self.x_range if self.x_range else (c.first_step, c.last_step)
        for _run, step in c.branch_points:
            if lo is None or hi is None or lo <= step <= hi:
                self.plt.vline(step, PARENT)
        self._draw_restarts(c)
        if self.window is not None or self.follow is not None:
            self.plt.xlim(lo, hi)
        self._set_y_ticks()
        ticks = pm.step_ticks(lo, hi, max(2, self.size.width // 10))
        self.plt.xticks([float(t) for t in ticks], [short_number(t) for t in ticks])
        # the border has the width less its corners; runs that do not fit are counted (the tree's ● names them)
        legend = pm.fit_legend(self._legend, self.size.width - 4 - len("x: step"))
        self._set_border(subtitle=f"{legend}  [dim]x: step[/]")

    def _draw_restarts(self, c: Curves) -> None:
        """A small ↻ on the bottom row at each restart step in view (the selected run alone: compared runs'
        restarts would be one more colour to tell apart)."""
        if self.comparing or not c.restarts or self._y_range is None:
            return
        marks = pm.restart_marks(c.restarts, self.x_range, self.buckets())
        if not marks:
            return
        self.points_drawn += len(marks)
        self.drawn["restart"] = len(marks)
        self._legend.append((LEGEND_COLORS[RESTART], f"{RESTART_GLYPH} restart"))
        self.plt.scatter(marks, [self._y_range[0]] * len(marks), marker=RESTART_GLYPH, color=RESTART)

    def _draw_compared(self) -> None:
        """One line per run: the selected run and every marked one in palette colours, the baseline white."""
        colors = self.run_colors()
        ordered = sorted(self._all_curves(), key=lambda c: c.run != self.baseline)  # the baseline drawn first
        for c in ordered:
            is_base = c.run == self.baseline
            color, legend = colors[c.run]
            series = pm.view_series(c, self.view, self.smoothing)
            label = f"{c.run} (baseline)" if is_base else c.run
            self._line(
                series.x, series.y, color, label, minmax=self.view != "loss" or self.smoothing == 0, legend=legend
            )

    def run_colors(self) -> dict[str, tuple[str, str]]:
        """(plotext colour, legend colour) per compared run: palette order as marked, the baseline white
        (more runs than colours reuse them; the legend names each)."""
        return pm.run_colors([c.run for c in self._all_curves()], self.baseline)

    def _set_y_ticks(self) -> None:
        """Our own y ticks: plotext's read "0.00002" (linear) and "1000000000.0000" (log)."""
        if self._y_range is None:
            return
        ticks = pm.value_ticks(*self._y_range, count=max(2, self.size.height // 4), log=self.log_scale)
        if ticks:
            label = pm.tick_label(self.view)
            self.plt.yticks(ticks, [label(t) for t in ticks])

    def _draw_loss(self, c: Curves) -> None:
        own = c.own_from
        if own > 0:
            # parent history up to the branch point, dimmed; the branch continues from its last point
            parent = c.branch_points[-1][0] if c.branch_points else "parent"
            self._line(c.loss.x[:own], c.loss.y[:own], PARENT, parent)
        start = max(own - 1, 0)
        self._line(c.loss.x[start:], c.loss.y[start:], RAW, "train", minmax=True)
        if self.smoothing > 0:
            self._line(c.smooth.x[start:], c.smooth.y[start:], SMOOTH, "EMA", minmax=False)
        if len(c.eval):
            self._line(c.eval.x, c.eval.y, EVAL, "eval", minmax=True)

    def _line(
        self, x: np.ndarray, y: np.ndarray, color: str, label: str, minmax: bool = True, legend: str | None = None
    ) -> None:
        # only the visible steps are downsampled (and fit the y range)
        x, y = pm.visible_points(x, y, self.x_range, self.log_scale, minmax, self.buckets())
        if len(x) == 0:
            return
        self.points_drawn += len(x)
        self.drawn[label] = len(x)
        self._legend.append((legend or LEGEND_COLORS.get(color, color), label))
        self._y_range = pm.widen(self._y_range, y)
        self.plt.plot(x.tolist(), y.tolist(), color=color, marker="braille")
