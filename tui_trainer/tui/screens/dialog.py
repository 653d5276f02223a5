"""What the form dialogs (branch, export) share: labelled fields, the button row, the titled border and the
message line. A dialog's widgets are named after it (`#export-dialog`, `#export-error`, ...) for app.tcss."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Button, Input, Label, Static


def field(label: str, value: str, id: str) -> ComposeResult:
    """One row of the form's grid: the label, then the input."""
    yield Label(label)
    yield Input(value=value, id=id)


def buttons(name: str, action: str, action_id: str) -> ComposeResult:
    """The button row: the dialog's action (enter presses it too), then Cancel."""
    with Horizontal(id=f"{name}-buttons"):
        yield Button(action, variant="primary", id=action_id)
        yield Button("Cancel", id="cancel")


def dress(screen: Screen[Any], name: str, title: str, keys: str, first: str) -> None:
    """Title the dialog's border, name its keys in the bottom border and focus its first field."""
    dialog = screen.query_one(f"#{name}-dialog")
    dialog.border_title = title
    dialog.border_subtitle = keys
    screen.query_one(f"#{first}", Input).focus()  # focus shows as a coloured field (app.tcss)


def show_message(screen: Screen[Any], name: str, message: str, busy: bool = False) -> None:
    """Say what is wrong (or, `busy`, what is being checked) in the dialog's message line."""
    line = screen.query_one(f"#{name}-error", Static)
    line.update(message)
    line.add_class("-shown")
    line.set_class(busy, "-busy")
