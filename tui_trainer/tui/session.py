"""One training run driven from a Textual thread worker (see ARCHITECTURE.md).

The worker thread owns the engine; it never touches widgets. Events reach the UI through
`post_message` (thread-safe, non-blocking). Logged steps go into a buffer the plot drains on its own
timer, so a fast loop costs one cheap, coalescing message per step and never loses a point.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from textual.message import Message

from tui_trainer.control.server import ControlServer
from tui_trainer.core.events import (
    DataProgress,
    DeviceSample,
    EvalLogged,
    Event,
    Notice,
    State,
    StepLogged,
)
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore


class TrainerLike(Protocol):
    """The control surface of engine.trainer.Trainer that the app uses (all a remote run must offer)."""

    def run(self) -> str: ...
    def pause(self) -> int: ...
    def stop(self) -> None: ...
    def save_now(self) -> None: ...


TrainerFactory = Callable[[RunStore, RunPlan, Callable[[Event], None], "int | None"], TrainerLike]


def engine_trainer(
    store: RunStore, plan: RunPlan, sink: Callable[[Event], None], until_step: int | None
) -> TrainerLike:
    """The real engine. Imports torch, so it is only ever called on the worker thread."""
    from tui_trainer.engine.trainer import Trainer

    return Trainer(store, plan, sink, until_step=until_step)


class TrainingSession:
    """The app's handle on one run: start it on a worker thread, pause / save / stop it from the UI."""

    class Progress(Message):
        """The newest logged step; a newer one supersedes it (the points themselves are buffered)."""

        def __init__(self, event: StepLogged) -> None:
            super().__init__()
            self.event = event

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TrainingSession.Progress)

    class Device(Message):
        """A device sample; only the newest matters."""

        def __init__(self, sample: DeviceSample) -> None:
            super().__init__()
            self.sample = sample

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TrainingSession.Device)

    class Data(Message):
        """Data-preparation progress before the first step; only the newest matters (coalesced)."""

        def __init__(self, event: DataProgress) -> None:
            super().__init__()
            self.event = event

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, TrainingSession.Data)

    class Engine(Message):
        """Any other engine event (state, checkpoint, eval, notice, failure): never dropped."""

        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    # the one interface the screen uses for either kind of run (this one, or RemoteSession's):
    # `keeps_training` (q leaves it training: detach), `ask_pause` (the step it pauses after, now or as a
    # RemotePromised message), `leave` (what quitting does), `end_note` (what became of it), `restart_wait`, `lost`
    keeps_training = False  # this process trains the run: quitting pauses it (it saves)
    lost = False  # only a run another process trains can vanish without a word

    def __init__(
        self,
        store: RunStore,
        plan: RunPlan | None,
        post: Callable[[Message], Any],
        until_step: int | None = None,
        factory: TrainerFactory | None = None,
        *,
        run_name: str | None = None,
    ) -> None:
        """`plan` None: a run trained elsewhere (tui/remote.py), named by `run_name`."""
        self.store = store
        self.plan = plan
        self._run_name = plan.run if plan is not None else str(run_name)
        self.until_step = until_step
        self._post = post
        self._factory = factory or engine_trainer
        self._lock = threading.Lock()
        self._trainer: TrainerLike | None = None
        self._cancelled = False
        self.points: deque[StepLogged | EvalLogged] = deque()
        self.last_step: StepLogged | None = None
        self._progress_pending = False
        self._publish: Callable[[Event], None] | None = None  # the control server, while it serves
        self.finished = threading.Event()  # set when the worker's run() returns, however it ends

    @property
    def run_name(self) -> str:
        return self._run_name

    @property
    def started(self) -> bool:
        """True once the engine exists (torch imported, trainer built)."""
        return self._trainer is not None

    # ---- worker thread

    def run(self) -> str:
        """Body of the thread worker: build the engine and run it to a final state word."""
        try:
            assert self.plan is not None, "an in-process session always has a plan"
            trainer = self._factory(self.store, self.plan, self.sink, self.until_step)
            with self._lock:
                if self._cancelled:
                    return State.STOPPED
                self._trainer = trainer
            server = self._serve(trainer)
            try:
                with trainer_gets_the_gil_back_quickly():
                    return trainer.run()
            finally:
                self._publish = None
                if server is not None:
                    server.close()  # clients see the final state, then EOF
        finally:
            self.finished.set()

    def _serve(self, trainer: TrainerLike) -> ControlServer | None:
        """Serve the run's control channel, as a headless run does: `tui-trainer pause|status RUN` and
        attached apps work on a run this app trains."""
        # what the channel says about itself (a socket dir passed over, a restart) shows as a notice
        server = ControlServer(self.store.run_dir(self.run_name), trainer, log=self._channel_notice)
        try:
            server.start()
        except OSError:
            return None  # training matters more than the channel
        self._publish = server.publish
        return server

    def _channel_notice(self, line: str) -> None:
        self.sink(Notice(self.run_name, line))

    def sink(self, event: Event) -> None:
        """Called by the trainer on the training thread; must be cheap and must not block."""
        publish = self._publish
        if publish is not None:
            publish(event)  # O(1), never raises
        if isinstance(event, StepLogged):
            self.points.append(event)  # deque.append is atomic: no lock on the hot path
            self.last_step = event
            # one Progress in flight at a time: a fast loop costs no syscall per step
            if not self._progress_pending:
                self._progress_pending = True
                self._post(self.Progress(event))
        elif isinstance(event, DeviceSample):
            self._post(self.Device(event))
        elif isinstance(event, DataProgress):
            self._post(self.Data(event))
        else:
            if isinstance(event, EvalLogged):
                self.points.append(event)
            self._post(self.Engine(event))

    # ---- UI thread

    def drain(self) -> list[StepLogged | EvalLogged]:
        """Take every buffered point (called from the UI thread); the next step posts a new Progress."""
        self._progress_pending = False
        out = []
        while True:
            try:
                out.append(self.points.popleft())
            except IndexError:
                return out

    def pause(self) -> int | None:
        """Ask the loop to save and halt after the current step; returns that step.

        Returns None when the engine is not built yet: then it will not start at all.
        """
        with self._lock:
            trainer = self._trainer
            if trainer is None:
                self._cancelled = True
                return None
        return trainer.pause()

    def ask_pause(self) -> tuple[int | None, bool]:
        """Ask the run to save and halt: (the step it pauses after, None before the first step; whether that
        step is still to come as a Promised message)."""
        return self.pause(), False

    def leave(self) -> None:
        """What quitting the app does to the run: this process trains it, so pause it (it saves)."""
        self.pause()

    def end_note(self, store: RunStore) -> str | None:
        """What became of a run that ended without us (None: the screen already said, from its events)."""
        return None

    def restart_wait(self, store: RunStore) -> str | None:
        """How the run's process ended when another process will go on with it ('lost' / 'failed'), so the
        app waits to attach again; None: nothing to wait for (this process trained it)."""
        return None

    def save_now(self) -> None:
        if self._trainer is not None:
            self._trainer.save_now()

    def stop(self) -> None:
        with self._lock:
            trainer = self._trainer
            if trainer is None:
                self._cancelled = True
                return
        trainer.stop()


# How long the training thread waits for the GIL while the UI thread holds it (CPython's default is 5 ms).
# The trainer holds the GIL only for the moments between torch ops (~2 % of a step here) and releases it for
# every op, so while the UI draws (the plot is tens of ms of pure Python) each of those moments waited up to
# the whole interval: the trainer ran at a fraction of its speed for as long as the UI was busy.
TRAINER_GIL_WAIT_S = 0.0002


@contextlib.contextmanager
def trainer_gets_the_gil_back_quickly() -> Iterator[None]:
    """Shorten the interpreter's switch interval while this process trains beside the UI (restored after)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, TRAINER_GIL_WAIT_S))
    try:
        yield
    finally:
        sys.setswitchinterval(before)
