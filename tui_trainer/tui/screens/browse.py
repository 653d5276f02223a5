"""The main screen's layout and its browsing side: the run tree, the detail pane, the plot's history, the
device panel. MainScreen (screens/main.py) builds on this; see ARCHITECTURE.md ("The app").

Never imports torch. Textual calls a handler in every class of the chain that defines it, so each
handler (on_mount included) is defined in exactly one layer: browse, training, main.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui_trainer.control.client import ControlClient
from tui_trainer.control.commands import live_runs
from tui_trainer.core import fmt
from tui_trainer.core.events import State
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore
from tui_trainer.tui.history import History, load_curves
from tui_trainer.tui.lifecycle import Lifecycle
from tui_trainer.tui.messages import Discovered, HistoryLoaded, deliver
from tui_trainer.tui.session import TrainerFactory, TrainingSession
from tui_trainer.tui.widgets.device_panel import DevicePanel, Probe
from tui_trainer.tui.widgets.key_bar import KeyBar, KeyItem
from tui_trainer.tui.widgets.loss_plot import LossPlot
from tui_trainer.tui.widgets.run_tree import TREE_HEADER, CheckpointDetails, NodeRef, RunTree, TreeHeader
from tui_trainer.tui.widgets.sample_panel import SamplePanel
from tui_trainer.tui.widgets.status_line import StatusLine

DEVICE_POLL_S = 2.0
TREE_REFRESH_S = 30.0
AGE_REFRESH_S = 1.0  # checkpoint ages in the tree and the detail pane, from one clock
DISCOVER_S = 3.0  # how often the tree looks for runs other processes train


@dataclass(frozen=True)
class Setup:
    """What the app was opened with; the screen's collaborators (fakes in tests, the real ones otherwise)."""

    store: RunStore
    plan: RunPlan | None
    until_step: int | None
    clock: Callable[[], float]
    probe: Probe
    trainer_factory: TrainerFactory | None
    generator: Callable[[Path], str]
    strict: bool = False  # an illegal lifecycle move raises (tests) instead of being logged
    remote: ControlClient | None = None  # attach to the run another process trains (`tui-trainer attach`)
    pending: tuple[str, int | None] | None = None  # (run, pid) started in the background: attach once live


class BrowseScreen(Screen[None]):
    """Layout, widget accessors and everything that only looks at the store."""

    FOOTER_KEYS: tuple[KeyItem, ...] = ()  # the keys the footer shows (MainScreen names them)

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.setup = setup
        self.store = setup.store
        self.clock = setup.clock
        self.history = History()
        self.session: TrainingSession | None = None
        self.leaving = threading.Event()  # set on exit: stop waiting for a background run's channel
        self.others_live: dict[str, dict[str, Any]] = {}  # run -> status, for runs other processes train
        self.lifecycle = Lifecycle(self._state_changed, strict=setup.strict)
        self.wanted_run: str | None = None  # the run the plot should show (its history may be loading)
        self._last_engine_sample = 0.0

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
        yield Static("", id="error", markup=False)  # errors quote paths like Gloo's "[/x/pair.cc:537]"
        yield StatusLine(id="status")
        yield KeyBar(self.FOOTER_KEYS, id="footer")

    # ---- widgets (this screen's own: a dialog pushed over it has its own DOM)

    @property
    def runs_tree(self) -> RunTree:
        return self.query_one(RunTree)

    @property
    def plot(self) -> LossPlot:
        return self.query_one(LossPlot)

    @property
    def status(self) -> StatusLine:
        return self.query_one(StatusLine)

    @property
    def device(self) -> DevicePanel:
        return self.query_one(DevicePanel)

    @property
    def sample(self) -> SamplePanel:
        return self.query_one(SamplePanel)

    @property
    def banner(self) -> Static:
        return self.query_one("#error", Static)

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def live(self) -> bool:
        return self.lifecycle.live

    @property
    def alive(self) -> bool:
        """False while the app shuts down: the widgets are gone, so timers and late messages do nothing."""
        return self.app.is_running

    def _state_changed(self, state: State) -> None:
        """Every lifecycle move lands here: the status line's state word and the keys that apply."""
        if self.alive:
            self.status.state = state
            self.refresh_bindings()

    def start_timers(self) -> None:
        self.query_one("#left").border_title = "Runs"
        plan = self.setup.plan
        self.refresh_tree(select=NodeRef(plan.run) if plan else None)
        self.runs_tree.focus()
        self._poll_device()
        self.set_interval(DEVICE_POLL_S, self._poll_device)
        self.set_interval(TREE_REFRESH_S, self.refresh_tree)
        self.set_interval(AGE_REFRESH_S, self._refresh_ages)
        self._discover()
        self.set_interval(DISCOVER_S, self._discover)

    # ---- the plot's history

    def show_run(self, run: str | None, force: bool = False) -> None:
        """Point the plot at `run`; its history loads on a worker thread the first time (seconds for long runs)."""
        self.wanted_run = run
        if run is None:
            self.plot.set_curves(None)
            return
        curves = self.history.get(run)
        if curves is not None:
            if force or self.plot.curves is not curves:
                self.plot.set_curves(curves)
            return
        self.plot.show_loading(run)
        self.load_history(run)

    def load_history(self, run: str) -> None:
        """Start loading the run's curve on a worker thread unless it is cached or already loading."""
        if self.history.needs_load(run):
            plan = self.session.plan if self.session and self.session.run_name == run else None
            load = partial(load_curves, self.store, run, self.plot.smoothing, plan)
            work = partial(deliver, self.post_message, HistoryLoaded, run, load)
            self.run_worker(work, group="history", thread=True, exit_on_error=False)

    def on_history_loaded(self, message: HistoryLoaded) -> None:
        if not self.alive:
            return
        run = message.subject
        if message.error is not None:
            self.history.failed(run)
            self.notify(f"could not load {run}'s history: {message.error}", severity="error", timeout=8)
            return
        curves = self.history.loaded(run, message.result)
        if curves.smoothing != self.plot.smoothing:
            curves.set_smoothing(self.plot.smoothing)
        if self.wanted_run == run:
            self.plot.set_curves(curves)
        self.history_landed(run)

    def history_landed(self, run: str) -> None:
        """A run's curve finished loading (MainScreen's compare overlay listens)."""

    # ---- the tree and the detail pane

    def refresh_tree(self, select: NodeRef | None = None) -> None:
        if not self.alive:
            return
        session = self.session
        live = {name: _state(status) for name, status in self.others_live.items()}
        if session and self.live:
            live[session.run_name] = self.state
        runs = self.store.runs()
        self.runs_tree.rebuild(runs, live=live, select=select)
        self._show_details()
        if self.state == State.IDLE:
            self.status.detail = (
                f"{fmt.plural(len(runs), 'run')} · ↑↓ pick a checkpoint · r resume · b branch · ? help"
                if runs
                else f"no runs yet in {fmt.folder(self.store.root)} · start one with: tui-trainer train"
            )
            if self.others_live:
                listed = ", ".join(f"{n} step {s.get('step')}" for n, s in self.others_live.items())
                self.status.detail = f"training elsewhere: {listed} · a attaches to the selected one"

    # ---- runs other processes train (their control sockets)

    def _discover(self) -> None:
        if self.alive:
            find = partial(deliver, self.post_message, Discovered, "", partial(live_runs, self.store, 1.0))
            self.run_worker(find, group="discover", thread=True, exclusive=True, exit_on_error=False)

    def on_discovered(self, message: Discovered) -> None:
        if message.error is not None or not self.alive:
            return
        found: dict[str, dict[str, Any]] = dict(message.result or {})
        if self.session is not None and self.live:
            found.pop(self.session.run_name, None)  # our own run (an app-owned run serves the channel too)
        if found != self.others_live:
            self.others_live = found
            self.refresh_tree()
            self.refresh_bindings()

    def _refresh_ages(self) -> None:
        if not self.alive:
            return
        self.runs_tree.refresh_ages()
        self._show_details()

    def on_run_tree_highlighted(self, message: RunTree.Highlighted) -> None:
        if not self.alive:
            return
        self.show_run(message.node.run if message.node else None)
        if message.node is not None:
            # samples.jsonl is small (a sample every few hundred steps): read here, like the tree's run.json;
            # a checkpoint row shows the sample logged by its step
            node = message.node
            self.sample.show_samples(node.run, self.store.samples(node.run), at_step=node.step)
        self._show_details()
        self.refresh_bindings()

    def _show_details(self) -> None:
        ref = self.runs_tree.selected
        run = self.runs_tree.runs.get(ref.run) if ref else None
        ckpt = None
        if run is not None and ref is not None and ref.step is not None:
            ckpt = next((c for c in run.checkpoints if c.step == ref.step), None)
        self.query_one(CheckpointDetails).show(run, ckpt, self.clock())

    # ---- the device panel

    def _poll_device(self) -> None:
        if not self.alive:
            return
        # while the engine reports (every ~2 s) its samples win; otherwise sample this process
        if time.monotonic() - self._last_engine_sample > 2.5 * DEVICE_POLL_S:
            self.device.show_sample(self.setup.probe())

    def on_training_session_device(self, message: TrainingSession.Device) -> None:
        if not self.alive:
            return
        self._last_engine_sample = time.monotonic()
        self.device.show_sample(message.sample)


def _state(status: dict[str, Any]) -> State:
    """A live run's state word from its status (Running when the word is unknown)."""
    try:
        return State(str(status.get("state")))
    except ValueError:
        return State.RUNNING
