"""The help screen: every key, what it does and when it is available."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui_trainer.core.fmt import MARK_MEANINGS

KEYS = (
    ("↑ ↓ ← →", "move in the run tree; the plot follows the highlighted run"),
    ("enter", "expand / collapse a run or branch point"),
    ("p", "pause: finish the current step, save a full checkpoint, halt"),
    ("r", "resume the highlighted checkpoint (an older one as a new branch)"),
    ("b", "branch from the highlighted checkpoint, editing settings"),
    ("s", "save a checkpoint now (training continues)"),
    ("x", "pin / unpin the highlighted checkpoint (kept by retention)"),
    ("g", "generate a text sample from the highlighted checkpoint"),
    ("e", "export the highlighted checkpoint as a Hugging Face model dir"),
    ("{ }", "older / newer sample logged by the run (samples.jsonl)"),
    ("v", "plot view: loss → (eval) → learning rate → tokens/s → (grad norm)"),
    ("l", "toggle log scale"),
    ("[ ]", "less / more smoothing of the train loss (EMA)"),
    ("space", "mark / unmark the highlighted run for comparison on the plot"),
    ("B", "pin / unpin the highlighted run as the comparison baseline"),
    ("c", "clear the comparison marks (the baseline stays)"),
    ("+ -", "zoom the step axis in / out (around the highlighted checkpoint or the newest steps)"),
    (", .", "pan the zoomed step window left / right"),
    ("0 f", "whole run / follow the newest steps while training (the mouse wheel zooms too)"),
    ("a", "attach to the highlighted run that another process trains"),
    ("?", "this help"),
    ("q ctrl+c", "quit, saving a live run first; ctrl+c twice quits at once"),
    ("q (attached)", "detach: close the app, the other process goes on training"),
)


class HelpScreen(ModalScreen[None]):
    """Closes on escape, ? or q."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold yellow", no_wrap=True)
        keys.add_column()
        for key, what in KEYS:
            keys.add_row(key, what)
        keys.add_row("", "")
        for mark, what in MARK_MEANINGS:
            keys.add_row(mark, what)
        keys.add_row("", "")
        keys.add_row("", "[dim]Keys that cannot apply now are greyed out in the footer; pressing one says why.[/dim]")
        with VerticalScroll(id="help-dialog"):
            yield Static(keys)

    def on_mount(self) -> None:
        self.query_one("#help-dialog").border_title = "Keys"
        self.query_one("#help-dialog").border_subtitle = "esc to close"

    def action_close(self) -> None:
        self.dismiss(None)
