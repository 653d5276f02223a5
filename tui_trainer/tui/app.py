"""The Textual app: a thin shell that opens the main screen and owns the process-level concerns.

The main screen (screens/main.py) owns the layout, the keys and the run's lifecycle; dialogs are screens
of their own. The app keeps what belongs to the process: signals, ctrl+c, the exit code.
Never imports torch: the engine is imported by the worker thread after the first frame is on screen.
See ARCHITECTURE.md ("The app").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from textual import events
from textual.actions import ActionParseResult
from textual.app import App
from textual.binding import Binding, BindingType
from textual.dom import DOMNode
from textual.screen import Screen

from tui_trainer.control.client import ControlClient
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore
from tui_trainer.tui.screens.dialog import FormReady, FormScreen, TypeAhead
from tui_trainer.tui.screens.help import HelpScreen
from tui_trainer.tui.screens.main import MainScreen
from tui_trainer.tui.session import TrainerFactory, TrainingSession
from tui_trainer.tui.setup import Setup
from tui_trainer.tui.widgets.device_panel import Probe, process_probe

ABANDONED_EXIT = 130  # a second ctrl+c, as in the headless CLI
FIRST_FRAME_GRACE_S = 0.1
TYPE_AHEAD_MAX_S = 1.0  # keys held for a form that never says it is ready go on after this


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
    """Opens MainScreen on `runs_dir` (training `plan` at once when given)."""

    CSS_PATH = styles_path()
    TITLE = "tui-trainer"
    ENABLE_COMMAND_PALETTE = False  # every action has its own key; ctrl+p would only add noise
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]  # noqa: RUF012 - declared on App
    # keys that work on every screen; the main screen's own keys are in MainScreen.BINDINGS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        # replaces Textual's "press ctrl+q to quit" toast: ctrl+c saves and quits like q, twice quits at once
        Binding("ctrl+c", "interrupt", "Quit", show=False),
    ]

    def __init__(
        self,
        runs_dir: Path,
        plan: RunPlan | None = None,
        until_step: int | None = None,
        *,
        clock: Callable[[], float] = time.time,
        probe: Probe | None = None,
        trainer_factory: TrainerFactory | None = None,
        generator: Callable[[Path], str] = generate_sample,
        strict: bool = False,
        remote: ControlClient | None = None,
        pending: tuple[str, int | None] | None = None,
    ) -> None:
        """`strict`: an illegal run-state change raises (the tests) instead of being logged. `remote`: attach
        to the run that client's process trains instead of training here; `pending`: (run, pid) of a process
        just started in the background, attached to once it serves its channel."""
        super().__init__()
        store = RunStore(runs_dir)
        probe = probe or process_probe()
        setup = Setup(store, plan, until_step, clock, probe, trainer_factory, generator, strict, remote, pending)
        self.main = MainScreen(setup)
        self.abandoned = False  # a second ctrl+c: quit without waiting for the save
        self._signals: list[signal.Signals] = []
        self.type_ahead = TypeAhead()

    async def on_mount(self) -> None:
        await self.push_screen(self.main)  # mounted with its widgets before begin() fills them
        self.main.begin()
        # a closed SSH session (SIGHUP) or a kill (SIGTERM) pauses and saves like `q` does
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal)
                self._signals.append(sig)

    def push_screen(
        self,
        screen: Screen[Any] | str,
        callback: Any = None,
        wait_for_dismiss: bool = False,
        *,
        mode: str | None = None,
    ) -> Any:
        """A form dialog (branch, export) gets the keys typed while it opens: hold them until its first
        field has focus (FormReady), so `b Tab 5` typed at once puts 5 in the second field."""
        if isinstance(screen, FormScreen):
            self.type_ahead.hold()
            self.set_timer(TYPE_AHEAD_MAX_S, lambda: self.post_message(FormReady()))
        return super().push_screen(screen, callback, wait_for_dismiss, mode=mode)  # type: ignore[call-overload]

    async def on_event(self, event: events.Event) -> None:
        # held: keys arriving now, and keys typed before the push that are still bubbling up from the
        # widget that had focus (the app checks non-priority bindings when a key reaches it)
        if isinstance(event, events.Key) and self.type_ahead.take(event):
            event.stop()
            return
        await super().on_event(event)

    async def on_form_ready(self, message: FormReady) -> None:
        """Replay the held keys in order, each handled as if it had just arrived."""
        for key in self.type_ahead.release():
            await super().on_event(events.Key(key.key, key.character))

    def on_ready(self) -> None:
        """The first frame is composed: start the worker (it spends seconds importing torch, holding the GIL
        much of that time) a moment later, so the writer thread gets the frame onto the terminal first."""
        plan, remote = self.main.setup.plan, self.main.setup.remote
        if remote is not None:
            self.main.training.attach_remote(remote)
        elif self.main.setup.pending is not None:
            self.main.training.attach_when_live(*self.main.setup.pending)
        elif plan is not None:
            self.set_timer(FIRST_FRAME_GRACE_S, lambda: self.main.training.start(plan))

    def _on_signal(self) -> None:
        """SIGHUP / SIGTERM: pause (the trainer saves), then exit. The terminal may be gone, and Textual can
        block writing to a dead tty, so a watchdog thread ends the process once the trainer has halted."""
        main = self.main
        if main.training.attached:  # the run is another process's: leave it training
            main.training.detach()
            threading.Thread(target=_exit_when_halted, args=(None,), name="hangup-watchdog", daemon=True).start()
            return
        session = main.session if main.live else None
        if session is not None:
            main.lifecycle.quitting = True
            session.pause()
        threading.Thread(target=_exit_when_halted, args=(session,), name="hangup-watchdog", daemon=True).start()
        if session is None:
            main.training.exit_app()

    def on_unmount(self) -> None:
        self.main.leaving.set()
        # however the app ends, never leave the trainer running without a screen: pause (it saves)
        if self.main.live and self.main.session is not None and not self.abandoned:
            self.main.session.leave()  # ours pauses (it saves); another process's goes on training
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            for sig in self._signals:
                loop.remove_signal_handler(sig)

    async def run_action(
        self,
        action: str | ActionParseResult,
        default_namespace: DOMNode | None = None,
        namespaces: Mapping[str, DOMNode] | None = None,
    ) -> bool:
        """A key that cannot apply right now says why in one short notification instead of doing nothing."""
        if await super().run_action(action, default_namespace, namespaces):
            return True
        if not isinstance(default_namespace, MainScreen) or not isinstance(action, str) or "." in action:
            return False
        reason = default_namespace.refusal(action)
        if reason is None:
            return False
        self.notify(reason, timeout=3)
        return True

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        """Quit; a live run is paused (full checkpoint saved) first and the app exits when it has halted."""
        self.main.training.quit()

    async def action_interrupt(self) -> None:
        """ctrl+c: like q; a second one while the save is under way quits at once, like the headless CLI
        (the run halts after its current step without saving; the previous checkpoint stays valid)."""
        if self.main.training.abandon():
            self.abandoned = True
            self.exit(ABANDONED_EXIT, return_code=ABANDONED_EXIT)  # 130, like the headless CLI
            return
        self.main.training.quit()


def _exit_when_halted(session: TrainingSession | None, grace_s: float = 2.0) -> None:
    if session is not None:
        session.finished.wait()
    time.sleep(grace_s)  # time for the normal exit path; if it is stuck on a dead terminal, end here
    os._exit(0)


def run_app(
    runs_dir: Path,
    plan: RunPlan | None = None,
    until_step: int | None = None,
    remote: ControlClient | None = None,
    pending: tuple[str, int | None] | None = None,
) -> int:
    """Open the app on `runs_dir` (training `plan` at once, or attached to `remote`'s run or the `pending`
    one, when given); returns the process exit code."""
    app = TrainerApp(Path(runs_dir), plan, until_step, remote=remote, pending=pending)
    result = app.run()
    # the terminal is restored: one line on it says what became of the run (paused where, or still training)
    line = app.main.training.farewell(abandoned=app.abandoned)
    if line is not None:
        with contextlib.suppress(OSError):  # a terminal that went away takes no goodbye
            print(line, flush=True)
    if app.abandoned:
        # the trainer thread may be mid-save: do not wait for it (a half-written checkpoint stays a temp
        # dir, cleaned up on the next start; the previous checkpoint is intact)
        os._exit(ABANDONED_EXIT)
    if app.return_code:
        return app.return_code
    return result if isinstance(result, int) else 0
