"""What only looks at the store: the run tree and its details pane, the plot's history (loaded off the UI
thread), runs other processes train (their sockets), the device panel's own samples, the compare overlay."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from tui_trainer.control.live import live_runs
from tui_trainer.core import fmt
from tui_trainer.core.events import DeviceSample, State
from tui_trainer.tui.controllers.host import Host
from tui_trainer.tui.history import History, load_curves
from tui_trainer.tui.messages import Discovered, HistoryLoaded, deliver
from tui_trainer.tui.series import Curves
from tui_trainer.tui.widgets.details import CheckpointDetails
from tui_trainer.tui.widgets.run_tree import NodeRef

DEVICE_POLL_S = 2.0
TREE_REFRESH_S = 30.0
AGE_REFRESH_S = 1.0  # checkpoint ages in the tree and the detail pane, from one clock
DISCOVER_S = 3.0  # how often the tree looks for runs other processes train


class Browser:
    """The tree, the details, the plot's history cache and the runs training elsewhere."""

    def __init__(self, screen: Host) -> None:
        self.screen = screen
        self.history = History()
        self.others_live: dict[str, dict[str, Any]] = {}  # run -> status, for runs other processes train
        self.wanted_run: str | None = None  # the run the plot should show (its history may be loading)
        self._last_engine_sample = 0.0

    def start_timers(self) -> None:
        screen = self.screen
        screen.query_one("#left").border_title = "Runs"
        plan = screen.setup.plan
        self.refresh_tree(select=NodeRef(plan.run) if plan else None)
        screen.runs_tree.focus()
        self.poll_device()
        screen.set_interval(DEVICE_POLL_S, self.poll_device)
        screen.set_interval(TREE_REFRESH_S, self.refresh_tree)
        screen.set_interval(AGE_REFRESH_S, self.refresh_ages)
        self.discover()
        screen.set_interval(DISCOVER_S, self.discover)

    # ---- the plot's history

    def show_run(self, run: str | None, force: bool = False) -> None:
        """Point the plot at `run`; its history loads on a worker thread the first time (seconds for long runs)."""
        self.wanted_run = run
        plot = self.screen.plot
        if run is None:
            plot.set_curves(None)
            return
        curves = self.history.get(run)
        if curves is not None:
            if force or plot.curves is not curves:
                plot.set_curves(curves)
            return
        plot.show_loading(run)
        self.load_history(run)

    def load_history(self, run: str) -> None:
        """Start loading the run's curve on a worker thread unless it is cached or already loading."""
        if self.history.needs_load(run):
            session = self.screen.session
            plan = session.plan if session and session.run_name == run else None
            load = partial(load_curves, self.screen.store, run, self.screen.plot.smoothing, plan)
            work = partial(deliver, self.screen.post_message, HistoryLoaded, run, load)
            self.screen.run_worker(work, group="history", thread=True, exit_on_error=False)

    def history_loaded(self, message: HistoryLoaded) -> None:
        run, plot = message.subject, self.screen.plot
        if message.error is not None:
            self.history.failed(run)
            self.screen.notify(f"could not load {run}'s history: {message.error}", severity="error", timeout=8)
            return
        curves = self.history.loaded(run, message.result)
        if curves.smoothing != plot.smoothing:
            curves.set_smoothing(plot.smoothing)
        if self.wanted_run == run:
            plot.set_curves(curves)
            self.screen.refresh_bindings()  # zoom, pan, follow apply once there is a curve
        if run in self.screen.runs_tree.compared():
            self.update_compare()

    def update_compare(self) -> None:
        """Hand the plot every compared run whose history has loaded; load the others (history_loaded calls
        back). The tree marks each compared run in its plot colour."""
        tree, plot = self.screen.runs_tree, self.screen.plot
        curves: list[Curves] = []
        for run in tree.compared():
            loaded = self.history.get(run)
            if loaded is None:
                self.load_history(run)
            else:
                curves.append(loaded)
        plot.set_compared(curves, tree.baseline)
        tree.set_compare_marks({run: legend for run, (_, legend) in plot.run_colors().items()})
        self.screen.refresh_bindings()

    # ---- the tree and the detail pane

    def refresh_tree(self, select: NodeRef | None = None) -> None:
        screen = self.screen
        if not screen.alive:
            return
        session = screen.session
        live = {name: _state(status) for name, status in self.others_live.items()}
        if session and screen.live:
            live[session.run_name] = screen.state
        runs = screen.store.runs()
        screen.runs_tree.rebuild(runs, live=live, select=select)
        self.show_details()
        if screen.state == State.IDLE:
            screen.status.detail = (
                f"{fmt.plural(len(runs), 'run')} · ↑↓ pick a checkpoint · r resume · b branch · ? help"
                if runs
                else f"no runs yet in {fmt.folder(screen.store.root)} · start one with: tui-trainer train"
            )
            if self.others_live:
                listed = ", ".join(f"{n} step {s.get('step')}" for n, s in self.others_live.items())
                screen.status.detail = f"training elsewhere: {listed} · a attaches to the selected one"

    def highlighted(self, node: NodeRef | None) -> None:
        screen = self.screen
        self.show_run(node.run if node else None)
        if node is not None:
            # samples.jsonl is small (a sample every few hundred steps): read here, like the tree's run.json;
            # a checkpoint row shows the sample logged by its step
            screen.sample.show_samples(node.run, screen.store.samples(node.run), at_step=node.step)
        self.show_details()
        screen.refresh_bindings()

    def refresh_ages(self) -> None:
        if self.screen.alive:
            self.screen.runs_tree.refresh_ages()
            self.show_details()

    def show_details(self) -> None:
        tree = self.screen.runs_tree
        ref = tree.selected
        run = tree.runs.get(ref.run) if ref else None
        ckpt = None
        if run is not None and ref is not None and ref.step is not None:
            ckpt = next((c for c in run.checkpoints if c.step == ref.step), None)
        self.screen.query_one(CheckpointDetails).show(run, ckpt, self.screen.clock())

    # ---- runs other processes train (their control sockets)

    def discover(self) -> None:
        screen = self.screen
        if screen.alive:
            find = partial(deliver, screen.post_message, Discovered, "", partial(live_runs, screen.store, 1.0))
            screen.run_worker(find, group="discover", thread=True, exclusive=True, exit_on_error=False)

    def discovered(self, message: Discovered) -> None:
        screen = self.screen
        if message.error is not None:
            return
        found: dict[str, dict[str, Any]] = dict(message.result or {})
        if screen.session is not None and screen.live:
            found.pop(screen.session.run_name, None)  # our own run (an app-owned run serves the channel too)
        if found != self.others_live:
            self.others_live = found
            self.refresh_tree()
            screen.refresh_bindings()

    # ---- the device panel

    def poll_device(self) -> None:
        if not self.screen.alive:
            return
        # while the engine reports (every ~2 s) its samples win; otherwise sample this process
        if time.monotonic() - self._last_engine_sample > 2.5 * DEVICE_POLL_S:
            self.screen.device.show_sample(self.screen.setup.probe())

    def engine_sample(self, sample: DeviceSample) -> None:
        self._last_engine_sample = time.monotonic()
        self.screen.device.show_sample(sample)


def _state(status: dict[str, Any]) -> State:
    """A live run's state word from its status (Running when the word is unknown)."""
    try:
        return State(str(status.get("state")))
    except ValueError:
        return State.RUNNING
