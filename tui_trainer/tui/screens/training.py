"""The main screen's training side: start a run on a worker thread and show what it reports.

Every state change goes through the screen's Lifecycle (tui/lifecycle.py); a failure, however it
arrives (a Failed event, StateChanged to Failed, the worker's error), is shown by `fail` alone.
See ARCHITECTURE.md ("The app").
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

from textual import on
from textual.worker import Worker, WorkerState

from tui_trainer.control.client import ControlClient
from tui_trainer.control.commands import plan_argv, spawn_detached, wait_for_channel
from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import (
    CheckpointSaved,
    DataProgress,
    EvalLogged,
    Failed,
    FaultKind,
    Notice,
    SampleLogged,
    State,
    StateChanged,
)
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import CheckpointInfo, RunInfo, RunStore
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.messages import Connected, deliver
from tui_trainer.tui.remote import RemoteSession
from tui_trainer.tui.screens.branch import BranchScreen, suggest_lower_lr
from tui_trainer.tui.screens.browse import BrowseScreen
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.widgets.run_tree import NodeRef

PROGRESS_HZ = 4
RESTART_WAIT_S = 120.0  # how long an attached app waits for a self-restarting run's next process
USABLE = "  Checkpoints stay usable: select one, then r to resume or b to branch."


class TrainingScreen(BrowseScreen):
    """Runs one TrainingSession at a time and turns its messages into lifecycle moves and widget updates."""

    _last_progress = 0.0
    _progress_timer_set = False

    def start_training(self, plan: RunPlan) -> None:
        if self.lifecycle.detached_mode:  # attached once: new runs train in the background too, and we attach
            argv = plan_argv(self.store, plan)
            pid = spawn_detached(argv, self.store, plan.run, name_option=False)
            self.attach_when_live(plan.run, pid)
            return
        # --until-step belongs to the run the app was opened with, not to later resumes and branches
        until = self.setup.until_step if plan is self.setup.plan else None
        session = TrainingSession(self.store, plan, self.post_message, until, self.setup.trainer_factory)
        self.attach(session)
        self.run_worker(session.run, thread=True, group="train", name=f"train {plan.run}", exit_on_error=False)

    def attach_remote(self, client: ControlClient) -> None:
        """Show the run another process trains: its history from disk, then its events from the channel."""
        session = RemoteSession(self.store, client, self.post_message)
        self.lifecycle.detached_mode = True
        self.attach(session)
        self.status.detail = f"attached to pid {session.pid} · q detaches (the run goes on) · p pauses"
        self.run_worker(session.run, thread=True, group="train", name=f"attach {session.run_name}", exit_on_error=False)

    def attach_when_live(self, run: str, pid: int | None) -> None:
        """Attach to `run` once the process `pid` (just started in the background) serves its channel."""
        self.lifecycle.begin(Job.CONNECTING, run)
        self.status.run = run
        self.status.detail = f"{run} is starting in the background (pid {pid}): loading torch and data…"
        wait = partial(wait_for_channel, self.store, run, pid, self.leaving)
        self.run_worker(partial(deliver, self.post_message, Connected, run, wait), group="connect", thread=True)

    def on_connected(self, message: Connected) -> None:
        if not self.alive:
            return
        self.lifecycle.end(Job.CONNECTING)
        if message.error is None:
            self.attach_remote(message.result)
            return
        self.status.detail = ""
        self._show_banner(f"✗ {message.error}")
        self.refresh_tree()
        self.refresh_bindings()

    def attach(self, session: TrainingSession) -> None:
        """Make `session` the live run (its worker is started by the caller)."""
        self.session = session
        self.lifecycle.start()
        self.banner.remove_class("-shown")
        self.status.run = session.run_name
        self.status.detail = "starting: loading torch and data…"
        # the engine reports plan.notes itself (Notice events); a resumed run's curve is reloaded
        self.history.forget(session.run_name)
        self.show_run(session.run_name, force=True)

    def on_remote_session_promised(self, message: RemoteSession.Promised) -> None:
        if not self.alive or self.state != State.PAUSING:
            return
        if message.step is not None:
            self.status.detail = f"Pausing after step {message.step}…"
        else:
            self.status.detail = f"Pausing: {message.error}"

    # ---- coalesced progress

    def on_training_session_progress(self, message: TrainingSession.Progress) -> None:
        # Numbers on screen change at most PROGRESS_HZ times a second: a fast loop logs hundreds of steps
        # a second and every widget update costs the training thread CPU (and the GIL).
        wait = self._last_progress + 1 / PROGRESS_HZ - time.monotonic()
        if wait <= 0:
            self.show_progress()
        elif not self._progress_timer_set:
            self._progress_timer_set = True
            self.set_timer(wait, self.show_progress)

    def show_progress(self) -> None:
        """Put the newest step's numbers on screen now (the throttle calls this)."""
        if not self.alive:
            return
        self._progress_timer_set = False
        self._last_progress = time.monotonic()
        self._drain()  # also lets the session post the next Progress
        newest = self.session.last_step if self.session else None
        if newest is None or newest.run != self.status.run:
            return
        if self.state == State.STARTING:
            self.lifecycle.move(State.RUNNING)
        self.status.show_step(newest)
        self.device.show_step(newest, live=self.live)

    def on_training_session_data(self, message: TrainingSession.Data) -> None:
        if not self.alive or self.state != State.STARTING or message.event.run != self.status.run:
            return  # shutting down, or the first step already ran
        self.status.detail = data_progress_text(message.event)

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
            else {"step": p.step, "loss": p.loss, "lr": p.lr, "tokens_per_s": p.tokens_per_s, "grad_norm": p.grad_norm}
            for p in points
        ]
        curves = self.history.add_live(session.run_name, records)
        if curves is not None and (self.plot.curves is curves or any(c is curves for c in self.plot.compared)):
            self.plot.mark_dirty()  # the live run is on the plot, selected or compared

    # ---- engine events

    def on_training_session_engine(self, message: TrainingSession.Engine) -> None:
        if not self.alive:
            return
        event = message.event
        if isinstance(event, StateChanged):
            self._on_state(event)
        elif isinstance(event, CheckpointSaved):
            self.refresh_tree()
            if self.lifecycle.doing(Job.SAVING) is not None:
                self.lifecycle.end(Job.SAVING)
                self.notify(f"saved {event.run}@{event.step}", timeout=4)
        elif isinstance(event, EvalLogged):
            self._drain()
            self.status.show_eval(event)
        elif isinstance(event, SampleLogged):
            sample = {"step": event.step, "prompt": event.prompt, "text": event.text}
            self.sample.add_live(event.run, sample)
        elif isinstance(event, Notice):
            self.notify(event.message, severity="warning", timeout=10)
        elif isinstance(event, Failed):
            if FaultKind(event.kind).resumable:
                self._show_fault(event)
            else:
                self.fail(event.step, event.message)

    def _on_state(self, event: StateChanged) -> None:
        if event.state == State.FAILED:
            self.fail(event.step, event.detail or "the trainer stopped on an error")
            return
        was_starting = self.state == State.STARTING
        if not self.lifecycle.engine_state(event.state):
            return  # no change (we already said which step it pauses after), or a failure stays on screen
        if event.state == State.PAUSING:
            self.status.detail = f"Pausing: {event.detail}…" if event.detail else "Pausing…"
        elif event.state == State.RUNNING:
            self.status.detail = ""
            if was_starting:
                self.refresh_tree(select=NodeRef(event.run))
        elif event.state == State.PAUSED:
            self._paused(event.step)
        elif event.state == State.FINISHED:
            self.status.detail = f"finished at step {event.step}"
            self.refresh_tree()
        elif event.state == State.STOPPED:
            self.status.detail = f"stopped at step {event.step}"

    def _paused(self, step: int) -> None:
        fault = self.lifecycle.fault
        self.status.detail = (
            f"paused at step {step} ({fault.kind}, see above)"
            if fault is not None
            else f"paused at step {step}; checkpoint saved"
        )
        self.refresh_tree()
        if fault is not None and fault.kind == FaultKind.NAN:
            self._offer_lower_lr_branch(fault)

    def _show_fault(self, event: Failed) -> None:
        """A fault the engine survives (NaN, disk, OOM): the run pauses with every checkpoint intact."""
        self.lifecycle.fault = event
        self._show_banner(f"⏸ Paused at step {event.step}: {fmt.remedy(event, resume='press r', branch='b')}")

    def fail(self, step: int, message: str) -> None:
        """The one place a failure reaches the screen: a banner with step and message, state Failed."""
        text = self.lifecycle.fail(step, message)
        if text is None:
            return  # already shown
        self.status.detail = f"at step {step} (error above)"
        self._show_banner(f"✗ {text}")
        self.refresh_tree()

    def _show_banner(self, text: str) -> None:
        self.banner.update(text + "\n" + USABLE)
        self.banner.add_class("-shown")

    def _offer_lower_lr_branch(self, fault: Failed) -> None:
        """After a divergence, open the branch dialog on the last good checkpoint with a lower lr: the run's
        newest, or for a branch that diverged before saving one, the checkpoint it branched from."""
        run = self.store.run(fault.run)
        good = last_good_checkpoint(self.store, run)
        if good is None:
            return
        self.refresh_tree(select=NodeRef(good.run, good.step))
        note = f"loss went non-finite at step {fault.step}: branching from {good.ref} with half the lr"
        ranks = run.world_size if self.lifecycle.detached_mode else None
        self.open_branch_dialog(BranchScreen(self.store, good, run.config, suggest_lower_lr(run.config), note, ranks))

    def open_branch_dialog(self, dialog: BranchScreen) -> None:
        """Push the dialog; the plan it returns (None when cancelled) starts training."""

        def started(plan: RunPlan | None) -> None:
            if plan is not None:
                self.start_training(plan)

        self.app.push_screen(dialog, started)

    # ---- the worker's end

    @on(Worker.StateChanged)
    def _train_changed(self, event: Worker.StateChanged) -> None:
        worker, state = event.worker, event.state
        if worker.group != "train" or not self.alive:
            return
        if state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self._drain()
        step = self.session.last_step.step if self.session and self.session.last_step else 0
        failure = None
        if state == WorkerState.ERROR:
            error = worker.error
            failure = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        elif state == WorkerState.SUCCESS and worker.result == State.FAILED:
            failure = "the trainer stopped on an error"
        result = final_state(worker.result) if state == WorkerState.SUCCESS else State.STOPPED
        self.lifecycle.halted(State.FAILED if failure else result)
        if failure is not None:
            self.fail(step, failure)
        self.device.show_step(self.session.last_step if self.session else None, live=False)
        note = self.session.end_note(self.store) if self.session is not None else None
        if note is not None:
            self.status.detail = note
        how = self.session.restart_wait(self.store) if self.session is not None else None
        if how is not None and self.session is not None:
            self._await_restart(self.session.run_name, how)
        self.refresh_tree()
        self.refresh_bindings()
        if self.lifecycle.quitting:
            self.exit_app()

    def _await_restart(self, run: str, how: str) -> None:
        """The process of a run that restarts itself died: attach again when its successor serves the
        channel; after RESTART_WAIT_S the app just stays open for browsing, as for any lost run."""
        self.lifecycle.begin(Job.CONNECTING, run)
        self.status.detail = f"{run} {how} — waiting for a restart (up to {RESTART_WAIT_S:.0f} s)"
        wait = partial(wait_for_channel, self.store, run, None, self.leaving, RESTART_WAIT_S)
        self.run_worker(partial(deliver, self.post_message, Connected, run, wait), group="connect", thread=True)

    def exit_app(self) -> None:
        """The one exit: 1 when the run failed, else 0."""
        self.leaving.set()
        code = self.lifecycle.exit_code()
        self.app.exit(code, return_code=code)


def final_state(result: object) -> State:
    """The state word a trainer's run() returned; one the app does not know counts as Stopped."""
    try:
        return State(str(result))
    except ValueError:
        return State.STOPPED


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
