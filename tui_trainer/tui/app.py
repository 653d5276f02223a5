"""The Textual app: layout, key bindings and the wiring between the training worker and the widgets.

Thin on purpose: drawing lives in widgets/, dialogs in screens/, the worker's side in session.py.
Never imports torch: the engine is imported by the worker thread after the first frame is on screen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.actions import ActionParseResult
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.dom import DOMNode
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import (
    CheckpointSaved,
    DataProgress,
    DeviceSample,
    EvalLogged,
    Failed,
    FaultKind,
    Notice,
    State,
    StateChanged,
)
from tui_trainer.core.plan import RunPlan, plan_resume
from tui_trainer.core.store import CheckpointInfo, RunInfo, RunStore
from tui_trainer.tui.history import History, load_curves
from tui_trainer.tui.screens.branch import BranchScreen, suggest_lower_lr
from tui_trainer.tui.screens.help import HelpScreen
from tui_trainer.tui.session import TrainerFactory, TrainingSession
from tui_trainer.tui.widgets.device_panel import DevicePanel, process_probe
from tui_trainer.tui.widgets.loss_plot import LossPlot
from tui_trainer.tui.widgets.run_tree import (
    TREE_HEADER,
    CheckpointDetails,
    NodeRef,
    RunTree,
    TreeHeader,
    short_problem,
)
from tui_trainer.tui.widgets.sample_panel import SamplePanel
from tui_trainer.tui.widgets.status_line import StatusLine

Generator = Callable[[Path], str]
DEVICE_POLL_S = 2.0
TREE_REFRESH_S = 30.0
ABANDONED_EXIT = 130  # a second ctrl+c, as in the headless CLI
AGE_REFRESH_S = 1.0  # checkpoint ages in the tree and the detail pane, from one clock
PROGRESS_HZ = 4
FIRST_FRAME_GRACE_S = 0.1
SMOOTHING_STEPS = (0.0, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99)
# actions that act on the app's state; hidden while a dialog is open
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
}


def styles_path() -> Path:
    """app.tcss from an installed wheel (tui_trainer/styles) or from a source checkout (./styles)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "styles" / "app.tcss", package.parent / "styles" / "app.tcss"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"app.tcss not found under {package / 'styles'} or {package.parent / 'styles'}")


def generate_sample(checkpoint_dir: Path) -> str:
    """The real generator; imports torch, so only ever called on a worker thread."""
    from tui_trainer.engine.generate import generate_text

    return generate_text(checkpoint_dir, prompt="", max_new_tokens=80, seed=0)


class TrainerApp(App[int]):
    """Browse runs and checkpoints; train, pause, resume and branch from the keyboard."""

    CSS_PATH = styles_path()
    TITLE = "tui-trainer"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key; ctrl+p would only add noise
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # noqa: RUF012 - declared on App
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("b", "branch", "Branch"),
        Binding("s", "save", "Save"),
        Binding("x", "pin", "Pin"),
        Binding("g", "generate", "Sample"),
        Binding("v", "cycle_view", "View"),
        Binding("l", "log_scale", "Log"),
        Binding("left_square_bracket", "smoothing(-1)", "Smooth-", show=False),
        Binding("right_square_bracket", "smoothing(1)", "Smooth+", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        # replaces Textual's "press ctrl+q to quit" toast: ctrl+c saves and quits like q, twice quits at once
        Binding("ctrl+c", "interrupt", "Quit", show=False),
    ]

    state: reactive[str] = reactive(State.IDLE)

    def __init__(
        self,
        runs_dir: Path,
        plan: RunPlan | None = None,
        until_step: int | None = None,
        *,
        clock: Callable[[], float] = time.time,
        probe: Callable[[], DeviceSample] | None = None,
        trainer_factory: TrainerFactory | None = None,
        generator: Generator = generate_sample,
    ) -> None:
        super().__init__()
        self.store = RunStore(runs_dir)
        self.initial_plan = plan
        self.until_step = until_step
        self.clock = clock
        self.probe = probe or process_probe()
        self.trainer_factory = trainer_factory
        self.generator = generator
        self.session: TrainingSession | None = None
        self.live = False
        self.quitting = False
        self.abandoned = False  # a second ctrl+c: quit without waiting for the save
        self.generating: str | None = None
        self.planning = False  # a resume plan is being verified on a worker thread
        self.failure: str | None = None
        self._fault: Failed | None = None  # a NaN/disk/OOM fault the run paused on
        self.ready_at: float | None = None
        self.history = History()
        self._wanted_run: str | None = None
        self._manual_save = False
        self._last_engine_sample = 0.0
        self._signals: list[signal.Signals] = []
        self._last_progress = 0.0
        self._progress_timer_set = False

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield TreeHeader(TREE_HEADER, id="tree-header")
                yield RunTree(self.clock, id="tree")
                yield CheckpointDetails(id="details")
            with Vertical(id="right"):
                yield LossPlot(id="plot")
                with Horizontal(id="bottom"):
                    yield DevicePanel(id="device")
                    yield SamplePanel(id="sample")
        yield Static("", id="error")
        yield StatusLine(id="status")
        yield Footer(compact=True, show_command_palette=False)

    @property
    def main_screen(self) -> Screen[Any]:
        """The screen holding the widgets; `self.query_one` would search a dialog pushed over it."""
        return self.screen_stack[0]

    @property
    def runs_tree(self) -> RunTree:
        return self.main_screen.query_one(RunTree)

    @property
    def plot(self) -> LossPlot:
        return self.main_screen.query_one(LossPlot)

    @property
    def status(self) -> StatusLine:
        return self.main_screen.query_one(StatusLine)

    @property
    def device(self) -> DevicePanel:
        return self.main_screen.query_one(DevicePanel)

    @property
    def sample(self) -> SamplePanel:
        return self.main_screen.query_one(SamplePanel)

    def on_mount(self) -> None:
        left = self.main_screen.query_one("#left")
        left.border_title = "Runs"
        select = NodeRef(self.initial_plan.run) if self.initial_plan else None
        self.refresh_tree(select=select)
        self.runs_tree.focus()
        self._poll_device()
        self.set_interval(DEVICE_POLL_S, self._poll_device)
        self.set_interval(TREE_REFRESH_S, self.refresh_tree)
        self.set_interval(AGE_REFRESH_S, self._refresh_ages)
        if self.initial_plan is not None:
            self.status.run = self.initial_plan.run
            self.state = State.STARTING
        # a closed SSH session (SIGHUP) or a kill (SIGTERM) pauses and saves like `q` does
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal)
                self._signals.append(sig)

    def _on_signal(self) -> None:
        """SIGHUP / SIGTERM: pause (the trainer saves), then exit. The terminal may be gone, and Textual can
        block writing to a dead tty, so a watchdog thread ends the process once the trainer has halted."""
        session = self.session if self.live else None
        if session is not None:
            self.quitting = True
            session.pause()
        threading.Thread(target=_exit_when_halted, args=(session,), name="hangup-watchdog", daemon=True).start()
        if session is None:
            self.exit(self.exit_code(), return_code=self.exit_code())

    def on_unmount(self) -> None:
        # however the app ends, never leave the trainer running without a screen: pause (it saves)
        if self.live and self.session is not None and not self.abandoned:
            self.session.pause()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            for sig in self._signals:
                loop.remove_signal_handler(sig)

    def on_ready(self) -> None:
        """The first frame is composed: start the worker (it spends seconds importing torch, holding the GIL
        much of that time) a moment later, so the writer thread gets the frame onto the terminal first."""
        self.ready_at = time.perf_counter()
        if self.initial_plan is not None:
            plan = self.initial_plan
            self.set_timer(FIRST_FRAME_GRACE_S, lambda: self.start_training(plan))

    # ------------------------------------------------------------ training

    def start_training(self, plan: RunPlan) -> None:
        # --until-step belongs to the run the app was opened with, not to later resumes and branches
        until = self.until_step if plan is self.initial_plan else None
        self.session = TrainingSession(self.store, plan, self.post_message, until, self.trainer_factory)
        self.live = True
        self.failure = None
        self._fault = None
        self.main_screen.query_one("#error", Static).remove_class("-shown")
        self.status.run = plan.run
        self.status.detail = "starting: loading torch and data…"
        self.state = State.STARTING
        # the engine reports plan.notes itself (Notice events); a resumed run's curve is reloaded
        self.history.forget(plan.run)
        self.show_run(plan.run, force=True)
        self.run_worker(self.session.run, thread=True, group="train", name=f"train {plan.run}", exit_on_error=False)

    def on_training_session_progress(self, message: TrainingSession.Progress) -> None:
        # Numbers on screen change at most PROGRESS_HZ times a second: a fast loop logs hundreds of steps
        # a second and every widget update costs the training thread CPU (and the GIL).
        wait = self._last_progress + 1 / PROGRESS_HZ - time.monotonic()
        if wait <= 0:
            self._show_progress()
        elif not self._progress_timer_set:
            self._progress_timer_set = True
            self.set_timer(wait, self._show_progress)

    def _show_progress(self) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        self._progress_timer_set = False
        self._last_progress = time.monotonic()
        self._drain()  # also lets the session post the next Progress
        newest = self.session.last_step if self.session else None
        if newest is None or newest.run != self.status.run:
            return
        if self.state == State.STARTING:
            self.state = State.RUNNING
        self.status.show_step(newest)
        self.device.show_step(newest, live=self.live)

    def on_training_session_device(self, message: TrainingSession.Device) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        self._last_engine_sample = time.monotonic()
        self.device.show_sample(message.sample)

    def on_training_session_data(self, message: TrainingSession.Data) -> None:
        if not self.is_running or self.state != State.STARTING or message.event.run != self.status.run:
            return  # shutting down, or the first step already ran
        self.status.detail = data_progress_text(message.event)

    def on_training_session_engine(self, message: TrainingSession.Engine) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        event = message.event
        if isinstance(event, StateChanged):
            self._on_state(event)
        elif isinstance(event, CheckpointSaved):
            self.refresh_tree()
            if self._manual_save:
                self._manual_save = False
                self.notify(f"saved {event.run}@{event.step}", timeout=4)
        elif isinstance(event, EvalLogged):
            self._drain()
        elif isinstance(event, Notice):
            self.notify(event.message, severity="warning", timeout=10)
        elif isinstance(event, Failed):
            if FaultKind(event.kind).resumable:
                self.show_fault(event)
            else:
                self.show_failure(event.step, event.message)

    def _on_state(self, event: StateChanged) -> None:
        if event.state == State.PAUSING and self.state == State.PAUSING:
            return  # we already said which step it pauses after
        if self.failure:
            return  # Failed stays on screen even when the engine then halts as Paused (nan, disk)
        was_starting = self.state == State.STARTING
        self.state = event.state
        if event.state == State.PAUSING:
            self.status.detail = f"Pausing: {event.detail}…" if event.detail else "Pausing…"
        elif event.state == State.RUNNING:
            self.status.detail = ""
            if was_starting:
                self.refresh_tree(select=NodeRef(event.run))
        elif event.state == State.PAUSED:
            fault = self._fault
            self.status.detail = (
                f"paused at step {event.step} ({fault.kind}, see above)"
                if fault is not None
                else f"paused at step {event.step}; checkpoint saved"
            )
            self.refresh_tree()
            if fault is not None and fault.kind == FaultKind.NAN:
                self._offer_lower_lr_branch(fault)
        elif event.state == State.FINISHED:
            self.status.detail = f"finished at step {event.step}"
            self.refresh_tree()
        elif event.state == State.STOPPED:
            self.status.detail = f"stopped at step {event.step}"
        elif event.state == State.FAILED and event.detail:
            self.show_failure(event.step, event.detail)

    def show_fault(self, event: Failed) -> None:
        """A fault the engine survives (NaN, disk, OOM): the run pauses with every checkpoint intact."""
        self._fault = event
        banner = self.main_screen.query_one("#error", Static)
        banner.update(
            f"⏸ Paused at step {event.step}: {fmt.remedy(event, resume='press r', branch='b')}\n"
            "  Checkpoints stay usable: select one, then r to resume or b to branch."
        )
        banner.add_class("-shown")

    def _offer_lower_lr_branch(self, fault: Failed) -> None:
        """After a divergence, open the branch dialog on the last good checkpoint with a lower lr: the run's
        newest, or for a branch that diverged before saving one, the checkpoint it branched from."""
        if self.screen_stack[-1] is not self.screen:
            return
        run = self.store.run(fault.run)
        good = last_good_checkpoint(self.store, run)
        if good is None:
            return
        self.refresh_tree(select=NodeRef(good.run, good.step))

        def started(plan: RunPlan | None) -> None:
            if plan is not None:
                self.start_training(plan)

        note = f"loss went non-finite at step {fault.step}: branching from {good.ref} with half the lr"
        self.push_screen(BranchScreen(self.store, good, run.config, suggest_lower_lr(run.config), note), started)

    def show_failure(self, step: int, message: str) -> None:
        """The one place a failure reaches the screen: a banner with step and message, state Failed."""
        if self.failure:
            return
        text = f"Failed at step {step}: {message}"
        self.failure = text
        self.state = State.FAILED
        self.status.detail = f"at step {step} (error above)"
        banner = self.main_screen.query_one("#error", Static)
        banner.update(f"✗ {text}\n  Checkpoints stay usable: select one, then r to resume or b to branch.")
        banner.add_class("-shown")
        self.refresh_tree()

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        worker = event.worker
        if worker.group == "generate":
            self._generate_changed(worker, event.state)
            return
        if worker.group == "history":
            self._history_changed(worker, event.state)
            return
        if worker.group == "plan":
            self._plan_changed(worker, event.state)
            return
        if worker.group != "train" or event.state not in (
            WorkerState.SUCCESS,
            WorkerState.ERROR,
            WorkerState.CANCELLED,
        ):
            return
        self._drain()
        self.live = False
        if event.state == WorkerState.ERROR:
            error = worker.error
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            step = self.session.last_step.step if self.session and self.session.last_step else 0
            self.show_failure(step, message)
        elif event.state == WorkerState.SUCCESS and isinstance(worker.result, str):
            if self.state != State.FAILED or worker.result == State.FAILED:
                self.state = worker.result
            if worker.result == State.FAILED and not self.failure:
                self.show_failure(
                    self.session.last_step.step if self.session and self.session.last_step else 0,
                    "the trainer stopped on an error",
                )
        else:
            self.state = State.STOPPED
        self.device.show_step(self.session.last_step if self.session else None, live=False)
        self.refresh_tree()
        self.refresh_bindings()
        if self.quitting:
            self.exit(self.exit_code(), return_code=self.exit_code())

    def _drain(self) -> None:
        session = self.session
        if session is None:
            return
        points = session.drain()
        if not points:
            return
        records = [
            {"step": p.step, "eval_loss": p.eval_loss}
            if isinstance(p, EvalLogged)
            else {"step": p.step, "loss": p.loss, "lr": p.lr, "tokens_per_s": p.tokens_per_s}
            for p in points
        ]
        curves = self.history.add_live(session.run_name, records)
        if curves is not None and self.plot.curves is curves:
            self.plot.mark_dirty()

    # ------------------------------------------------------------ browsing

    def show_run(self, run: str | None, force: bool = False) -> None:
        """Point the plot at `run`; its history loads on a worker thread the first time (seconds for long runs)."""
        self._wanted_run = run
        if run is None:
            self.plot.set_curves(None)
            return
        curves = self.history.get(run)
        if curves is not None:
            if force or self.plot.curves is not curves:
                self.plot.set_curves(curves)
            return
        self.plot.show_loading(run)
        if self.history.needs_load(run):
            plan = self.session.plan if self.session and self.session.run_name == run else None
            load = partial(load_curves, self.store, run, self.plot.smoothing, plan)
            self.run_worker(load, name=f"history {run}", group="history", thread=True, exit_on_error=False)

    def _history_changed(self, worker: Worker[Any], state: WorkerState) -> None:
        run = (worker.name or "").removeprefix("history ")
        if state == WorkerState.SUCCESS:
            curves = self.history.loaded(run, worker.result)  # type: ignore[arg-type]
            if curves.smoothing != self.plot.smoothing:
                curves.set_smoothing(self.plot.smoothing)
            if self._wanted_run == run:
                self.plot.set_curves(curves)
        elif state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.history.failed(run)
            if state == WorkerState.ERROR:
                self.notify(f"could not load {run}'s history: {worker.error}", severity="error", timeout=8)

    def refresh_tree(self, select: NodeRef | None = None) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        live = {self.session.run_name: self.state} if self.session and self.live else {}
        runs = self.store.runs()
        self.runs_tree.rebuild(runs, live=live, select=select)
        self._show_details()
        if self.state == State.IDLE:
            self.status.detail = (
                f"{fmt.plural(len(runs), 'run')} · ↑↓ pick a checkpoint · r resume · b branch · ? help"
                if runs
                else f"no runs yet in {fmt.folder(self.store.root)} · start one with: tui-trainer train"
            )

    def _refresh_ages(self) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        self.runs_tree.refresh_ages()
        self._show_details()

    def on_run_tree_highlighted(self, message: RunTree.Highlighted) -> None:
        if not self.is_running or not self.screen_stack:
            return  # shutting down: the widgets are gone
        self.show_run(message.node.run if message.node else None)
        self._show_details()
        self.refresh_bindings()

    def _show_details(self) -> None:
        ref = self.runs_tree.selected
        run = self.runs_tree.runs.get(ref.run) if ref else None
        ckpt = None
        if run is not None and ref is not None and ref.step is not None:
            ckpt = next((c for c in run.checkpoints if c.step == ref.step), None)
        self.main_screen.query_one(CheckpointDetails).show(run, ckpt, self.clock())

    def _poll_device(self) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        # while the engine reports (every ~2 s) its samples win; otherwise sample this process
        if time.monotonic() - self._last_engine_sample > 2.5 * DEVICE_POLL_S:
            self.device.show_sample(self.probe())

    # ------------------------------------------------------------ keys

    def selected_checkpoint(self) -> CheckpointInfo | None:
        ckpt = self.runs_tree.selected_checkpoint()
        return ckpt if ckpt is not None and ckpt.valid else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in MAIN_ACTIONS and isinstance(self.screen, ModalScreen):
            return False
        # None greys the key out in the footer; pressing it anyway says why (run_action below)
        return None if self.why_not(action) else True

    def why_not(self, action: str) -> str | None:
        """Why `action` cannot apply right now, in a few words; None when it can."""
        running = self.live and self.state in (State.RUNNING, State.STARTING)
        if action in ("pause", "save"):
            if running and self.session is not None and self.session.started:
                return None
            if running or self.state == State.PAUSING:
                return "the run is still starting" if self.state == State.STARTING else "already pausing"
            return "nothing is training: r resumes the selected checkpoint"
        if action in ("resume", "branch", "pin", "generate"):
            return self._why_not_checkpoint(action)
        if action == "smoothing" and self.plot.view != "loss":
            return "[ and ] smooth the loss view: press v to get back to it"
        return None

    def _why_not_checkpoint(self, action: str) -> str | None:
        if action in ("resume", "branch") and self.live:
            return "a run is training (one at a time): press p to pause it first"
        if action == "resume" and self.planning:
            return "already verifying a checkpoint…"
        if action == "generate" and self.generating is not None:
            return f"still generating from {self.generating}…"
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

    async def run_action(
        self,
        action: str | ActionParseResult,
        default_namespace: DOMNode | None = None,
        namespaces: Mapping[str, DOMNode] | None = None,
    ) -> bool:
        """A key that cannot apply right now says why in one short notification instead of doing nothing."""
        if await super().run_action(action, default_namespace, namespaces):
            return True
        if default_namespace not in (None, self) or not isinstance(action, str) or "." in action:
            return False
        name = action.partition("(")[0]
        reason = self.why_not(name) if name in MAIN_ACTIONS and not isinstance(self.screen, ModalScreen) else None
        if reason is None:
            return False
        self.notify(reason, timeout=3)
        return True

    def watch_state(self, state: str) -> None:
        if not self.is_running:
            return  # shutting down: the widgets are gone
        self.status.state = state
        self.refresh_bindings()

    def action_pause(self) -> None:
        if self.session is None or not self.live:
            return
        self.plot.hold(0.5)  # the acknowledgement's frame must not wait for a plot render
        step = self.session.pause()
        # say so at once: the loop needs up to one step (plus the save) to act on it
        self.state = State.PAUSING
        self.status.detail = (
            f"Pausing after step {step}…" if step is not None else "Pausing: stopping before the first step…"
        )

    def action_save(self) -> None:
        if self.session is None or not self.live:
            return
        self._manual_save = True
        self.session.save_now()
        self.notify("saving a checkpoint at the next step boundary…", timeout=3)

    def _at_schedule_end(self, ckpt: CheckpointInfo) -> bool:
        """A checkpoint at its run's train.max_steps has nothing left to resume (branch with more steps)."""
        run = self.runs_tree.runs.get(ckpt.run)
        max_steps = (run.config.get("train", {}) if run else {}).get("max_steps")
        return isinstance(max_steps, int) and ckpt.step >= max_steps

    def action_resume(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.live:
            return
        if self._at_schedule_end(ckpt) or self.planning:
            return
        # plan_resume re-hashes the checkpoint (seconds for a big model): a worker, not the UI thread
        self.planning = True
        self.status.detail = f"verifying {ckpt.ref}…"
        self.run_worker(
            partial(plan_resume, self.store, ckpt.ref),
            name="plan resume",
            group="plan",
            thread=True,
            exit_on_error=False,
        )

    def _plan_changed(self, worker: Worker[Any], state: WorkerState) -> None:
        if state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self.planning = False
        if state == WorkerState.SUCCESS and not self.live:
            self.start_training(worker.result)  # type: ignore[arg-type]
            return
        self.status.detail = ""
        if state == WorkerState.ERROR:
            error = worker.error
            message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            self.notify(message, severity="error", timeout=10)
        self.refresh_bindings()

    def action_branch(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.live:
            return
        run = self.runs_tree.runs[ckpt.run]

        def started(plan: RunPlan | None) -> None:
            if plan is not None:
                self.start_training(plan)

        self.push_screen(BranchScreen(self.store, ckpt, run.config), started)

    def action_pin(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.runs_tree.selected is None or self.runs_tree.selected.step is None:
            return
        self.store.set_pinned(ckpt.run, ckpt.step, not ckpt.pinned)
        self.notify(f"{'unpinned' if ckpt.pinned else 'pinned'} {ckpt.ref}", timeout=3)
        self.refresh_tree()
        self.refresh_bindings()

    def action_generate(self) -> None:
        ckpt = self.selected_checkpoint()
        if ckpt is None or self.generating is not None:
            return
        self.generating = ckpt.ref
        self.sample.show_busy(ckpt.ref)
        self._generate(ckpt.path, ckpt.ref)
        self.refresh_bindings()

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, path: Path, ref: str) -> str:
        return self.generator(path)

    def _generate_changed(self, worker: Worker[Any], state: WorkerState) -> None:
        ref = self.generating or "?"
        if state == WorkerState.SUCCESS:
            self.sample.show_text(ref, str(worker.result))
        elif state == WorkerState.ERROR:
            self.sample.show_error(ref, str(worker.error))
        else:
            return
        self.generating = None
        self.refresh_bindings()

    def action_cycle_view(self) -> None:
        self.plot.cycle_view()

    def action_log_scale(self) -> None:
        self.plot.log_scale = not self.plot.log_scale

    def action_smoothing(self, direction: int) -> None:
        current = min(range(len(SMOOTHING_STEPS)), key=lambda i: abs(SMOOTHING_STEPS[i] - self.plot.smoothing))
        index = max(0, min(len(SMOOTHING_STEPS) - 1, current + direction))
        self.plot.smoothing = SMOOTHING_STEPS[index]

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Quit; a live run is paused (full checkpoint saved) first and the app exits when it has halted."""
        if self.live and self.session is not None:
            if self.quitting:
                self.notify("still saving before quit… (ctrl+c quits at once)", timeout=3)
                return
            self.quitting = True
            self.plot.hold(0.5)
            step = self.session.pause()
            self.state = State.PAUSING
            self.status.detail = f"Quitting: pausing after step {step} to save…" if step is not None else "Quitting…"
            return
        self.exit(self.exit_code(), return_code=self.exit_code())

    async def action_interrupt(self) -> None:
        """ctrl+c: like q; a second one while the save is under way quits at once, like the headless CLI
        (the run halts after its current step without saving; the previous checkpoint stays valid)."""
        if self.quitting and self.live and self.session is not None:
            self.abandoned = True
            self.session.stop()
            self.exit(ABANDONED_EXIT, return_code=ABANDONED_EXIT)  # 130, like the headless CLI
            return
        await self.action_quit()

    def exit_code(self) -> int:
        return 1 if self.state == State.FAILED else 0


def data_progress_text(event: DataProgress) -> str:
    """'preparing data: tokenizing 42%' (or a count when the total is unknown)."""
    if event.total:
        return f"preparing data: {event.stage} {min(100, 100 * event.done // event.total)}%"
    return f"preparing data: {event.stage}…" if not event.done else f"preparing data: {event.stage} {event.done:,}"


def last_good_checkpoint(store: RunStore, run: RunInfo) -> CheckpointInfo | None:
    """A run's newest valid checkpoint, else the valid one it branched from (a branch that failed early)."""
    if run.newest is not None:
        return run.newest
    if run.parent is None:
        return None
    with contextlib.suppress(UserError):
        parent = store.checkpoint(*run.parent)
        return parent if parent.valid else None
    return None


def _exit_when_halted(session: TrainingSession | None, grace_s: float = 2.0) -> None:
    if session is not None:
        session.finished.wait()
    time.sleep(grace_s)  # time for the normal exit path; if it is stuck on a dead terminal, end here
    os._exit(0)


def run_app(runs_dir: Path, plan: RunPlan | None = None, until_step: int | None = None) -> int:
    """Open the app on `runs_dir` (training `plan` at once when given); returns the process exit code."""
    app = TrainerApp(Path(runs_dir), plan, until_step)
    result = app.run()
    if app.abandoned:
        # the terminal is restored; the trainer thread may be mid-save: do not wait for it (a half-written
        # checkpoint stays a temp dir, cleaned up on the next start; the previous checkpoint is intact)
        os._exit(ABANDONED_EXIT)
    if app.return_code:
        return app.return_code
    return result if isinstance(result, int) else 0
