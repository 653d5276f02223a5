"""Each run's plotted history: loaded from the store off the UI thread, then extended by live points.

Reading a long metrics.jsonl takes seconds the first time (a million lines is JSON-parsed one by one;
later loads read the columnar cache, see metrics_cache.py), so `load` runs in a thread worker and the UI
only ever touches finished Curves. Live points for a run whose history is still loading wait in a buffer
and are appended when it lands (Curves ignores steps it already has).
"""

from __future__ import annotations

from typing import Any

from tui_trainer.core.errors import UserError
from tui_trainer.core.metrics_cache import MetricColumns, history_columns
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore
from tui_trainer.tui.series import Curves

Record = dict[str, Any]


def load_curves(store: RunStore, run: str, smoothing: float, plan: RunPlan | None = None) -> Curves:
    """The run's curve over its ancestors' history (any thread: reads files, touches no widget).

    `plan` is the live session's plan for `run`: it supplies the parent before the engine has created the
    run, and cuts a resumed run's own records at the checkpoint (later ones are about to be superseded).
    """
    segments: list[tuple[str, MetricColumns]]
    branch_steps: list[int] = []
    try:
        lineage = store.lineage(run)
        segments = history_columns(store, run)
        branch_steps = [step for _, step in lineage if step is not None]
    except UserError:
        # not created yet: its parent's history up to the branch point, then nothing of its own
        segments = []
        if plan is not None and plan.parent is not None and store.exists(plan.parent[0]):
            parent, at = plan.parent
            branch_steps = [step for _, step in store.lineage(parent) if step is not None] + [at]
            segments = [(name, cols.upto(at)) for name, cols in history_columns(store, parent)]
        segments.append((run, MetricColumns.empty()))
    if plan is not None and segments:
        name, columns = segments[-1]
        segments[-1] = (name, columns.upto(plan.start_step))
    curves = Curves.from_segments(run, segments, branch_steps)
    curves.set_smoothing(smoothing)
    return curves


class History:
    """Curves per run for the UI thread: a cache, the loads in flight, and live points waiting for a load."""

    def __init__(self) -> None:
        self.cache: dict[str, Curves] = {}
        self.loading: set[str] = set()
        self.pending: dict[str, list[Record]] = {}

    def get(self, run: str) -> Curves | None:
        return self.cache.get(run)

    def forget(self, run: str) -> None:
        """Drop a run's curve (it is about to be resumed: its tail will be superseded)."""
        self.cache.pop(run, None)
        self.pending.pop(run, None)

    def needs_load(self, run: str) -> bool:
        """True (and marks it loading) when nobody has the run's curve or is loading it."""
        if run in self.cache or run in self.loading:
            return False
        self.loading.add(run)
        return True

    def loaded(self, run: str, curves: Curves) -> Curves:
        self.loading.discard(run)
        curves.add_records(self.pending.pop(run, []))
        self.cache[run] = curves
        return curves

    def failed(self, run: str) -> None:
        self.loading.discard(run)

    def add_live(self, run: str, records: list[Record]) -> Curves | None:
        """Append live points; returns the Curves they went into, or None while its history is loading."""
        curves = self.cache.get(run)
        if curves is None:
            self.pending.setdefault(run, []).extend(records)
            return None
        curves.add_records(records)
        return curves
