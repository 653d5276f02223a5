"""The main screen: its keys, what each does, and why a key cannot apply right now.

Layout and browsing live in screens/browse.py, the training worker's side in screens/training.py;
this layer adds the bindings and the key handlers. See ARCHITECTURE.md ("The app").
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import ClassVar

from textual.binding import Binding, BindingType

from tui_trainer.control.client import ControlClient
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import State
from tui_trainer.core.plan import plan_resume, start_settings
from tui_trainer.core.store import CheckpointInfo
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.messages import Connected, Generated, Planned, deliver
from tui_trainer.tui.screens.branch import BranchScreen
from tui_trainer.tui.screens.tools import TOOL_ACTIONS, ToolsScreen
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.widgets.key_bar import KeyItem
from tui_trainer.tui.widgets.run_tree import short_problem

SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99)
# this screen's actions: hidden while a dialog is open over it
MAIN_ACTIONS = {
    "pause",
    "resume",
    "branch",
    "save",
    "pin",
    "generate",
    "log_scale",
    "cycle_view",
    "smoothing",
    "attach",
}
MAIN_ACTIONS |= TOOL_ACTIONS  # compare, zoom, export, samples: screens/tools.py


def _shown_path(path: Path) -> str:
    """A path as the user would type it from here: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _open_live(run_dir: Path, run: str) -> ControlClient:
    """The channel of a live run; UserError (shown as the banner) when it no longer answers."""
    client = ControlClient.open(run_dir, timeout=2.0)
    if client is None:
        raise UserError(f"{run} is not training any more")
    return client


class MainScreen(ToolsScreen):
    """Browse runs and checkpoints; train, pause, resume and branch from the keyboard."""

    BINDINGS: ClassVar[list[BindingType]] = [
        # shown instead of the app's q (Quit) while attached to a run another process trains
        Binding("q", "detach", "Detach"),
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("b", "branch", "Branch"),
        Binding("s", "save", "Save"),
        Binding("x", "pin", "Pin"),
        Binding("g", "generate", "Sample"),
        Binding("v", "cycle_view", "View"),
        Binding("l", "log_scale", "Log"),
        Binding("a", "attach", "Attach"),
        Binding("left_square_bracket", "smoothing(-1)", "Smooth-", show=False),
        Binding("right_square_bracket", "smoothing(1)", "Smooth+", show=False),
    ]

    # the footer, in this order; when the width runs out the highest rank goes first ("?" lists every key)
    FOOTER_KEYS = (
        KeyItem(("pause",), "Pause", 1),
        KeyItem(("resume",), "Resume", 2),
        KeyItem(("branch",), "Branch", 3),
        KeyItem(("save",), "Save", 8),
        KeyItem(("export",), "Export", 5),
        KeyItem(("sample_page",), "Samples", 6),
        KeyItem(("zoom",), "Zoom", 7),
        KeyItem(("cycle_view",), "View", 9),
        KeyItem(("generate",), "Generate", 10),
        KeyItem(("log_scale",), "Log", 11),
        KeyItem(("pin",), "Pin", 12),
        KeyItem(("attach",), "Attach", 4),
        KeyItem(("help",), "More keys", 0),
        KeyItem(("quit", "detach"), "", 0),  # Quit, or Detach while attached
    )

    left_training: str | None = None  # detached from this run (q while attached): it trains on

    def begin(self) -> None:
        """Fill the widgets and start the timers. Called from the app's on_mount: the screen's own Mount can
        come before its composed children are mounted."""
        self.start_timers()
        if self.setup.plan is not None:
            self.status.run = self.setup.plan.run
            self.lifecycle.move(State.STARTING)

    # ---- which keys apply

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_ACTIONS and self.app.screen is not self:
            return False
        if action == "detach":  # False hides it and lets q reach the app's Quit
            return self.attached and self.app.screen is self
        if action == "attach" and not self.others_live:
            return False  # hidden unless another process trains a run here
        # None greys the key out in the footer; pressing it anyway says why (TrainerApp.run_action)
        return None if self.why_not(action) else True

    def why_not(self, action: str) -> str | None:
        """Why `action` cannot apply right now, in a few words; None when it can."""
        started = self.session is not None and self.session.started
        refused = self.lifecycle.refusal(action, started)
        if refused is not None or action in ("pause", "save"):
            return refused
        if action in ("resume", "branch", "pin", "generate"):
            return self._why_not_checkpoint(action)
        if action == "attach":
            return self._why_not_attach()
        if action == "smoothing" and self.plot.view != "loss":
            return "[ and ] smooth the loss view: press v to get back to it"
        return self.tool_why_not(action)

    def _why_not_attach(self) -> str | None:
        ref = self.runs_tree.selected
        if ref is None or ref.run not in self.others_live:
            return "select a run marked running (another process trains it)"
        return None

    def action_attach(self) -> None:
        """Attach to the selected run that another process trains (`a` in `tui-trainer open`)."""
        ref = self.runs_tree.selected
        if ref is None or self.why_not("attach") is not None:
            return
        self.others_live.pop(ref.run, None)  # attached, or gone: the tree stops marking it "elsewhere"
        self.lifecycle.begin(Job.CONNECTING, ref.run)
        self.status.detail = f"connecting to {ref.run}…"
        # the hello can take a moment from a busy process: never on the UI thread (TrainingScreen attaches)
        connect = partial(
            deliver, self.post_message, Connected, ref.run, partial(_open_live, self.store.run_dir(ref.run), ref.run)
        )
        self.run_worker(connect, group="connect", thread=True, exit_on_error=False)

    def _why_not_checkpoint(self, action: str) -> str | None:
        ref = self.runs_tree.selected
        ckpt = self.runs_tree.selected_checkpoint()
        if ckpt is None:
            on_run = ref is not None and ref.step is None
            return f"{ref.run} has no valid checkpoint" if on_run and ref else "select a checkpoint"
        if not ckpt.valid:
            return f"{ckpt.ref} is invalid: {short_problem(ckpt)}"
        if action == "pin" and (ref is None or ref.step is None):
            return "select a checkpoint line to pin it"
        if action == "resume" and self._at_schedule_end(ckpt):
            return f"{ckpt.ref} is at max_steps: press b to branch with a longer schedule"
        return None

    def refusal(self, action: str) -> str | None:
        """What to say when a key of this screen was pressed but cannot apply (None: not ours to explain)."""
        name = action.partition("(")[0]
        if name not in MAIN_ACTIONS or self.app.screen is not self:
            return None
        return self.why_not(name)

    def selected_checkpoint(self) -> CheckpointInfo | None:
        ckpt = self.runs_tree.selected_checkpoint()
        return ckpt if ckpt is not None and ckpt.valid else None

    def _at_schedule_end(self, ckpt: CheckpointInfo) -> bool:
        """A checkpoint at its run's train.max_steps has nothing left to resume (branch with more steps)."""
        run = self.runs_tree.runs.get(ckpt.run)
        max_steps = (run.config.get("train", {}) if run else {}).get("max_steps")
        return isinstance(max_steps, int) and ckpt.step >= max_steps

    # ---- pause, save, quit

    def action_pause(self) -> None:
        if self.session is None or not self.live:
            return
        step, promised_later = self._ask_pause(self.session)
        if promised_later:  # the step arrives as RemoteSession.Promised
            self.status.detail = "Pausing: asking the training process…"
        else:
            self.status.detail = (
                f"Pausing after step {step}…" if step is not None else "Pausing: stopping before the first step…"
            )

    def _ask_pause(self, session: TrainingSession) -> tuple[int | None, bool]:
        """Ask the live run to pause (it saves); see TrainingSession.ask_pause."""
        self.plot.hold(0.5)  # the acknowledgement's frame must not wait for a plot render
        asked = session.ask_pause()
        # say so at once: the loop needs up to one step (plus the save) to act on it
        self.lifecycle.move(State.PAUSING)
        return asked

    def action_save(self) -> None:
        if self.session is None or not self.live:
            return
        self.lifecycle.begin(Job.SAVING)
        self.session.save_now()
        self.notify("saving a checkpoint at the next step boundary…", timeout=3)

    @property
    def attached(self) -> bool:
        """Watching a run another process trains: q detaches, the run goes on."""
        if self.lifecycle.doing(Job.CONNECTING) is not None:
            return True  # started in the background: it goes on whether we wait for it or not
        return self.live and self.session is not None and self.session.keeps_training

    def action_detach(self) -> None:
        if self.attached:  # the line left on the terminal says so (farewell)
            shown = self.session.run_name if self.session else None
            self.left_training = self.lifecycle.doing(Job.CONNECTING) or shown
            if self.session is not None and self.live:
                self.session.leave()
        self.exit_app()

    def farewell(self, abandoned: bool = False) -> str | None:
        """The one line the app leaves on the terminal: what became of the run it showed (None: it showed
        none). `abandoned`: a second ctrl+c quit without waiting for the save."""
        if self.left_training is not None:
            return f"{self.left_training} keeps training: tui-trainer attach {self.left_training}"
        session = self.session
        if session is None:
            return None
        run = session.run_name
        newest = None
        with contextlib.suppress(UserError):
            newest = self.store.run(run).newest
        where = _shown_path(newest.path) if newest is not None else "no checkpoint saved"
        last = session.last_step.step if session.last_step is not None else 0
        if abandoned:
            return f"{run} stopped at step {last} without saving; newest valid checkpoint: {where}"
        state = self.state
        if state == State.PAUSED:
            return f"{run} paused at step {newest.step if newest is not None else last}: {where}"
        if state == State.FINISHED:
            return f"{run} finished at step {newest.step if newest is not None else last}: {where}"
        word = "lost (its process ended without a word)" if session.lost else state.value.lower()
        return f"{run} {word} at step {last}; newest valid checkpoint: {where}"

    def quit(self) -> None:
        """Quit; a live run is paused (full checkpoint saved) first and the app exits when it has halted."""
        if self.attached:
            self.action_detach()
        elif not self.live or self.session is None:
            self.exit_app()
        elif self.lifecycle.quitting:
            self.notify("still saving before quit… (ctrl+c quits at once)", timeout=3)
        else:
            self.lifecycle.quitting = True
            step, _ = self._ask_pause(self.session)
            self.status.detail = f"Quitting: pausing after step {step} to save…" if step is not None else "Quitting…"

    def abandon(self) -> bool:
        """A second ctrl+c while quitting: halt the run after its current step without saving. True if so."""
        if not (self.lifecycle.quitting and self.live and self.session is not None):
            return False
        self.session.stop()
        return True

    # ---- resume and branch

    def action_resume(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.why_not("resume") is not None:
            return
        # plan_resume re-hashes the checkpoint (seconds for a big model): a worker, not the UI thread
        self.lifecycle.begin(Job.PLANNING, ckpt.ref)
        self.status.detail = f"verifying {ckpt.ref}…"
        # attached, a data-parallel run resumes in the background on as many ranks; in-process on one
        ranks = self.store.run(ckpt.run).world_size if self.lifecycle.detached_mode else 1
        resume = partial(plan_resume, self.store, ckpt.ref, world_size=ranks)
        self.run_worker(partial(deliver, self.post_message, Planned, ckpt.ref, resume), group="plan", thread=True)

    def on_planned(self, message: Planned) -> None:
        if not self.alive:
            return
        self.lifecycle.end(Job.PLANNING)
        if message.error is None and not self.live:
            self.start_training(message.result)
            return
        self.status.detail = ""
        if message.error is not None:
            self.notify(message.problem, severity="error", timeout=10)
        self.refresh_bindings()

    def action_branch(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.live:
            return
        run = self.runs_tree.runs[ckpt.run]
        # attached, a branch starts in the background like a resume: on as many ranks unless changed
        ranks = run.world_size if self.lifecycle.detached_mode else None
        try:  # an HF Trainer checkpoint: its own model and what its run recorded, the rest named in the note
            config, notes = start_settings(run.config, ckpt, [])
        except UserError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self.open_branch_dialog(BranchScreen(self.store, ckpt, config, note=" ".join(notes), ranks=ranks))

    def action_pin(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.runs_tree.selected is None or self.runs_tree.selected.step is None:
            return
        if self.runs_tree.runs[ckpt.run].foreign:  # an HF Trainer output dir is never written
            self.notify(f"{ckpt.run} is a Hugging Face Trainer output dir: nothing in it is changed", timeout=4)
            return
        self.store.set_pinned(ckpt.run, ckpt.step, not ckpt.pinned)
        self.notify(f"{'unpinned' if ckpt.pinned else 'pinned'} {ckpt.ref}", timeout=3)
        self.refresh_tree()
        self.refresh_bindings()

    # ---- sample text

    def action_generate(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.why_not("generate") is not None:
            return
        self.lifecycle.begin(Job.GENERATING, ckpt.ref)
        self.sample.show_busy(ckpt.ref)
        generate = partial(self.setup.generator, ckpt.path)
        self.run_worker(
            partial(deliver, self.post_message, Generated, ckpt.ref, generate), group="generate", thread=True
        )
        self.refresh_bindings()

    def on_generated(self, message: Generated) -> None:
        if not self.alive:
            return
        if message.error is None:
            self.sample.show_text(message.subject, str(message.result))
        else:
            self.sample.show_error(message.subject, str(message.error))
        self.lifecycle.end(Job.GENERATING)
        self.refresh_bindings()

    # ---- the plot

    def action_cycle_view(self) -> None:
        self.plot.cycle_view()

    def action_log_scale(self) -> None:
        self.plot.log_scale = not self.plot.log_scale

    def action_smoothing(self, direction: int) -> None:
        current = min(range(len(SMOOTHING_STEPS)), key=lambda i: abs(SMOOTHING_STEPS[i] - self.plot.smoothing))
        index = max(0, min(len(SMOOTHING_STEPS) - 1, current + direction))
        self.plot.smoothing = SMOOTHING_STEPS[index]
