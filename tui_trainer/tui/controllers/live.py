"""The live run on screen: its coalesced progress, its engine events, and the one way a failure or a fault
reaches the screen. Every state change goes through the screen's Lifecycle (tui/lifecycle.py); a failure,
however it arrives (a Failed event, StateChanged to Failed, the worker's error), is shown by `fail` alone."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

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
from tui_trainer.core.store import CheckpointInfo, RunInfo, RunStore
from tui_trainer.tui.controllers.browse import Browser
from tui_trainer.tui.controllers.host import Host
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.screens.branch import BranchScreen, suggest_lower_lr
from tui_trainer.tui.widgets.run_tree import NodeRef

PROGRESS_HZ = 4
USABLE = "  Checkpoints stay usable: select one, then r to resume or b to branch."


class LiveView:
    """Turns the live session's messages into lifecycle moves and widget updates."""

    def __init__(self, screen: Host, browse: Browser, open_branch: Callable[[BranchScreen], None]) -> None:
        self.screen = screen
        self.browse = browse
        self.open_branch = open_branch  # the branch dialog, whose plan starts training (Tools)
        self._last_progress = 0.0
        self._progress_timer_set = False

    # ---- coalesced progress

    def progress(self) -> None:
        # Numbers on screen change at most PROGRESS_HZ times a second: a fast loop logs hundreds of steps
        # a second and every widget update costs the training thread CPU (and the GIL).
        wait = self._last_progress + 1 / PROGRESS_HZ - time.monotonic()
        if wait <= 0:
            self.show_progress()
        elif not self._progress_timer_set:
            self._progress_timer_set = True
            self.screen.set_timer(wait, self.show_progress)

    def show_progress(self) -> None:
        """Put the newest step's numbers on screen now (the throttle calls this)."""
        screen = self.screen
        if not screen.alive:
            return
        self._progress_timer_set = False
        self._last_progress = time.monotonic()
        self.drain()  # also lets the session post the next Progress
        newest = screen.session.last_step if screen.session else None
        if newest is None or newest.run != screen.status.run:
            return
        if screen.state == State.STARTING:
            screen.lifecycle.move(State.RUNNING)
        screen.status.show_step(newest)
        screen.device.show_step(newest, live=screen.live)

    def data(self, event: DataProgress) -> None:
        if self.screen.state != State.STARTING or event.run != self.screen.status.run:
            return  # the first step already ran
        self.screen.status.detail = data_progress_text(event)

    def drain(self) -> None:
        session, plot = self.screen.session, self.screen.plot
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
        curves = self.browse.history.add_live(session.run_name, records)
        if curves is not None and (plot.curves is curves or any(c is curves for c in plot.compared)):
            plot.mark_dirty()  # the live run is on the plot, selected or compared

    # ---- engine events

    def engine(self, event: object) -> None:
        screen = self.screen
        if isinstance(event, StateChanged):
            self._on_state(event)
        elif isinstance(event, CheckpointSaved):
            self.browse.refresh_tree()
            if screen.lifecycle.doing(Job.SAVING) is not None:
                screen.lifecycle.end(Job.SAVING)
                screen.notify(f"saved {event.run}@{event.step}", timeout=4)
        elif isinstance(event, EvalLogged):
            self.drain()
            screen.status.show_eval(event)
        elif isinstance(event, SampleLogged):
            sample = {"step": event.step, "prompt": event.prompt, "text": event.text}
            screen.sample.add_live(event.run, sample)
        elif isinstance(event, Notice):
            screen.notify(event.message, severity="warning", timeout=10)
        elif isinstance(event, Failed):
            if FaultKind(event.kind).resumable:
                self._show_fault(event)
            else:
                self.fail(event.step, event.message)

    def _on_state(self, event: StateChanged) -> None:
        screen = self.screen
        if event.state == State.FAILED:
            self.fail(event.step, event.detail or "the trainer stopped on an error")
            return
        was_starting = screen.state == State.STARTING
        if not screen.lifecycle.engine_state(event.state):
            return  # no change (we already said which step it pauses after), or a failure stays on screen
        if event.state == State.PAUSING:
            screen.status.detail = f"Pausing: {event.detail}…" if event.detail else "Pausing…"
        elif event.state == State.RUNNING:
            screen.status.detail = ""
            if was_starting:
                self.browse.refresh_tree(select=NodeRef(event.run))
        elif event.state == State.PAUSED:
            self._paused(event.step)
        elif event.state == State.FINISHED:
            screen.status.detail = f"finished at step {event.step}"
            self.browse.refresh_tree()
        elif event.state == State.STOPPED:
            screen.status.detail = f"stopped at step {event.step}"

    def _paused(self, step: int) -> None:
        fault = self.screen.lifecycle.fault
        self.screen.status.detail = (
            f"paused at step {step} ({fault.kind}, see above)"
            if fault is not None
            else f"paused at step {step}; checkpoint saved"
        )
        self.browse.refresh_tree()
        if fault is not None and fault.kind == FaultKind.NAN:
            self._offer_lower_lr_branch(fault)

    def _show_fault(self, event: Failed) -> None:
        """A fault the engine survives (NaN, disk, OOM): the run pauses with every checkpoint intact."""
        self.screen.lifecycle.fault = event
        self.show_banner(f"⏸ Paused at step {event.step}: {fmt.remedy(event, resume='press r', branch='b')}")

    def fail(self, step: int, message: str) -> None:
        """The one place a failure reaches the screen: a banner with step and message, state Failed."""
        text = self.screen.lifecycle.fail(step, message)
        if text is None:
            return  # already shown
        self.screen.status.detail = f"at step {step} (error above)"
        self.show_banner(f"✗ {text}")
        self.browse.refresh_tree()

    def show_banner(self, text: str) -> None:
        self.screen.banner.update(text + "\n" + USABLE)
        self.screen.banner.add_class("-shown")

    def _offer_lower_lr_branch(self, fault: Failed) -> None:
        """After a divergence, open the branch dialog on the last good checkpoint with a lower lr: the run's
        newest, or for a branch that diverged before saving one, the checkpoint it branched from."""
        screen = self.screen
        run = screen.store.run(fault.run)
        good = last_good_checkpoint(screen.store, run)
        if good is None:
            return
        self.browse.refresh_tree(select=NodeRef(good.run, good.step))
        note = f"loss went non-finite at step {fault.step}: branching from {good.ref} with half the lr"
        ranks = run.world_size if screen.lifecycle.detached_mode else None
        dialog = BranchScreen(screen.store, good, run.config, suggest_lower_lr(run.config), note, ranks)
        self.open_branch(dialog)


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
