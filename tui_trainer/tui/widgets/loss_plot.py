"""The loss plot: raw and EMA-smoothed train loss, eval loss, a branch over its parent's history;
log scale and an LR / tokens-per-second view.

Drawing is throttled: new points only mark the plot dirty and a timer redraws at most twice a second.
Every series is downsampled to the plot's width first (min/max per bucket), so the cost of a frame
depends on the terminal size, not on the length of the run.
"""

from __future__ import annotations

import math
import time

import numpy as np
from rich.text import Text
from textual.app import RenderResult
from textual.reactive import reactive
from textual_plotext import PlotextPlot

from tui_trainer.tui.series import Curves, downsample_mean, downsample_minmax

VIEWS = ("loss", "lr", "tok/s")
REDRAW_INTERVAL_S = 0.5
MAX_DRAW_SHARE = 0.03

RAW, PARENT, SMOOTH, EVAL, OTHER = "cyan", "gray", "orange", "green+", "magenta"
# the same colours for the legend, which lives in the border (no plot rows spent on it)
LEGEND_COLORS = {RAW: "cyan", PARENT: "gray", SMOOTH: "orange", EVAL: "lime", OTHER: "magenta"}


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
        self._drawn_at = 0.0
        self._held_until = 0.0
        self._render_cost = 0.02  # seconds per render, smoothed

    def on_mount(self) -> None:
        super().on_mount()
        self.border_title = "Loss"
        self.set_interval(REDRAW_INTERVAL_S, self._tick)
        self.redraw()

    def set_curves(self, curves: Curves | None) -> None:
        self.curves = curves
        if curves is not None:
            curves.set_smoothing(self.smoothing)
        self.redraw()

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
        if self.curves is not None:
            self.curves.set_smoothing(value)
        self.redraw()

    def cycle_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]

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
        self._legend: list[tuple[str, str]] = []
        self._y_range: tuple[float, float] | None = None
        c = self.curves
        title = {"loss": "loss", "lr": "learning rate", "tok/s": "tokens/s"}[self.view]
        scale = " · log" if self.log_scale else ""
        smooth = f" · EMA {self.smoothing:.2f}" if self.view == "loss" and self.smoothing > 0 else ""
        self._set_border(title=f"{title}{smooth}{scale}" + (f" · {c.run}" if c else ""))
        if c is None or len(c.loss) + len(c.eval) == 0:
            plt.yscale("linear")  # plotext cannot log-scale an empty plot
            plt.title(placeholder)
            self._set_border(subtitle="")
            self.refresh()
            return
        plt.yscale("log" if self.log_scale else "linear")
        if self.view == "loss":
            self._draw_loss(c)
        elif self.view == "lr":
            self._line(c.lr.x, c.lr.y, OTHER, "lr", minmax=True)
        else:
            self._line(c.tps.x, c.tps.y, OTHER, "tokens/s", minmax=True)
        for _run, step in c.branch_points:
            plt.vline(step, PARENT)
        self._set_y_ticks()
        ticks = step_ticks(c.first_step, c.last_step, max(2, self.size.width // 10))
        plt.xticks([float(t) for t in ticks], [short_number(t) for t in ticks])
        legend = "  ".join(f"[{LEGEND_COLORS[color]}]━━[/] {label}" for color, label in self._legend)
        self._set_border(subtitle=f"{legend}  [dim]x: step[/]")
        self.refresh()

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

    def _line(self, x: np.ndarray, y: np.ndarray, color: str, label: str, minmax: bool = True) -> None:
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
        self._legend.append((color, label))
        finite = y[np.isfinite(y)]
        if len(finite):
            lo, hi = float(finite.min()), float(finite.max())
            self._y_range = (
                (lo, hi) if self._y_range is None else (min(lo, self._y_range[0]), max(hi, self._y_range[1]))
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
