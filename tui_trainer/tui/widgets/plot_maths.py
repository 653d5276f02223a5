"""The loss plot's maths, textual-free: which steps are in view (zoom, pan, follow), which points of a
series get drawn (windowed, downsampled to the plot's width), the colours of compared runs, and round
tick values with narrow labels. loss_plot.py draws what this computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from tui_trainer.tui.series import Curves, Series, downsample_mean, downsample_minmax, window

Range = tuple[float, float]

VIEWS = ("loss", "eval", "lr", "tok/s", "grad")
TITLES = {"loss": "loss", "eval": "eval loss", "lr": "learning rate", "tok/s": "tokens/s", "grad": "grad norm"}
MIN_WINDOW = 10  # steps: zooming in stops here
FOLLOW_DEFAULT = 1000  # `f` at the whole-run view follows this many newest steps
SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99)  # what [ and ] step the EMA through

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


# ---- the step window: `window` is a zoom (None: the whole run), `follow` keeps the newest N steps


def extent_of(curves: list[Curves]) -> Range | None:
    """The steps any of these runs covers."""
    firsts = [f for c in curves if (f := c.first_step) is not None]
    lasts = [last for c in curves if (last := c.last_step) is not None]
    return (min(firsts), max(lasts)) if firsts and lasts else None


def shown_steps(extent: Range | None, window: Range | None, follow: int | None) -> Range | None:
    """The step range to draw: the follow window, the zoom window, or the whole extent."""
    if extent is None:
        return None
    if follow is not None:
        return (max(extent[0], extent[1] - follow), extent[1])
    if window is not None:
        return window
    return extent


def clamp_window(extent: Range, lo: float, width: float) -> Range:
    """A window of `width` steps starting near `lo`, kept inside the run."""
    lo = min(max(lo, extent[0]), extent[1] - width)
    return (lo, lo + width)


def zoom(
    extent: Range, window: Range | None, follow: int | None, factor: float, anchor: float | None
) -> tuple[Range | None, int | None]:
    """(window, follow) after scaling the visible width by `factor` (<1 zooms in), keeping `anchor` (a step;
    default the right edge, i.e. the newest steps) where it is on screen. Past the run: the whole run."""
    current = shown_steps(extent, window, follow)
    assert current is not None
    lo, hi = current
    width = max(MIN_WINDOW, (hi - lo) * factor)
    if width >= extent[1] - extent[0]:
        return None, (max(MIN_WINDOW, round(width)) if follow is not None else None)
    if follow is not None:  # following: the window stays at the newest steps, only its width changes
        return window, round(width)
    at = hi if anchor is None or not lo <= anchor <= hi else anchor
    share = (at - lo) / (hi - lo) if hi > lo else 1.0
    return clamp_window(extent, at - share * width, width), follow


def pan(extent: Range, window: Range | None, follow: int | None, direction: int) -> Range | None:
    """The window moved a quarter of its width left (-1) or right (+1); None at the whole-run view."""
    if window is None and follow is None:
        return None
    lo, hi = shown_steps(extent, window, follow) or extent
    return clamp_window(extent, lo + direction * (hi - lo) / 4, hi - lo)


def toggle_follow(extent: Range | None, window: Range | None, follow: int | None) -> tuple[Range | None, int | None]:
    """(window, follow): follow the newest steps (as many as are in view when zoomed, else FOLLOW_DEFAULT),
    or stop following and keep what is in view."""
    if follow is not None:
        return shown_steps(extent, window, follow), None
    current = shown_steps(extent, window, follow) if window is not None else None
    return None, (round(current[1] - current[0]) if current else FOLLOW_DEFAULT)


def step_at(shown: Range | None, column: int, width: int) -> float | None:
    """About the step under a column of a plot `width` columns wide (the y labels take ~8 on the left)."""
    if shown is None:
        return None
    share = min(1.0, max(0.0, (column - 9) / max(1, width - 10)))
    return shown[0] + share * (shown[1] - shown[0])


# ---- what gets drawn


def next_smoothing(current: float, direction: int) -> float:
    """The EMA weight `direction` steps (-1 less, +1 more smoothing) from the one nearest `current`."""
    nearest = min(range(len(SMOOTHING_STEPS)), key=lambda i: abs(SMOOTHING_STEPS[i] - current))
    return SMOOTHING_STEPS[max(0, min(len(SMOOTHING_STEPS) - 1, nearest + direction))]


def title_candidates(
    view: str, log: bool, smoothing: float, window: Range | None, follow: int | None, run: str
) -> tuple[str, ...]:
    """The plot's border title, longest first: a narrow plot keeps the run's name (`run`: " · name" or
    " · N runs") and drops the smoothing, scale and window first (the keys that set them say them)."""
    scale = " · log" if log else ""
    smooth = f" · EMA {smoothing:.2f}" if view == "loss" and smoothing > 0 else ""
    zoom = f" · last {short_number(follow)}" if follow is not None else ""
    if window is not None and follow is None:
        zoom = f" · steps {short_number(window[0])}–{short_number(window[1])}"
    name = TITLES[view]
    return (f"{name}{smooth}{scale}{zoom}{run}", f"{name}{zoom}{run}", f"{name}{run}", run.lstrip(" ·"))


def view_series(c: Curves, view: str, smoothing: float) -> Series:
    """One run's series for a view (the loss view: EMA when smoothing, else raw)."""
    if view == "loss":
        return c.smooth if smoothing > 0 and len(c.smooth) == len(c.loss) else c.loss
    return {"eval": c.eval, "lr": c.lr, "tok/s": c.tps, "grad": c.grad}[view]


def visible_points(
    x: np.ndarray, y: np.ndarray, shown: Range | None, log: bool, minmax: bool, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Only the visible steps, downsampled to `buckets` (min/max or mean per bucket): a zoomed-in window
    shows its own detail, and a frame costs the plot's width, not the run's length."""
    lo, hi = shown if shown else (None, None)
    x, y = window(x, y, lo, hi)
    if log:  # a log scale cannot place zero or negative values
        keep = y > 0
        x, y = x[keep], y[keep]
    if len(x) == 0:
        return x, y
    fn = downsample_minmax if minmax else downsample_mean
    return fn(x, y, buckets)


def restart_marks(restarts: list[tuple[float, str]], shown: Range | None, buckets: int) -> list[float]:
    """The restart steps to mark: those in view, at most one per bucket (a run requeued thousands of times
    costs a frame no more than its width does)."""
    steps = sorted({step for step, _ in restarts if shown is None or shown[0] <= step <= shown[1]})
    if len(steps) <= buckets:
        return steps
    lo, hi = shown if shown else (steps[0], steps[-1])
    width = max(hi - lo, 1e-9) / max(1, buckets)
    marks: dict[int, float] = {}
    for step in steps:
        marks.setdefault(int((step - lo) / width), step)
    return list(marks.values())


def widen(span: Range | None, y: np.ndarray) -> Range | None:
    """The y range so far, widened to cover the finite values of `y`."""
    finite = y[np.isfinite(y)]
    if not len(finite):
        return span
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if span is None else (min(lo, span[0]), max(hi, span[1]))


def run_colors(runs: list[str], baseline: str | None) -> dict[str, tuple[str, str]]:
    """(plotext colour, legend colour) per compared run: palette order as marked, the baseline white
    (more runs than colours reuse them; the legend names each)."""
    others = [run for run in runs if run != baseline]
    out = {run: PALETTE[i % len(PALETTE)] for i, run in enumerate(others)}
    if baseline is not None:
        out[baseline] = BASELINE
    return out


def fit_legend(entries: list[tuple[str, str]], width: int) -> str:
    """The legend as rich markup, `━━ label` per (colour, label) entry, in order, as many as fit in `width`
    cells; the rest are counted ("+12 more"), never cut mid-name."""
    shown: list[str] = []
    used = 0
    for i, (color, label) in enumerate(entries):
        cost = len(label) + 5  # "━━ " + label + the two-space separator
        rest = len(entries) - i - 1
        more = len(f"+{rest} more  ") if rest else 0
        if used + cost + more > width:
            shown.append(f"[dim]+{len(entries) - i} more[/]")
            break
        shown.append(f"[{color}]━━[/] {label}")
        used += cost
    return "  ".join(shown)


# ---- ticks and their labels


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


def tick_label(view: str) -> Callable[[float], str]:
    """The label function for a view's y ticks."""
    return sci_number if view == "lr" else short_number if view == "tok/s" else loss_number
