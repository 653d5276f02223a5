"""One run at a time: start it on a worker thread (or in the background, once attached), attach to a run
another process trains, and what p / s / q / ctrl+c do to it. The session is one interface for either kind
(tui/session.py, tui/remote.py): nothing here asks which one it holds."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

from textual.worker import Worker, WorkerState

from tui_trainer.control.client import ControlClient
from tui_trainer.control.live import wait_for_channel
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import State
from tui_trainer.core.launch import plan_argv, spawn_detached
from tui_trainer.core.plan import RunPlan
from tui_trainer.tui.controllers.browse import Browser
from tui_trainer.tui.controllers.host import Host
from tui_trainer.tui.controllers.live import LiveView
from tui_trainer.tui.lifecycle import Job
from tui_trainer.tui.messages import Connected, deliver
from tui_trainer.tui.remote import RemoteSession
from tui_trainer.tui.session import TrainingSession

RESTART_WAIT_S = 120.0  # how long an attached app waits for a self-restarting run's next process


class Training:
    """Starts, attaches to, pauses and leaves the live run; the screen's `session` is the one it holds."""

    def __init__(self, screen: Host, browse: Browser, live_view: LiveView) -> None:
        self.screen = screen
        self.browse = browse
        self.live_view = live_view
        self.left_training: str | None = None  # detached from this run (q while attached): it trains on

    def start(self, plan: RunPlan) -> None:
        screen = self.screen
        if screen.lifecycle.detached_mode:  # attached once: new runs train in the background too, and we attach
            argv = plan_argv(screen.store, plan)
            pid = spawn_detached(argv, screen.store, plan.run, name_option=False)
            self.attach_when_live(plan.run, pid)
            return
        # --until-step belongs to the run the app was opened with, not to later resumes and branches
        until = screen.setup.until_step if plan is screen.setup.plan else None
        session = TrainingSession(screen.store, plan, screen.post_message, until, screen.setup.trainer_factory)
        self.attach(session)
        screen.run_worker(session.run, thread=True, group="train", name=f"train {plan.run}", exit_on_error=False)

    def attach_remote(self, client: ControlClient) -> None:
        """Show the run another process trains: its history from disk, then its events from the channel."""
        screen = self.screen
        session = RemoteSession(screen.store, client, screen.post_message)
        screen.lifecycle.detached_mode = True
        self.attach(session)
        screen.status.detail = f"attached to pid {session.pid} · q detaches (the run goes on) · p pauses"
        name = f"attach {session.run_name}"
        screen.run_worker(session.run, thread=True, group="train", name=name, exit_on_error=False)

    def attach_when_live(self, run: str, pid: int | None) -> None:
        """Attach to `run` once the process `pid` (just started in the background) serves its channel."""
        screen = self.screen
        screen.lifecycle.begin(Job.CONNECTING, run)
        screen.status.run = run
        screen.status.detail = f"{run} is starting in the background (pid {pid}): loading torch and data…"
        self._wait_for(run, partial(wait_for_channel, screen.store, run, pid, screen.leaving))

    def connect(self, run: str) -> None:
        """Attach to `run`, which another process trains (the `a` key)."""
        self.screen.lifecycle.begin(Job.CONNECTING, run)
        self.screen.status.detail = f"connecting to {run}…"
        # the hello can take a moment from a busy process: never on the UI thread
        self._wait_for(run, partial(_open_live, self.screen.store.run_dir(run), run))

    def _wait_for(self, run: str, channel: partial[ControlClient]) -> None:
        work = partial(deliver, self.screen.post_message, Connected, run, channel)
        self.screen.run_worker(work, group="connect", thread=True)

    def connected(self, message: Connected) -> None:
        screen = self.screen
        screen.lifecycle.end(Job.CONNECTING)
        if message.error is None:
            self.attach_remote(message.result)
            return
        screen.status.detail = ""
        self.live_view.show_banner(f"✗ {message.error}")
        self.browse.refresh_tree()
        screen.refresh_bindings()

    def attach(self, session: TrainingSession) -> None:
        """Make `session` the live run (its worker is started by the caller)."""
        screen = self.screen
        screen.session = session
        screen.lifecycle.start()
        screen.banner.remove_class("-shown")
        screen.status.run = session.run_name
        screen.status.detail = "starting: loading torch and data…"
        # the engine reports plan.notes itself (Notice events); a resumed run's curve is reloaded
        self.browse.history.forget(session.run_name)
        self.browse.show_run(session.run_name, force=True)

    def promised(self, message: RemoteSession.Promised) -> None:
        if self.screen.state != State.PAUSING:
            return
        detail = f"Pausing after step {message.step}…" if message.step is not None else f"Pausing: {message.error}"
        self.screen.status.detail = detail

    # ---- the worker's end

    def worker_changed(self, worker: Worker[object], state: WorkerState) -> None:
        screen = self.screen
        if state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        self.live_view.drain()
        session = screen.session
        step = session.last_step.step if session and session.last_step else 0
        failure = None
        if state == WorkerState.ERROR:
            error = worker.error
            failure = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        elif state == WorkerState.SUCCESS and worker.result == State.FAILED:
            failure = "the trainer stopped on an error"
        result = final_state(worker.result) if state == WorkerState.SUCCESS else State.STOPPED
        screen.lifecycle.halted(State.FAILED if failure else result)
        if failure is not None:
            self.live_view.fail(step, failure)
        screen.device.show_step(session.last_step if session else None, live=False)
        note = session.end_note(screen.store) if session is not None else None
        if note is not None:
            screen.status.detail = note
        how = session.restart_wait(screen.store) if session is not None else None
        if how is not None and session is not None:
            self._await_restart(session.run_name, how)
        self.browse.refresh_tree()
        screen.refresh_bindings()
        if screen.lifecycle.quitting:
            self.exit_app()

    def _await_restart(self, run: str, how: str) -> None:
        """The process of a run that restarts itself died: attach again when its successor serves the
        channel; after RESTART_WAIT_S the app just stays open for browsing, as for any lost run."""
        screen = self.screen
        screen.lifecycle.begin(Job.CONNECTING, run)
        screen.status.detail = f"{run} {how} — waiting for a restart (up to {RESTART_WAIT_S:.0f} s)"
        self._wait_for(run, partial(wait_for_channel, screen.store, run, None, screen.leaving, RESTART_WAIT_S))

    def exit_app(self) -> None:
        """The one exit: 1 when the run failed, else 0."""
        self.screen.leaving.set()
        code = self.screen.lifecycle.exit_code()
        self.screen.app.exit(code, return_code=code)

    # ---- pause, save, quit

    def pause(self) -> None:
        screen = self.screen
        if screen.session is None or not screen.live:
            return
        step, promised_later = self._ask_pause(screen.session)
        if promised_later:  # the step arrives as RemoteSession.Promised
            screen.status.detail = "Pausing: asking the training process…"
        else:
            screen.status.detail = (
                f"Pausing after step {step}…" if step is not None else "Pausing: stopping before the first step…"
            )

    def _ask_pause(self, session: TrainingSession) -> tuple[int | None, bool]:
        """Ask the live run to pause (it saves); see TrainingSession.ask_pause."""
        self.screen.plot.hold(0.5)  # the acknowledgement's frame must not wait for a plot render
        asked = session.ask_pause()
        # say so at once: the loop needs up to one step (plus the save) to act on it
        self.screen.lifecycle.move(State.PAUSING)
        return asked

    def save(self) -> None:
        screen = self.screen
        if screen.session is None or not screen.live:
            return
        screen.lifecycle.begin(Job.SAVING)
        screen.session.save_now()
        screen.notify("saving a checkpoint at the next step boundary…", timeout=3)

    @property
    def attached(self) -> bool:
        """Watching a run another process trains: q detaches, the run goes on."""
        screen = self.screen
        if screen.lifecycle.doing(Job.CONNECTING) is not None:
            return True  # started in the background: it goes on whether we wait for it or not
        return screen.live and screen.session is not None and screen.session.keeps_training

    def detach(self) -> None:
        screen = self.screen
        if self.attached:  # the line left on the terminal says so (farewell)
            shown = screen.session.run_name if screen.session else None
            self.left_training = screen.lifecycle.doing(Job.CONNECTING) or shown
            if screen.session is not None and screen.live:
                screen.session.leave()
        self.exit_app()

    def farewell(self, abandoned: bool = False) -> str | None:
        """The one line the app leaves on the terminal: what became of the run it showed (None: it showed
        none). `abandoned`: a second ctrl+c quit without waiting for the save."""
        if self.left_training is not None:
            return f"{self.left_training} keeps training: tui-trainer attach {self.left_training}"
        session = self.screen.session
        if session is None:
            return None
        run = session.run_name
        newest = None
        with contextlib.suppress(UserError):
            newest = self.screen.store.run(run).newest
        where = _shown_path(newest.path) if newest is not None else "no checkpoint saved"
        last = session.last_step.step if session.last_step is not None else 0
        if abandoned:
            return f"{run} stopped at step {last} without saving; newest valid checkpoint: {where}"
        state = self.screen.state
        if state == State.PAUSED:
            return f"{run} paused at step {newest.step if newest is not None else last}: {where}"
        if state == State.FINISHED:
            return f"{run} finished at step {newest.step if newest is not None else last}: {where}"
        word = "lost (its process ended without a word)" if session.lost else state.value.lower()
        return f"{run} {word} at step {last}; newest valid checkpoint: {where}"

    def quit(self) -> None:
        """Quit; a live run is paused (full checkpoint saved) first and the app exits when it has halted."""
        screen = self.screen
        if self.attached:
            self.detach()
        elif not screen.live or screen.session is None:
            self.exit_app()
        elif screen.lifecycle.quitting:
            screen.notify("still saving before quit… (ctrl+c quits at once)", timeout=3)
        else:
            screen.lifecycle.quitting = True
            step, _ = self._ask_pause(screen.session)
            screen.status.detail = f"Quitting: pausing after step {step} to save…" if step is not None else "Quitting…"

    def abandon(self) -> bool:
        """A second ctrl+c while quitting: halt the run after its current step without saving. True if so."""
        screen = self.screen
        if not (screen.lifecycle.quitting and screen.live and screen.session is not None):
            return False
        screen.session.stop()
        return True


def final_state(result: object) -> State:
    """The state word a trainer's run() returned; one the app does not know counts as Stopped."""
    try:
        return State(str(result))
    except ValueError:
        return State.STOPPED


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
