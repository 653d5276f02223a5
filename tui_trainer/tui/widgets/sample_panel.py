"""The panel that shows a text sample generated from a checkpoint (`g`)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static


class SamplePanel(VerticalScroll):
    """Scrollable generated text; empty until the first `g`."""

    def compose(self) -> ComposeResult:
        yield Static(Text("press g to sample from the selected checkpoint", style="dim"), id="sample-text")

    def on_mount(self) -> None:
        self.border_title = "Sample"
        self.add_class("-empty")
        self.can_focus = False

    def show_busy(self, ref: str) -> None:
        self.remove_class("-empty")
        self.border_title = f"Sample · {ref}"
        self.query_one("#sample-text", Static).update(Text(f"generating from {ref}…", style="italic"))

    def show_text(self, ref: str, text: str) -> None:
        self.remove_class("-empty")
        self.border_title = f"Sample · {ref}"
        self.query_one("#sample-text", Static).update(Text(text))
        self.scroll_home(animate=False)

    def show_error(self, ref: str, message: str) -> None:
        self.remove_class("-empty")
        self.border_title = f"Sample · {ref}"
        self.query_one("#sample-text", Static).update(Text(f"could not generate: {message}", style="red"))

    @property
    def text(self) -> str:
        return str(self.query_one("#sample-text", Static).content)
