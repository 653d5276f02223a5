"""Curve data for the plot: growable arrays, EMA smoothing and min/max downsampling.

Pure numpy (no textual, no torch) so it is cheap to test. Drawing cost must not grow with the length of a
run: every series is reduced to about two points per terminal column before it reaches plotext.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tui_trainer.core.metrics_cache import MetricColumns


class Series:
    """An append-only (x, y) series backed by numpy arrays that double in capacity."""

    def __init__(self, capacity: int = 256) -> None:
        self._x = np.empty(capacity, dtype=np.float64)
        self._y = np.empty(capacity, dtype=np.float64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, x: float, y: float) -> None:
        if self._n == len(self._x):
            self._grow(self._n + 1)
        self._x[self._n] = x
        self._y[self._n] = y
        self._n += 1

    def extend(self, xs: Iterable[float], ys: Iterable[float]) -> None:
        ax = np.asarray(xs if isinstance(xs, np.ndarray) else list(xs), dtype=np.float64)
        ay = np.asarray(ys if isinstance(ys, np.ndarray) else list(ys), dtype=np.float64)
        need = self._n + len(ax)
        if need > len(self._x):
            self._grow(need)
        self._x[self._n : need] = ax
        self._y[self._n : need] = ay
        self._n = need

    def _grow(self, need: int) -> None:
        size = max(need, 2 * len(self._x))
        for name in ("_x", "_y"):
            old = getattr(self, name)
            new = np.empty(size, dtype=np.float64)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    @property
    def x(self) -> np.ndarray:
        return self._x[: self._n]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self._n]

    @property
    def last_x(self) -> float | None:
        return float(self._x[self._n - 1]) if self._n else None


def ema(values: np.ndarray, smoothing: float, acc: float = 0.0, weight: float = 0.0) -> tuple[np.ndarray, float, float]:
    """Debiased exponential moving average (as TensorBoard draws it); `smoothing` in [0, 1).

    Returns (smoothed, acc, weight) so a caller can continue the average point by point. Non-finite
    values (a NaN loss) are skipped so one bad step does not blank the rest of the curve: the average
    holds its last value there.
    """
    s, r = smoothing, 1.0 - smoothing
    finite = np.isfinite(values)
    v = np.asarray(values, dtype=np.float64)[finite]
    if not len(v):
        return np.full(len(values), acc / weight if weight else math.nan), acc, weight
    accs = _linear_recurrence(r * v, s, acc)  # acc_k = s * acc_{k-1} + r * v_k
    # weight_k = s * weight_{k-1} + r, in closed form: s**(k+1) * weight + 1 - s**(k+1)
    decay = np.exp(np.arange(1, len(v) + 1) * math.log(s)) if s > 0 else np.zeros(len(v))
    weights = decay * weight + (1.0 - decay)
    held = np.cumsum(finite) - 1  # the last finite value at or before each point (-1: none yet)
    ratio = np.append(accs / weights, acc / weight if weight else math.nan)  # index -1: the incoming average
    return ratio[held], float(accs[-1]), float(weights[-1])


_EMA_BLOCK = 64


def _linear_recurrence(x: np.ndarray, s: float, start: float) -> np.ndarray:
    """y_k = s * y_{k-1} + x_k with y_{-1} = start, vectorised: a 10^6-step history is smoothed in
    milliseconds instead of a Python loop's ~0.2 s. Blocks of 64 are solved with one matrix product
    (powers of s are <= 1, so nothing overflows); the blocks' carries form the same recurrence with
    s**64, solved the same way."""
    n, size = len(x), _EMA_BLOCK
    if n <= size:
        out = np.empty(n, dtype=np.float64)
        y = start
        for i, value in enumerate(x.tolist()):
            y = s * y + value
            out[i] = y
        return out
    blocks = np.concatenate([x, np.zeros(-n % size)]).reshape(-1, size)
    k = np.arange(size)
    lag = k[:, None] - k[None, :]
    within = np.where(lag >= 0, s ** np.maximum(lag, 0), 0.0)  # within[k, j] = s**(k-j) for j <= k
    local = blocks @ within.T  # each block as if it started from 0
    ends = _linear_recurrence(local[:, -1], s**size, start)  # each block's last value, carries included
    carry_in = np.concatenate([[start], ends[:-1]])
    return (local + s ** (k + 1)[None, :] * carry_in[:, None]).ravel()[:n]


def downsample_minmax(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce to at most 2 points per bucket: each bucket's min and max, in the order they occur.

    Keeps spikes visible (a plain stride would drop them) and costs O(n) vectorised work, so drawing a
    million-step curve costs about what drawing a thousand-step one does.
    """
    x, y = _finite(x, y)
    n = len(y)
    buckets = max(1, int(buckets))
    if n <= 2 * buckets:  # few enough points to draw them all
        return x.copy(), y.copy()
    size = -(-n // buckets)  # ceil: the last bucket may be shorter
    full = n // size
    parts_x: list[np.ndarray] = []
    parts_y: list[np.ndarray] = []
    if full:
        ys = y[: full * size].reshape(full, size)
        xs = x[: full * size].reshape(full, size)
        _minmax_rows(xs, ys, parts_x, parts_y)
    if n > full * size:
        _minmax_rows(x[full * size :][None, :], y[full * size :][None, :], parts_x, parts_y)
    return np.concatenate(parts_x), np.concatenate(parts_y)


def _minmax_rows(xs: np.ndarray, ys: np.ndarray, out_x: list[np.ndarray], out_y: list[np.ndarray]) -> None:
    rows = np.arange(len(ys))
    lo = ys.argmin(axis=1)
    hi = ys.argmax(axis=1)
    first = np.minimum(lo, hi)
    second = np.maximum(lo, hi)
    out_x.append(np.stack([xs[rows, first], xs[rows, second]], axis=1).ravel())
    out_y.append(np.stack([ys[rows, first], ys[rows, second]], axis=1).ravel())


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop NaN/Inf points: plotext cannot place them (a diverged run's tail is shown by the banner)."""
    finite = np.isfinite(y)
    return (x, y) if finite.all() else (x[finite], y[finite])


def downsample_mean(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """One point per bucket (mean x, mean y): for curves that are already smooth."""
    x, y = _finite(x, y)
    n = len(y)
    buckets = max(1, int(buckets))
    if n <= 2 * buckets:  # few enough points to draw them all
        return x.copy(), y.copy()
    starts = np.linspace(0, n, 2 * buckets + 1).astype(np.int64)[:-1]
    starts = np.unique(starts)
    counts = np.diff(np.append(starts, n))
    return np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts


@dataclass
class Curves:
    """Everything the plot can show for one run's history (its ancestors' segments included).

    `own_from` is the index in the train series where this run's own records start; points before it
    belong to the parent history and are drawn dimmed.
    """

    run: str
    loss: Series = field(default_factory=Series)
    eval: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    tps: Series = field(default_factory=Series)
    grad: Series = field(default_factory=Series)  # grad_norm, where metrics lines carry it
    smooth: Series = field(default_factory=Series)
    smoothing: float = 0.9
    own_from: int = 0
    own_eval_from: int = 0
    branch_points: list[tuple[str, int]] = field(default_factory=list)
    restarts: list[tuple[float, str]] = field(default_factory=list)  # (step, reason): the run continued itself

    _acc: float = 0.0
    _weight: float = 0.0

    def set_smoothing(self, smoothing: float) -> None:
        """Change the EMA factor: recomputed once here, then extended point by point as steps arrive."""
        if smoothing == self.smoothing and len(self.smooth) == len(self.loss):
            return
        self.smoothing = smoothing
        values, self._acc, self._weight = ema(self.loss.y, smoothing)
        self.smooth = Series(max(256, len(values)))
        self.smooth.extend(self.loss.x, values)

    def _push_smooth(self, x: float, y: float) -> None:
        s = self.smoothing
        if math.isfinite(y):
            self._acc = s * self._acc + (1 - s) * y
            self._weight = s * self._weight + (1 - s)
        self.smooth.append(x, self._acc / self._weight if self._weight else math.nan)

    @property
    def first_step(self) -> float | None:
        firsts = [float(s.x[0]) for s in (self.loss, self.eval) if len(s)]
        return min(firsts) if firsts else None

    @property
    def last_step(self) -> float | None:
        steps = [s for s in (self.loss.last_x, self.eval.last_x) if s is not None]
        return max(steps) if steps else None

    @classmethod
    def from_segments(
        cls,
        run: str,
        segments: Sequence[tuple[str, list[dict[str, Any]] | MetricColumns]],
        branch_steps: list[int] | None = None,
    ) -> Curves:
        """Build from RunStore.history() records or metrics_cache.history_columns(): ancestors' records up
        to each branch point, then the run's own.

        `branch_steps[i]` is the step where segment i+1 branched off segment i (RunStore.lineage()).
        """
        curves = cls(run=run)
        steps = list(branch_steps or [])
        for index, (segment_run, records) in enumerate(segments):
            if segment_run == run:
                curves.own_from = len(curves.loss)
                curves.own_eval_from = len(curves.eval)
            if isinstance(records, MetricColumns):
                curves.add_columns(records)
            else:
                curves.add_records(records)
            if index < len(segments) - 1:
                last = curves.last_step
                step = steps[index] if index < len(steps) else int(last) if last is not None else 0
                curves.branch_points.append((segment_run, step))
        return curves

    def add_records(self, records: Iterable[dict[str, Any]]) -> None:
        """Append metrics.jsonl records (or event dicts) newer than what is already here."""
        for r in records:
            step = r.get("step")
            if step is None:
                continue
            has_eval = r.get("eval_loss") is not None
            if has_eval and (self.eval.last_x is None or step > self.eval.last_x):
                self.eval.append(step, float(r["eval_loss"]))
            loss = r.get("loss")
            if loss is None or (self.loss.last_x is not None and step <= self.loss.last_x):
                continue
            self.loss.append(step, float(loss))
            self._push_smooth(step, float(loss))
            self.lr.append(step, float(r.get("lr") or 0.0))
            tps = r.get("tokens_per_s")
            if tps is not None:
                self.tps.append(step, float(tps))
            grad = r.get("grad_norm")
            if grad is not None:
                self.grad.append(step, float(grad))

    def add_columns(self, columns: MetricColumns) -> None:
        """add_records for a whole column table at once (no per-record Python work: a 10^6-step history
        lands in milliseconds). Same rules: a row counts only if its step is past the series' last one."""
        self.restarts.extend(columns.restarts)
        step = columns["step"]
        evals = ~np.isnan(columns["eval_loss"])
        keep = _past(step[evals], self.eval.last_x)
        self.eval.extend(step[evals][keep], columns["eval_loss"][evals][keep])
        rows = np.flatnonzero(~np.isnan(columns["loss"]))
        rows = rows[_past(step[rows], self.loss.last_x)]
        x, loss = step[rows], columns["loss"][rows]
        self.loss.extend(x, loss)
        smoothed, self._acc, self._weight = ema(loss, self.smoothing, self._acc, self._weight)
        self.smooth.extend(x, smoothed)
        lr = columns["lr"][rows]
        self.lr.extend(x, np.where(np.isnan(lr), 0.0, lr))  # `r.get("lr") or 0.0`
        tps = columns["tokens_per_s"][rows]
        has_tps = ~np.isnan(tps)
        self.tps.extend(x[has_tps], tps[has_tps])
        grad = columns["grad_norm"][rows]
        has_grad = ~np.isnan(grad)
        self.grad.extend(x[has_grad], grad[has_grad])


def window(x: np.ndarray, y: np.ndarray, lo: float | None, hi: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The points with lo <= x <= hi (x ascending, as every Series is): two binary searches and a view, so
    zooming into 1,000 steps of a 10^6-step run downsamples 1,000 points, not 10^6."""
    if lo is None or hi is None:
        return x, y
    start, end = np.searchsorted(x, lo, side="left"), np.searchsorted(x, hi, side="right")
    return x[start:end], y[start:end]


def _past(steps: np.ndarray, last: float | None) -> np.ndarray:
    """Which of `steps` (in order) are past every step before them and `last`: the rows a point-by-point
    append that skips steps it already has would take."""
    start = -math.inf if last is None else last
    before = np.maximum.accumulate(np.concatenate(([start], steps)))[:-1]
    return steps > before
