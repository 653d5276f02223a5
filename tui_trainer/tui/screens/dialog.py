"""What the form dialogs (branch, export) share: labelled fields, the button row, the titled border and the
message line. A dialog's widgets are named after it (`#export-dialog`, `#export-error`, ...) for app.tcss."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Static

ResultT = TypeVar("ResultT")


class FormReady(Message):
    """Posted to the app once a form has focused its first field: the keys typed meanwhile may follow."""


class FormScreen(ModalScreen[ResultT]):
    """A dialog of fields. Typed-ahead keys reach the field that will have focus: the app holds keys from
    the push until FormReady (TypeAhead), and Tab / shift+Tab move focus before the next key is handled
    (as priority bindings; Textual's own move it a message later, so `Tab 5` typed fast put 5 in the field
    Tab left)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("tab", "app.focus_next", "Next field", show=False, priority=True),
        Binding("shift+tab", "app.focus_previous", "Previous field", show=False, priority=True),
    ]

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_unmount(self) -> None:
        self.app.post_message(FormReady())  # never leave keys held behind a dialog that is gone


class TypeAhead:
    """The keys the app holds while a form opens (see FormScreen), to replay in order once it is ready."""

    def __init__(self) -> None:
        self._held: list[events.Key] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def take(self, event: events.Key) -> bool:
        """Keep `event` for later if keys are held now; False: handle it now."""
        if self._held is None:
            return False
        self._held.append(event)
        return True

    def release(self) -> list[events.Key]:
        held, self._held = self._held or [], None
        return held


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
    """Title the dialog's border, name its keys in the bottom border and focus its first field; then the
    keys typed while it opened follow (FormReady comes after the focus: both go through the app's queue)."""
    dialog = screen.query_one(f"#{name}-dialog")
    dialog.border_title = title
    dialog.border_subtitle = keys
    screen.query_one(f"#{first}", Input).focus()  # focus shows as a coloured field (app.tcss)
    screen.app.post_message(FormReady())


def show_message(screen: Screen[Any], name: str, message: str, busy: bool = False) -> None:
    """Say what is wrong (or, `busy`, what is being checked) in the dialog's message line."""
    line = screen.query_one(f"#{name}-error", Static)
    line.update(message)
    line.add_class("-shown")
    line.set_class(busy, "-busy")
