"""The loss plot: raw and EMA-smoothed train loss, eval loss, a branch over its parent's history;
log scale, LR / tokens-per-second / grad-norm views, other runs overlaid for comparison, and a step window
(zoom, pan, follow the newest steps).

Drawing is throttled: new points only mark the plot dirty and a timer redraws at most twice a second.
Every series is downsampled to the plot's width first (min/max per bucket), so the cost of a frame
depends on the terminal size, not on the length of the run.
"""

from __future__ import annotations

import math
import time

import numpy as np
from rich.text import Text
from textual import events
from textual.app import RenderResult
from textual.reactive import reactive
from textual_plotext import PlotextPlot

from tui_trainer.tui.series import Curves, Series, downsample_mean, downsample_minmax, window

VIEWS = ("loss", "eval", "lr", "tok/s", "grad")
TITLES = {"loss": "loss", "eval": "eval loss", "lr": "learning rate", "tok/s": "tokens/s", "grad": "grad norm"}
MIN_WINDOW = 10  # steps: zooming in stops here
FOLLOW_DEFAULT = 1000  # `f` at the whole-run view follows this many newest steps
REDRAW_INTERVAL_S = 0.5
MAX_DRAW_SHARE = 0.03

RAW, PARENT, SMOOTH, EVAL, OTHER = "cyan", "gray", "orange", "green+", "magenta"
# the same colours for the legend, which lives in the border (no plot rows spent on it)
LEGEND_COLORS = {RAW: "cyan", PARENT: "gray", SMOOTH: "orange", EVAL: "lime", OTHER: "magenta"}
# compared runs, in mark order (plotext colour, legend colour); the baseline is always white
PALETTE = (
    ("cyan", "cyan"),
    ("orange", "orange"),
    ("magenta", "magenta"),
    ("green+", "lime"),
    ("yellow+", "yellow"),
    ("red+", "red"),
    ("blue+", "dodgerblue"),
    ("gray", "gray"),
)
BASELINE = ("white", "white")


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
        self._render_cost = 0.02  # seconds per render, smoothed
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
        start = time.perf_counter()
        try:
            return super().render()
        except Exception as exc:  # plotext has edge cases (e.g. log scale of an empty view): never crash the app
            return Text(f"cannot draw this view: {type(exc).__name__}: {exc}", style="dim")
        finally:
            self._drawn_at = time.monotonic()
            self._render_cost = 0.7 * self._render_cost + 0.3 * (time.perf_counter() - start)

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
        if self.dirty and now >= self._held_until and now - self._drawn_at >= self._render_cost / MAX_DRAW_SHARE:
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

    def cycle_view(self) -> None:
        views = self.views()
        self.view = views[(views.index(self.view) + 1) % len(views)] if self.view in views else views[0]

    # ---- the step window

    def extent(self) -> tuple[float, float] | None:
        """The steps any drawn run covers."""
        firsts = [f for c in self._all_curves() if (f := c.first_step) is not None]
        lasts = [last for c in self._all_curves() if (last := c.last_step) is not None]
        return (min(firsts), max(lasts)) if firsts and lasts else None

    def shown_steps(self) -> tuple[float, float] | None:
        """The step range to draw: the follow window, the zoom window, or the whole extent."""
        extent = self.extent()
        if extent is None:
            return None
        if self.follow is not None:
            return (max(extent[0], extent[1] - self.follow), extent[1])
        if self.window is not None:
            return self.window
        return extent

    def zoom(self, factor: float, anchor: float | None = None) -> None:
        """Scale the visible width by `factor` (<1 zooms in) keeping `anchor` (a step; default the right
        edge, i.e. the newest steps) where it is on screen. Zooming out past the run shows the whole run."""
        extent, current = self.extent(), self.shown_steps()
        if extent is None or current is None:
            return
        lo, hi = current
        width = max(MIN_WINDOW, (hi - lo) * factor)
        if width >= extent[1] - extent[0]:
            self.window = None
            if self.follow is not None:
                self.follow = max(MIN_WINDOW, round(width))
            self.redraw()
            return
        if self.follow is not None:  # following: the window stays at the newest steps, only its width changes
            self.follow = round(width)
            self.redraw()
            return
        at = hi if anchor is None or not lo <= anchor <= hi else anchor
        share = (at - lo) / (hi - lo) if hi > lo else 1.0
        self._set_window(at - share * width, width)

    def pan(self, direction: int) -> None:
        """Move the window a quarter of its width left (-1) or right (+1); stops following."""
        current = self.shown_steps()
        if current is None or (self.window is None and self.follow is None):
            return
        lo, hi = current
        self.follow = None
        self._set_window(lo + direction * (hi - lo) / 4, hi - lo)

    def _set_window(self, lo: float, width: float) -> None:
        extent = self.extent()
        if extent is None:
            return
        lo = min(max(lo, extent[0]), extent[1] - width)
        self.window = (lo, lo + width)
        self.redraw()

    def reset_window(self) -> None:
        self.window = None
        self.follow = None
        self.redraw()

    def toggle_follow(self) -> None:
        """Follow the newest steps (as many as are in view when zoomed, else FOLLOW_DEFAULT), or stop."""
        if self.follow is not None:
            self.window, self.follow = self.shown_steps(), None
        else:
            current = self.shown_steps() if self.window is not None else None
            self.follow = round(current[1] - current[0]) if current else FOLLOW_DEFAULT
            self.window = None
        self.redraw()

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.zoom(0.5, self._step_at(event.x))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.zoom(2.0, self._step_at(event.x))

    def _step_at(self, column: int) -> float | None:
        """About the step under a column (the y labels take ~8 columns on the left)."""
        current = self.shown_steps()
        if current is None:
            return None
        share = min(1.0, max(0.0, (column - 9) / max(1, self.size.width - 10)))
        return current[0] + share * (current[1] - current[0])

    def buckets(self) -> int:
        """One bucket per column of the canvas (the y-axis labels take about 8)."""
        return max(8, self.size.width - 8)

    def redraw(self, placeholder: str = "no metrics yet") -> None:
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
            series = self._series(c)
            self._line(series.x, series.y, EVAL if self.view == "eval" else OTHER, TITLES[self.view], minmax=True)
        self._draw_axes(c)
        self.refresh()

    def _title(self) -> str:
        scale = " · log" if self.log_scale else ""
        smooth = f" · EMA {self.smoothing:.2f}" if self.view == "loss" and self.smoothing > 0 else ""
        zoom = f" · last {short_number(self.follow)}" if self.follow is not None else ""
        if self.window is not None and self.follow is None:
            zoom = f" · steps {short_number(self.window[0])}–{short_number(self.window[1])}"
        run = f" · {self.curves.run}" if self.curves else ""
        if self.comparing:
            run = f" · {len(self._all_curves())} runs"
        return f"{TITLES[self.view]}{smooth}{scale}{zoom}{run}"

    def _draw_axes(self, c: Curves) -> None:
        lo, hi = self.x_range if self.x_range else (c.first_step, c.last_step)
        for _run, step in c.branch_points:
            if lo is None or hi is None or lo <= step <= hi:
                self.plt.vline(step, PARENT)
        if self.window is not None or self.follow is not None:
            self.plt.xlim(lo, hi)
        self._set_y_ticks()
        ticks = step_ticks(lo, hi, max(2, self.size.width // 10))
        self.plt.xticks([float(t) for t in ticks], [short_number(t) for t in ticks])
        legend = "  ".join(f"[{color}]━━[/] {label}" for color, label in self._legend)
        self._set_border(subtitle=f"{legend}  [dim]x: step[/]")

    def _series(self, c: Curves) -> Series:
        """The selected view's series of one run (the loss view: EMA when smoothing, else raw)."""
        if self.view == "loss":
            return c.smooth if self.smoothing > 0 and len(c.smooth) == len(c.loss) else c.loss
        return {"eval": c.eval, "lr": c.lr, "tok/s": c.tps, "grad": c.grad}[self.view]

    def _draw_compared(self) -> None:
        """One line per run: the selected run and every marked one in palette colours, the baseline white."""
        colors = self.run_colors()
        ordered = sorted(self._all_curves(), key=lambda c: c.run != self.baseline)  # the baseline drawn first
        for c in ordered:
            is_base = c.run == self.baseline
            color, legend = colors[c.run]
            series = self._series(c)
            label = f"{c.run} (baseline)" if is_base else c.run
            self._line(
                series.x, series.y, color, label, minmax=self.view != "loss" or self.smoothing == 0, legend=legend
            )

    def run_colors(self) -> dict[str, tuple[str, str]]:
        """(plotext colour, legend colour) per compared run: palette order as marked, the baseline white
        (more runs than colours reuse them; the legend names each)."""
        others = [c.run for c in self._all_curves() if c.run != self.baseline]
        out = {run: PALETTE[i % len(PALETTE)] for i, run in enumerate(others)}
        if self.baseline is not None:
            out[self.baseline] = BASELINE
        return out

    def _set_y_ticks(self) -> None:
        """Our own y ticks: plotext's read "0.00002" (linear) and "1000000000.0000" (log)."""
        if self._y_range is None:
            return
        ticks = value_ticks(*self._y_range, count=max(2, self.size.height // 4), log=self.log_scale)
        if ticks:
            label = sci_number if self.view == "lr" else short_number if self.view == "tok/s" else loss_number
            self.plt.yticks(ticks, [label(t) for t in ticks])

    def _draw_loss(self, c: Curves) -> None:
        own = c.own_from
        if own > 0:
            # parent history up to the branch point, dimmed; the branch continues from its last point
            self._line(
                c.loss.x[:own],
                c.loss.y[:own],
                PARENT,
                c.branch_points[-1][0] if c.branch_points else "parent",
            )
        start = max(own - 1, 0)
        self._line(c.loss.x[start:], c.loss.y[start:], RAW, "train", minmax=True)
        if self.smoothing > 0:
            self._line(c.smooth.x[start:], c.smooth.y[start:], SMOOTH, "EMA", minmax=False)
        if len(c.eval):
            self._line(c.eval.x, c.eval.y, EVAL, "eval", minmax=True)

    def _line(
        self, x: np.ndarray, y: np.ndarray, color: str, label: str, minmax: bool = True, legend: str | None = None
    ) -> None:
        # only the visible steps are downsampled (and fit the y range): a zoomed-in window shows its own detail
        lo, hi = self.x_range if self.x_range else (None, None)
        x, y = window(x, y, lo, hi)
        if self.log_scale:
            keep = y > 0
            x, y = x[keep], y[keep]
        if len(x) == 0:
            return
        fn = downsample_minmax if minmax else downsample_mean
        x, y = fn(x, y, self.buckets())
        if len(x) == 0:
            return
        self.points_drawn += len(x)
        self.drawn[label] = len(x)
        self._legend.append((legend or LEGEND_COLORS.get(color, color), label))
        finite = y[np.isfinite(y)]
        if len(finite):
            lo_y, hi_y = float(finite.min()), float(finite.max())
            self._y_range = (
                (lo_y, hi_y) if self._y_range is None else (min(lo_y, self._y_range[0]), max(hi_y, self._y_range[1]))
            )
        self.plt.plot(x.tolist(), y.tolist(), color=color, marker="braille")


def step_ticks(lo: float | None, hi: float | None, count: int) -> list[int]:
    """Round step numbers (1, 2 or 5 x 10^k apart) covering [lo, hi], about `count` of them."""
    if lo is None or hi is None:
        return []
    if hi <= lo:
        return [int(lo)]
    raw = (hi - lo) / max(1, count)
    base = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    spacing = next((m * base for m in (1, 2, 5, 10) if m * base >= raw), 10 * base)
    spacing = max(1, int(spacing))
    first = int(math.ceil(lo / spacing) * spacing)
    return list(range(first, int(hi) + 1, spacing))


def short_number(n: float) -> str:
    """1, 250, 1.5k, 12k, 1.2M: tick labels that stay narrow."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.0f}{suffix}" if value == int(value) or abs(value) >= 10 else f"{value:.1f}{suffix}"
    return f"{n:.0f}"


def value_ticks(lo: float, hi: float, count: int, log: bool = False) -> list[float]:
    """Round values covering [lo, hi]: 1, 2 or 5 x 10^k apart (linear), or 1/2/5 x 10^k (log scale)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if log:
        if hi <= 0:
            return []
        lo = max(lo, hi * 1e-12)
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for mantissas in ((1,), (1, 5), (1, 2, 5)):
            ticks = [m * 10.0**e for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
            if len(ticks) >= 2:
                return ticks
        return [lo, hi] if hi > lo else [hi]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    base = 10.0 ** math.floor(math.log10(raw))
    spacing = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    first = math.ceil(lo / spacing)
    return [round(k * spacing, 12) for k in range(first, math.floor(hi / spacing) + 1)]


def sci_number(v: float) -> str:
    """1e-3, 2.5e-4, 0: learning rates as people write them."""
    if v == 0:
        return "0"
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def loss_number(v: float) -> str:
    """3, 2.5, 0.25: as few digits as tell the ticks apart."""
    return f"{v:.3g}"
