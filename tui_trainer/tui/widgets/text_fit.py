"""Labels that fit: whole, or cut with an ellipsis after their last whole word. A label cut inside a word
(`none sa`, an age `13` for 13s) reads as something else; one cut at a word says it was cut."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.cells import cell_len
from rich.text import Text

ELLIPSIS = "…"
BORDER_LABEL_MARGIN = 6  # a border title has "╭─ " before it and " ─╮" after it
SEPARATORS = " ·:,;|"  # dropped from the end of a cut label: "demo running ·…" reads as "demo running…"
JOINTS = "-_@/."  # inside one long word, where it may be cut: "demo-lr3e-4-from300-…"


def fit(text: Text | str, width: int) -> Text:
    """`text` whole when it fits in `width` cells; else cut after the last whole word that leaves room for
    the ellipsis. Only a first word wider than `width` is cut inside it: after a joint (- _ @ / .) where
    one fits, else anywhere."""
    text = Text(text) if isinstance(text, str) else text
    if text.cell_len <= width:
        return text
    if width <= 0:
        return Text()
    plain, room = text.plain, width - 1
    cut = 0
    for i, char in enumerate(plain):
        if char != " ":
            continue
        end = len(plain[:i].rstrip(SEPARATORS))
        if cell_len(plain[:end]) > room:
            break
        if end > 0 and not plain[:end].isspace():
            cut = end
    if cut == 0:  # one word wider than the room: up to its last joint that fits (a run name's "-")
        for i, char in enumerate(plain):
            if cell_len(plain[: i + 1]) > room:
                break
            if char in JOINTS and i > 0:
                cut = i + 1
    if cut == 0:  # no joint either: as much of it as fits
        while cut < len(plain) and cell_len(plain[: cut + 1]) <= room:
            cut += 1
    out = text[:cut]
    out.append(ELLIPSIS)
    return out


def first_that_fits(candidates: Iterable[str], width: int) -> str:
    """The first (fullest) candidate that fits in `width` cells; else the last one cut by `fit`."""
    last = ""
    for candidate in candidates:
        if cell_len(candidate) <= width:
            return candidate
        last = candidate
    return fit(last, width).plain


def wrap_at_joints(text: str, width: int) -> str:
    """`text` with line breaks where it is wider than `width`: at spaces, else after a joint of a long name
    ("demo-from40-with-a-long-" / "name@60"), and only inside a piece with no joint at all. Rich would
    break a long name anywhere ("…-name@6" / "0")."""
    if width <= 0 or cell_len(text) <= width:
        return text
    lines: list[str] = []
    line = ""
    for piece in re.findall(rf"[^ {re.escape(JOINTS)}]*[{re.escape(JOINTS)}]| +|[^ {re.escape(JOINTS)}]+", text):
        if cell_len(line + piece) <= width:
            line += piece
            continue
        if line.strip():
            lines.append(line.rstrip())
        line = piece.lstrip()
        while cell_len(line) > width:  # one piece wider than a line: no joint to break at
            lines.append(line[:width])
            line = line[width:]
    if line.strip():
        lines.append(line.rstrip())
    return "\n".join(lines)
