"""The main screen: composes the widgets, wires their messages to the controller each is for, and says
which keys apply now. It holds no widget's data (the tree owns selection and compare marks, the plot its
view, window and series) and no behaviour of its own beyond the wiring: the controllers in tui/controllers/
do the work. See ARCHITECTURE.md ("The app")."""

from __future__ import annotations

import threading
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Static
from textual.worker import Worker

from tui_trainer.core.events import State
from tui_trainer.tui.controllers.browse import Browser
from tui_trainer.tui.controllers.live import LiveView
from tui_trainer.tui.controllers.tools import CHECKPOINT_KEYS, Tools
from tui_trainer.tui.controllers.training import Training
from tui_trainer.tui.lifecycle import Lifecycle
from tui_trainer.tui.messages import Connected, Discovered, Exported, Generated, HistoryLoaded, Planned
from tui_trainer.tui.remote import RemoteSession
from tui_trainer.tui.screens import keys
from tui_trainer.tui.session import TrainingSession
from tui_trainer.tui.setup import Setup
from tui_trainer.tui.widgets.details import CheckpointDetails
from tui_trainer.tui.widgets.device_panel import DevicePanel
from tui_trainer.tui.widgets.key_bar import KeyBar
from tui_trainer.tui.widgets.loss_plot import LossPlot
from tui_trainer.tui.widgets.run_tree import TREE_HEADER, RunTree, TreeHeader
from tui_trainer.tui.widgets.sample_panel import SamplePanel
from tui_trainer.tui.widgets.status_line import StatusLine


class MainScreen(Screen[None]):
    """Browse runs and checkpoints; train, pause, resume and branch from the keyboard."""

    BINDINGS: ClassVar[list[BindingType]] = keys.BINDINGS

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.setup = setup
        self.store = setup.store
        self.clock = setup.clock
        self.session: TrainingSession | None = None  # the live run (or the last one), either kind
        self.leaving = threading.Event()  # set on exit: stop waiting for a background run's channel
        self.lifecycle = Lifecycle(self._state_changed, strict=setup.strict)
        # each controller gets the screen (as controllers/host.py's Host) and the ones below it
        self.browse = Browser(self)
        self.live_view = LiveView(self, self.browse, open_branch=lambda dialog: self.tools.open_branch_dialog(dialog))
        self.training = Training(self, self.browse, self.live_view)
        self.tools = Tools(self, self.browse, self.training)

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
        yield KeyBar(keys.FOOTER_KEYS, id="footer")

    def begin(self) -> None:
        """Fill the widgets and start the timers. Called from the app's on_mount: the screen's own Mount can
        come before its composed children are mounted."""
        self.browse.start_timers()
        if self.setup.plan is not None:
            self.status.run = self.setup.plan.run
            self.lifecycle.move(State.STARTING)

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

    # ---- which keys apply

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in keys.MAIN_ACTIONS and self.app.screen is not self:
            return False
        if action == "detach":  # False hides it and lets q reach the app's Quit
            return self.training.attached and self.app.screen is self
        if action == "attach" and not self.browse.others_live:
            return False  # hidden unless another process trains a run here
        # None greys the key out in the footer; pressing it anyway says why (TrainerApp.run_action)
        return None if self.why_not(action) else True

    def why_not(self, action: str) -> str | None:
        """Why `action` cannot apply right now, in a few words; None when it can. The run's state and the
        work under way first (the Lifecycle's table), then what is selected and what the plot shows."""
        refused = self.lifecycle.refusal(action, started=self.session is not None and self.session.started)
        if refused is not None or action in ("pause", "save"):
            return refused
        if action in CHECKPOINT_KEYS:
            return self.tools.why_not(action)
        tree, plot = self.runs_tree, self.plot
        selected = tree.selected
        if action == "attach" and (selected is None or selected.run not in self.browse.others_live):
            return "select a run marked running (another process trains it)"
        if action == "smoothing" and plot.view != "loss":
            return "[ and ] smooth the loss view: press v to get back to it"
        if action in ("compare_mark", "compare_baseline") and selected is None:
            return "select a run to compare"
        if action == "compare_clear" and not tree.marked:
            return "no runs marked: space marks the highlighted run"
        if action in ("zoom", "pan", "zoom_reset", "follow") and plot.extent() is None:
            return "nothing plotted yet"
        if action == "pan" and plot.window is None and plot.follow is None:
            return "the whole run is in view: + zooms in first"
        if action == "sample_page" and not self.sample.samples:
            run = selected.run if selected is not None else "this run"
            return f"no samples logged for {run} (train.sample_every writes runs/<run>/samples.jsonl)"
        return None

    def refusal(self, action: str) -> str | None:
        """What to say when a key of this screen was pressed but cannot apply (None: not ours to explain)."""
        name = action.partition("(")[0]
        if name not in keys.MAIN_ACTIONS or self.app.screen is not self:
            return None
        return self.why_not(name)

    # ---- the keys: each hands its work to the widget or the controller it is for

    def action_pause(self) -> None:
        self.training.pause()

    def action_save(self) -> None:
        self.training.save()

    def action_detach(self) -> None:
        self.training.detach()

    def action_attach(self) -> None:
        selected = self.runs_tree.selected
        if selected is not None and self.why_not("attach") is None:
            self.browse.others_live.pop(selected.run, None)  # attached, or gone: the tree stops marking it
            self.training.connect(selected.run)

    def action_resume(self) -> None:
        self.tools.resume()

    def action_branch(self) -> None:
        self.tools.branch()

    def action_pin(self) -> None:
        self.tools.pin()

    def action_generate(self) -> None:
        self.tools.generate()

    def action_export(self) -> None:
        self.tools.export()

    def action_compare_mark(self) -> None:
        if self.runs_tree.selected is not None:
            self.runs_tree.toggle_mark(self.runs_tree.selected.run)

    def action_compare_baseline(self) -> None:
        if self.runs_tree.selected is not None:
            self.runs_tree.toggle_baseline(self.runs_tree.selected.run)

    def action_compare_clear(self) -> None:
        self.runs_tree.clear_marks()

    def action_cycle_view(self) -> None:
        self.plot.cycle_view()

    def action_log_scale(self) -> None:
        self.plot.log_scale = not self.plot.log_scale

    def action_smoothing(self, direction: int) -> None:
        self.plot.step_smoothing(direction)

    def action_zoom(self, factor: float) -> None:
        selected, ckpt = self.runs_tree.selected, self.runs_tree.selected_checkpoint()
        on_checkpoint = selected is not None and selected.step is not None
        # around the highlighted checkpoint when there is one in view, else around the newest steps
        self.plot.zoom(factor, float(ckpt.step) if ckpt is not None and on_checkpoint else None)

    def action_pan(self, direction: int) -> None:
        self.plot.pan(direction)

    def action_zoom_reset(self) -> None:
        self.plot.reset_window()

    def action_follow(self) -> None:
        self.plot.toggle_follow()
        follow = self.plot.follow
        self.notify(f"following the newest {follow:,} steps" if follow else "stopped following", timeout=2)

    def action_sample_page(self, direction: int) -> None:
        if not self.sample.page(direction):
            self.notify("that is the newest sample" if direction > 0 else "that is the oldest sample", timeout=2)

    # ---- messages: each to the controller it is for (none once the app shuts down: the widgets are gone)

    def on_run_tree_highlighted(self, message: RunTree.Highlighted) -> None:
        if self.alive:
            self.browse.highlighted(message.node)

    def on_run_tree_compare_changed(self, message: RunTree.CompareChanged) -> None:
        if self.alive:
            self.browse.update_compare()

    def on_history_loaded(self, message: HistoryLoaded) -> None:
        if self.alive:
            self.browse.history_loaded(message)

    def on_discovered(self, message: Discovered) -> None:
        if self.alive:
            self.browse.discovered(message)

    def on_training_session_device(self, message: TrainingSession.Device) -> None:
        if self.alive:
            self.browse.engine_sample(message.sample)

    def on_training_session_progress(self, message: TrainingSession.Progress) -> None:
        self.live_view.progress()

    def on_training_session_data(self, message: TrainingSession.Data) -> None:
        if self.alive:
            self.live_view.data(message.event)

    def on_training_session_engine(self, message: TrainingSession.Engine) -> None:
        if self.alive:
            self.live_view.engine(message.event)

    def on_remote_session_promised(self, message: RemoteSession.Promised) -> None:
        if self.alive:
            self.training.promised(message)

    def on_connected(self, message: Connected) -> None:
        if self.alive:
            self.training.connected(message)

    @on(Worker.StateChanged)
    def _train_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group == "train" and self.alive:
            self.training.worker_changed(event.worker, event.state)

    def on_planned(self, message: Planned) -> None:
        if self.alive:
            self.tools.planned(message)

    def on_generated(self, message: Generated) -> None:
        if self.alive:
            self.tools.generated(message)

    def on_exported(self, message: Exported) -> None:
        if self.alive:
            self.tools.exported(message)
