"""The export dialog (`e`): where to write the selected checkpoint as a Hugging Face model dir, and in which
dtype. The export itself runs on a worker thread (`run_export`); see `tui-trainer export` in the README."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import Button, Input, Label, Select, Static

from tui_trainer.core.store import CheckpointInfo, RunStore
from tui_trainer.tui.screens import dialog

DTYPE_CHOICES = ("fp32", "bf16", "fp16")  # engine/export.py DTYPES, without importing torch here


def default_dir(ckpt: CheckpointInfo) -> str:
    return f"./exports/{ckpt.run}-{ckpt.step}"


def run_export(store: RunStore, ref: str, dest: str, dtype: str) -> str:
    """Export on a worker thread (imports torch): one line saying where it went and how big it is."""
    from tui_trainer.core import fmt
    from tui_trainer.engine.export import export_checkpoint

    done = export_checkpoint(store, ref, dest, dtype)
    return f"exported {done.ref} ({done.dtype}, {fmt.size(done.bytes)}) to {done.path}"


class ExportScreen(dialog.FormScreen[tuple[str, str] | None]):
    """Returns (dir, dtype), or None when cancelled."""

    def __init__(self, ckpt: CheckpointInfo) -> None:
        super().__init__()
        self.ckpt = ckpt

    def compose(self) -> ComposeResult:
        with Vertical(id="export-dialog"):
            yield Static(f"Export [b]{self.ckpt.ref}[/b] as a Hugging Face model dir", id="export-title")
            with Grid(id="export-fields"):
                yield from dialog.field("directory", default_dir(self.ckpt), "dir")
                yield Label("dtype")
                yield Select([(d, d) for d in DTYPE_CHOICES], value="fp32", allow_blank=False, id="dtype")
            yield Static("", id="export-error")
            yield from dialog.buttons("export", "Export", "export")

    def on_mount(self) -> None:
        dialog.dress(self, "export", "Export", "enter export · esc cancel", first="dir")

    @on(Input.Submitted)
    @on(Button.Pressed, "#export")
    def _submit(self) -> None:
        target = self.query_one("#dir", Input).value.strip()
        if not target:
            dialog.show_message(self, "export", "enter a directory to export into")
            return
        self.dismiss((str(Path(target).expanduser()), str(self.query_one("#dtype", Select).value)))

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)
