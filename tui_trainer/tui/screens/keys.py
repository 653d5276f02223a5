"""The main screen's keys: its bindings, the footer's entries and which actions are the screen's own (hidden
while a dialog is open over it). What each key does is MainScreen's `action_*`; whether it may apply now,
and why not, is Lifecycle.refusal (tui/lifecycle.py) then MainScreen.why_not."""

from __future__ import annotations

from textual.binding import Binding, BindingType

from tui_trainer.tui.widgets.key_bar import KeyItem

ZOOM_STEP = 0.5  # each + halves the visible steps

# the tools' keys first, then the run's (the order the help screen lists them in)
BINDINGS: list[BindingType] = [
    # space (mark a run for comparison) is the run tree's binding
    Binding("B", "compare_baseline", "Baseline", show=False),
    Binding("c", "compare_clear", "Clear marks", show=False),
    Binding("plus,equals_sign", f"zoom({ZOOM_STEP})", "Zoom+", show=False),
    Binding("minus", f"zoom({1 / ZOOM_STEP})", "Zoom-", show=False),
    Binding("comma", "pan(-1)", "Pan left", show=False),
    Binding("full_stop", "pan(1)", "Pan right", show=False),
    Binding("0", "zoom_reset", "Whole run", show=False),
    Binding("f", "follow", "Follow", show=False),
    Binding("e", "export", "Export", show=False),  # the footer is full at 80 columns: ? lists it
    Binding("left_curly_bracket", "sample_page(-1)", "Older sample", show=False),
    Binding("right_curly_bracket", "sample_page(1)", "Newer sample", show=False),
    # shown instead of the app's q (Quit) while attached to a run another process trains
    Binding("q", "detach", "Detach"),
    Binding("p", "pause", "Pause"),
    Binding("r", "resume", "Resume"),
    Binding("b", "branch", "Branch"),
    Binding("s", "save", "Save"),
    Binding("x", "pin", "Pin"),
    Binding("g", "generate", "Sample"),
    Binding("v", "cycle_view", "View"),
    Binding("l", "log_scale", "Log"),
    Binding("a", "attach", "Attach"),
    Binding("left_square_bracket", "smoothing(-1)", "Smooth-", show=False),
    Binding("right_square_bracket", "smoothing(1)", "Smooth+", show=False),
]

# the footer, in this order; when the width runs out the highest rank goes first ("?" lists every key)
FOOTER_KEYS = (
    KeyItem(("pause",), "Pause", 1),
    KeyItem(("resume",), "Resume", 2),
    KeyItem(("branch",), "Branch", 3),
    KeyItem(("save",), "Save", 8),
    KeyItem(("export",), "Export", 5),
    KeyItem(("sample_page",), "Samples", 6),
    KeyItem(("zoom",), "Zoom", 7),
    KeyItem(("cycle_view",), "View", 9),
    KeyItem(("generate",), "Generate", 10),
    KeyItem(("log_scale",), "Log", 11),
    KeyItem(("pin",), "Pin", 12),
    KeyItem(("attach",), "Attach", 4),
    KeyItem(("help",), "More keys", 0),
    KeyItem(("quit", "detach"), "", 0),  # Quit, or Detach while attached
)

# this screen's actions: hidden while a dialog is open over it
MAIN_ACTIONS = {
    *("pause", "resume", "branch", "save", "pin", "generate", "log_scale", "cycle_view", "smoothing", "attach"),
    *("compare_mark", "compare_baseline", "compare_clear", "zoom", "pan", "zoom_reset", "follow", "export"),
    "sample_page",
}
