"""The keys that act on the selected checkpoint: resume (its plan verified off the UI thread), branch (a
dialog), pin, generate a sample, export; and why one cannot apply to what is selected."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from tui_trainer.core.errors import UserError
from tui_trainer.core.plan import RunPlan, plan_resume, start_settings
from tui_trainer.core.store import CheckpointInfo
from tui_trainer.tui.controllers.browse import Browser
from tui_trainer.tui.controllers.host import Host
from tui_trainer.tui.controllers.training import Training
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.messages import Exported, Generated, Planned, WorkDone, deliver
from tui_trainer.tui.screens.branch import BranchScreen
from tui_trainer.tui.screens.export import ExportScreen, run_export
from tui_trainer.tui.widgets.run_tree import short_problem

CHECKPOINT_KEYS = ("resume", "branch", "pin", "generate", "export")


class Tools:
    """Resume, branch, pin, generate and export the selected checkpoint."""

    def __init__(self, screen: Host, browse: Browser, training: Training) -> None:
        self.screen = screen
        self.browse = browse
        self.training = training

    def why_not(self, action: str) -> str | None:
        """Why `action` cannot apply to the selection (None: it can; the Lifecycle said its part first)."""
        tree = self.screen.runs_tree
        ref, ckpt = tree.selected, tree.selected_checkpoint()
        if ckpt is None:
            if action == "export":
                return "select a checkpoint to export"
            on_run = ref is not None and ref.step is None
            return f"{ref.run} has no valid checkpoint" if on_run and ref else "select a checkpoint"
        if not ckpt.valid:
            return f"{ckpt.ref} is invalid: {short_problem(ckpt)}"
        if action == "pin" and (ref is None or ref.step is None):
            return "select a checkpoint line to pin it"
        if action == "resume" and self._at_schedule_end(ckpt):
            return f"{ckpt.ref} is at max_steps: press b to branch with a longer schedule"
        return None

    def selected(self, action: str) -> CheckpointInfo | None:
        """The selected checkpoint when `action` may act on it now, else None."""
        if self.screen.why_not(action) is not None:
            return None
        return self.screen.runs_tree.selected_checkpoint()

    def _at_schedule_end(self, ckpt: CheckpointInfo) -> bool:
        """A checkpoint at its run's train.max_steps has nothing left to resume (branch with more steps)."""
        run = self.screen.runs_tree.runs.get(ckpt.run)
        max_steps = (run.config.get("train", {}) if run else {}).get("max_steps")
        return isinstance(max_steps, int) and ckpt.step >= max_steps

    def _work(self, job: Job, ckpt: CheckpointInfo, kind: type[WorkDone], work: Callable[[], object]) -> None:
        """Start `job` on `ckpt` on a worker thread; its result arrives as a `kind` message (the Lifecycle
        refuses the job's keys until that message's handler ends it)."""
        self.screen.lifecycle.begin(job, ckpt.ref)
        self.screen.run_worker(partial(deliver, self.screen.post_message, kind, ckpt.ref, work), thread=True)
        self.screen.refresh_bindings()

    # ---- resume and branch

    def resume(self) -> None:
        screen = self.screen
        ckpt = self.selected("resume")
        if ckpt is None:
            return
        screen.status.detail = f"verifying {ckpt.ref}…"
        # attached, a data-parallel run resumes in the background on as many ranks; in-process on one
        ranks = screen.store.run(ckpt.run).world_size if screen.lifecycle.detached_mode else 1
        # plan_resume re-hashes the checkpoint (seconds for a big model): a worker, not the UI thread
        self._work(Job.PLANNING, ckpt, Planned, partial(plan_resume, screen.store, ckpt.ref, world_size=ranks))

    def planned(self, message: Planned) -> None:
        screen = self.screen
        screen.lifecycle.end(Job.PLANNING)
        if message.error is None and not screen.live:
            self.training.start(message.result)
            return
        screen.status.detail = ""
        if message.error is not None:
            screen.notify(message.problem, severity="error", timeout=10)
        screen.refresh_bindings()

    def branch(self) -> None:
        screen = self.screen
        ckpt = self.selected("branch")
        if ckpt is None:
            return
        run = screen.runs_tree.runs[ckpt.run]
        # attached, a branch starts in the background like a resume: on as many ranks unless changed
        ranks = run.world_size if screen.lifecycle.detached_mode else None
        try:  # an HF Trainer checkpoint: its own model and what its run recorded, the rest named in the note
            config, notes = start_settings(run.config, ckpt, [])
        except UserError as exc:
            screen.notify(str(exc), severity="error", timeout=10)
            return
        self.open_branch_dialog(BranchScreen(screen.store, ckpt, config, note=" ".join(notes), ranks=ranks))

    def open_branch_dialog(self, dialog: BranchScreen) -> None:
        """Push the dialog; the plan it returns (None when cancelled) starts training."""

        def started(plan: RunPlan | None) -> None:
            if plan is not None:
                self.training.start(plan)

        self.screen.app.push_screen(dialog, started)

    def pin(self) -> None:
        screen = self.screen
        ckpt = self.selected("pin")
        if ckpt is None:
            return
        if screen.runs_tree.runs[ckpt.run].foreign:  # an HF Trainer output dir is never written
            screen.notify(f"{ckpt.run} is a Hugging Face Trainer output dir: nothing in it is changed", timeout=4)
            return
        screen.store.set_pinned(ckpt.run, ckpt.step, not ckpt.pinned)
        screen.notify(f"{'unpinned' if ckpt.pinned else 'pinned'} {ckpt.ref}", timeout=3)
        self.browse.refresh_tree()
        screen.refresh_bindings()

    # ---- sample text

    def generate(self) -> None:
        screen = self.screen
        ckpt = self.selected("generate")
        if ckpt is None:
            return
        screen.sample.show_busy(ckpt.ref)
        self._work(Job.GENERATING, ckpt, Generated, partial(screen.setup.generator, ckpt.path))

    def generated(self, message: Generated) -> None:
        if message.error is None:
            self.screen.sample.show_text(message.subject, str(message.result))
        else:
            self.screen.sample.show_error(message.subject, str(message.error))
        self.screen.lifecycle.end(Job.GENERATING)
        self.screen.refresh_bindings()

    # ---- export

    def export(self) -> None:
        ckpt = self.selected("export")
        if ckpt is not None:
            self.screen.app.push_screen(ExportScreen(ckpt), partial(self._start_export, ckpt))

    def _start_export(self, ckpt: CheckpointInfo, answer: tuple[str, str] | None) -> None:
        if answer is None:
            return
        screen = self.screen
        dest, dtype = answer
        screen.notify(f"exporting {ckpt.ref} ({dtype}) to {dest}…", timeout=4)
        self._work(Job.EXPORTING, ckpt, Exported, partial(run_export, screen.store, ckpt.ref, dest, dtype))

    def exported(self, message: Exported) -> None:
        if message.error is None:
            self.screen.notify(str(message.result), timeout=10)
        else:
            self.screen.notify(f"export failed: {message.problem}", severity="error", timeout=10)
        self.screen.lifecycle.end(Job.EXPORTING)
        self.screen.refresh_bindings()
