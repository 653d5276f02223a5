"""The footer: the most used keys that fit the terminal's width, then "? more keys" and q. Textual's Footer
shows every shown binding in binding order and cuts what does not fit (at 80 columns: ? and q); this one
drops the least used first and never the way to the rest."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

SEPARATORS = ("  ", " ")  # two spaces between entries where they fit, else one


@dataclass(frozen=True)
class KeyItem:
    """One footer entry: the actions whose keys it shows (their bindings' keys, joined), its words (empty:
    the binding's description) and its rank: when the width runs out, the highest rank goes first (0: never)."""

    actions: tuple[str, ...]
    label: str
    rank: int


class KeyBar(Static):
    """Draws `items` in order from the screen's active bindings: a key whose action cannot apply now is
    dim, one hidden by check_action (False) is left out, as in Textual's Footer."""

    COMPONENT_CLASSES = {"key-bar--key"}  # noqa: RUF012 - Textual's declaration style

    def __init__(self, items: tuple[KeyItem, ...], **kwargs: object) -> None:
        super().__init__("", **kwargs)  # type: ignore[arg-type]
        self.items = items

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, lambda _screen: self._redraw())
        self._redraw()

    def on_resize(self) -> None:
        self._redraw()

    def entries(self) -> tuple[list[tuple[str, str, bool]], str]:
        """(keys, label, enabled) for each item that has an active binding now and fits, in display order;
        and the separator to draw between them."""
        active = list(self.screen.active_bindings.values())
        out: list[tuple[str, str, bool, int]] = []
        for item in self.items:
            # Textual's own keys (ctrl+q quits too) are not the ones to teach
            found = [a for a in active if not a.binding.system and _action_name(a.binding.action) in item.actions]
            if not found:
                continue
            # one key per action, the shortest: zoom(0.5) shows "+" (not "+ ="), quit "q" (not "^q")
            by_action: dict[str, list[str]] = {}
            for a in found:
                by_action.setdefault(a.binding.action, []).append(self.app.get_key_display(a.binding))
            keys = " ".join(min(shown, key=len) for shown in by_action.values())
            label = item.label or found[0].binding.description
            out.append((keys, label, any(a.enabled for a in found), item.rank))
        width = self.size.width or 1000
        while len(out) > 1 and _width(out, SEPARATORS[-1]) > width:
            drop = max((e for e in out if e[3] > 0), key=lambda e: e[3], default=None)
            if drop is None:
                break
            out.remove(drop)
        separator = next((sep for sep in SEPARATORS if _width(out, sep) <= width), SEPARATORS[-1])
        return [(keys, label, enabled) for keys, label, enabled, _ in out], separator

    def text(self) -> Text:
        key_style = self.get_component_rich_style("key-bar--key", partial=True)
        out = Text(no_wrap=True, overflow="crop")
        entries, separator = self.entries()
        for i, (keys, label, enabled) in enumerate(entries):
            out.append(separator if i else "")
            out.append(keys, style=key_style if enabled else "dim")
            out.append(f" {label}", style="" if enabled else "dim")
        return out

    def _redraw(self) -> None:
        if self.is_mounted:
            self.update(self.text())


def _action_name(action: str) -> str:
    """ "screen.zoom(0.5)" -> "zoom"."""
    return action.partition("(")[0].rpartition(".")[2]


def _width(entries: list[tuple[str, str, bool, int]], separator: str) -> int:
    return sum(len(keys) + 1 + len(label) for keys, label, _, _ in entries) + len(separator) * (len(entries) - 1)
