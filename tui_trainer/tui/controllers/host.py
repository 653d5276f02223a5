"""What a controller may use of the screen that owns it (MainScreen): its widgets, the live run and its
Lifecycle, the store, and Textual's worker / timer / notice calls. A controller's own state stays its own;
the controllers below it come as constructor arguments (browse <- live <- training <- tools), so no import
goes round in a circle."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from textual.app import App
from textual.widgets import Static

from tui_trainer.core.events import State
from tui_trainer.core.store import RunStore
from tui_trainer.tui.lifecycle import Lifecycle
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.setup import Setup
from tui_trainer.tui.widgets.device_panel import DevicePanel
from tui_trainer.tui.widgets.loss_plot import LossPlot
from tui_trainer.tui.widgets.run_tree import RunTree
from tui_trainer.tui.widgets.sample_panel import SamplePanel
from tui_trainer.tui.widgets.status_line import StatusLine


class Host(Protocol):
    """MainScreen as its controllers see it."""

    setup: Setup
    store: RunStore
    clock: Callable[[], float]
    session: TrainingSession | None  # the live run (or the last one), either kind
    lifecycle: Lifecycle
    leaving: threading.Event  # set on exit: stop waiting for a background run's channel

    @property
    def app(self) -> App[Any]: ...
    @property
    def runs_tree(self) -> RunTree: ...
    @property
    def plot(self) -> LossPlot: ...
    @property
    def status(self) -> StatusLine: ...
    @property
    def device(self) -> DevicePanel: ...
    @property
    def sample(self) -> SamplePanel: ...
    @property
    def banner(self) -> Static: ...
    @property
    def state(self) -> State: ...
    @property
    def live(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    def why_not(self, action: str) -> str | None: ...
    def refresh_bindings(self) -> None: ...

    # Textual's own (Screen): typed loosely here, checked where MainScreen defines them
    @property
    def notify(self) -> Callable[..., None]: ...
    @property
    def post_message(self) -> Callable[..., bool]: ...
    @property
    def run_worker(self) -> Callable[..., Any]: ...
    @property
    def set_interval(self) -> Callable[..., Any]: ...
    @property
    def set_timer(self) -> Callable[..., Any]: ...
    @property
    def query_one(self) -> Callable[..., Any]: ...
