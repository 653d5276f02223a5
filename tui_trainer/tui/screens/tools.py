"""What people reach for while a run trains: compare runs on one plot, zoom / pan / follow the step axis,
export a checkpoint, page through the run's logged samples. A layer between the training screen and
MainScreen (screens/main.py), which adds these keys' reasons to its `why_not`."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from textual.binding import Binding, BindingType

from tui_trainer.core.store import CheckpointInfo
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.messages import Exported, deliver
from tui_trainer.tui.screens.export import ExportScreen, run_export
from tui_trainer.tui.screens.training import TrainingScreen
from tui_trainer.tui.series import Curves
from tui_trainer.tui.widgets.run_tree import short_problem

ZOOM_STEP = 0.5  # each + halves the visible steps
# this layer's actions (MainScreen greys them out while a dialog is open, like its own)
TOOL_ACTIONS = {
    "compare_mark",
    "compare_baseline",
    "compare_clear",
    "zoom",
    "pan",
    "zoom_reset",
    "follow",
    "export",
    "sample_page",
}


class ToolsScreen(TrainingScreen):
    """Compare marks, the plot's step window, the export key and sample paging."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("B", "compare_baseline", "Baseline", show=False),
        Binding("c", "compare_clear", "Clear marks", show=False),
        Binding("plus,equals_sign", f"zoom({ZOOM_STEP})", "Zoom+", show=False),
        Binding("minus", f"zoom({1 / ZOOM_STEP})", "Zoom-", show=False),
        Binding("comma", "pan(-1)", "Pan left", show=False),
        Binding("full_stop", "pan(1)", "Pan right", show=False),
        Binding("0", "zoom_reset", "Whole run", show=False),
        Binding("f", "follow", "Follow", show=False),
        Binding("e", "export", "Export", show=False),  # the footer is full at 80 columns: ? lists it
        Binding("left_curly_bracket", "sample_page(-1)", "Older sample", show=False),
        Binding("right_curly_bracket", "sample_page(1)", "Newer sample", show=False),
    ]

    marked: tuple[str, ...] = ()  # runs marked for comparison, in mark order (replaced, never mutated)
    baseline: str | None = None

    def tool_why_not(self, action: str) -> str | None:
        """Why one of this layer's keys cannot apply now (None: it can)."""
        selected = self.runs_tree.selected
        if action in ("compare_mark", "compare_baseline") and selected is None:
            return "select a run to compare"
        if action == "compare_clear" and not self.marked:
            return "no runs marked: space marks the highlighted run"
        if action in ("zoom", "pan", "zoom_reset", "follow") and self.plot.extent() is None:
            return "nothing plotted yet"
        if action == "pan" and self.plot.window is None and self.plot.follow is None:
            return "the whole run is in view: + zooms in first"
        if action == "export":
            return self._why_not_export()
        if action == "sample_page" and not self.sample.samples:
            run = selected.run if selected is not None else "this run"
            return f"no samples logged for {run} (train.sample_every writes runs/<run>/samples.jsonl)"
        return None

    def _why_not_export(self) -> str | None:
        ckpt = self.runs_tree.selected_checkpoint()
        if ckpt is None:
            return "select a checkpoint to export"
        return f"{ckpt.ref} is invalid: {short_problem(ckpt)}" if not ckpt.valid else None

    # ---- compare runs

    def action_compare_mark(self) -> None:
        """Mark / unmark the highlighted run (or a checkpoint's run) for the overlay."""
        selected = self.runs_tree.selected
        if selected is None:
            return
        run = selected.run
        self.marked = tuple(r for r in self.marked if r != run) if run in self.marked else (*self.marked, run)
        self.update_compare()

    def action_compare_baseline(self) -> None:
        """Pin the highlighted run as the baseline (white, stays when marks are cleared); again unpins it."""
        selected = self.runs_tree.selected
        if selected is None:
            return
        self.baseline = None if self.baseline == selected.run else selected.run
        self.update_compare()

    def action_compare_clear(self) -> None:
        self.marked = ()
        self.update_compare()

    def compared_runs(self) -> list[str]:
        """The runs overlaid besides the highlighted one: the baseline, then the marked ones in mark order."""
        runs = [self.baseline] if self.baseline else []
        return runs + [r for r in self.marked if r != self.baseline]

    def update_compare(self) -> None:
        """Hand the plot every compared run whose history has loaded; load the others (history_landed calls
        back). The tree marks each compared run in its plot colour."""
        curves: list[Curves] = []
        for run in self.compared_runs():
            loaded = self.history.get(run)
            if loaded is None:
                self.load_history(run)
            else:
                curves.append(loaded)
        self.plot.set_compared(curves, self.baseline)
        self.runs_tree.set_compare_marks({run: legend for run, (_, legend) in self.plot.run_colors().items()})
        self.refresh_bindings()

    def history_landed(self, run: str) -> None:
        if run in self.compared_runs():
            self.update_compare()

    # ---- the step window

    def action_zoom(self, factor: float) -> None:
        ckpt = self.runs_tree.selected_checkpoint()
        on_checkpoint = self.runs_tree.selected is not None and self.runs_tree.selected.step is not None
        # around the highlighted checkpoint when there is one in view, else around the newest steps
        self.plot.zoom(factor, float(ckpt.step) if ckpt is not None and on_checkpoint else None)

    def action_pan(self, direction: int) -> None:
        self.plot.pan(direction)

    def action_zoom_reset(self) -> None:
        self.plot.reset_window()

    def action_follow(self) -> None:
        self.plot.toggle_follow()
        follow = self.plot.follow
        self.notify(f"following the newest {follow:,} steps" if follow else "stopped following", timeout=2)

    # ---- export

    def action_export(self) -> None:
        ckpt = self.runs_tree.selected_checkpoint()
        if ckpt is None or self.why_not("export") is not None:
            return
        self.app.push_screen(ExportScreen(ckpt), partial(self._start_export, ckpt))

    def _start_export(self, ckpt: CheckpointInfo, answer: tuple[str, str] | None) -> None:
        if answer is None:
            return
        dest, dtype = answer
        self.lifecycle.begin(Job.EXPORTING, ckpt.ref)
        self.notify(f"exporting {ckpt.ref} ({dtype}) to {dest}…", timeout=4)
        work = partial(run_export, self.store, ckpt.ref, dest, dtype)
        self.run_worker(partial(deliver, self.post_message, Exported, ckpt.ref, work), group="export", thread=True)
        self.refresh_bindings()

    def on_exported(self, message: Exported) -> None:
        if not self.alive:
            return
        if message.error is None:
            self.notify(str(message.result), timeout=10)
        else:
            self.notify(f"export failed: {message.problem}", severity="error", timeout=10)
        self.lifecycle.end(Job.EXPORTING)
        self.refresh_bindings()

    # ---- samples

    def action_sample_page(self, direction: int) -> None:
        if not self.sample.page(direction):
            self.notify("that is the newest sample" if direction > 0 else "that is the oldest sample", timeout=2)
