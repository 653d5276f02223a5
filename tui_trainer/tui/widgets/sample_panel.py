"""The panel that shows text sampled from a model: the training run's own samples (runs/<run>/samples.jsonl,
newest first, paged with { and }) or one generated from a checkpoint with `g`."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from tui_trainer.tui.widgets.text_fit import BORDER_LABEL_MARGIN, first_that_fits

HINT = "press g to sample from the selected checkpoint"


class SamplePanel(VerticalScroll):
    """Scrollable sample text; empty until the first `g` or a run with samples.jsonl is selected."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run: str | None = None  # whose logged samples are loaded (paged with { and }), None: none
        self.samples: list[dict[str, Any]] = []
        self.index = -1  # the logged sample on screen (or to come back to after a `g` sample)
        self.generated: str | None = None  # the checkpoint a `g` sample on screen came from
        self._titles: tuple[str, ...] = ("Sample",)

    def compose(self) -> ComposeResult:
        yield Static(Text(HINT, style="dim"), id="sample-text")

    def on_mount(self) -> None:
        self.border_title = "Sample"
        self.add_class("-empty")
        self.can_focus = False

    # ---- samples logged while training

    def show_samples(self, run: str, samples: list[dict[str, Any]], at_step: int | None = None) -> None:
        """The highlighted run's logged samples: the newest, or with `at_step` (a checkpoint row) the newest
        one logged by then. A run without any leaves a `g` sample be."""
        if not samples:
            if self.run is not None and self.run != run:
                self.run, self.samples, self.index = None, [], -1
                if self.generated is None:
                    self._set(("Sample",), Text(HINT, style="dim"))
                    self.add_class("-empty")
            return
        self.run, self.samples, self.generated = run, list(samples), None
        self.index = len(samples) - 1
        if at_step is not None:
            by_then = [i for i, sample in enumerate(samples) if _step(sample) <= at_step]
            self.index = by_then[-1] if by_then else 0
        self._show_current()

    def add_live(self, run: str, sample: dict[str, Any]) -> None:
        """A sample the live run just logged: appended; shown if the newest was on screen."""
        if self.run != run:
            if self.run is None and self.generated is None:
                self.show_samples(run, [sample])  # the live run's first sample takes an idle panel
            return
        following = self.index == len(self.samples) - 1 and self.generated is None
        self.samples.append(sample)
        if following:  # reading the newest: follow along
            self.index += 1
        if self.generated is None:
            self._show_current()  # (else the count in the title grows)

    def page(self, delta: int) -> bool:
        """Older (-1) or newer (+1) logged sample; False at either end or without samples. After a `g`
        sample, the first press goes back to the logged ones."""
        if not self.samples:
            return False
        if self.generated is not None:
            self.generated = None
        else:
            index = self.index + delta
            if not 0 <= index < len(self.samples):
                return False
            self.index = index
        self._show_current()
        return True

    def _show_current(self) -> None:
        sample = self.samples[self.index]
        body = Text()
        prompt = str(sample.get("prompt") or "")
        if prompt:
            body.append(prompt, style="bold")
        body.append(str(sample.get("text", "")))
        ref, position = f"{self.run}@{sample.get('step', '?')}", f"{self.index + 1}/{len(self.samples)}"
        self._set((f"Sample · {ref} · {position}", f"{ref} · {position}", ref), body)
        self.remove_class("-empty")

    # ---- a sample generated from a checkpoint (`g`)

    def show_busy(self, ref: str) -> None:
        self.generated = ref
        self.remove_class("-empty")
        self._set((f"Sample · {ref}", ref), Text(f"generating from {ref}…", style="italic"))

    def show_text(self, ref: str, text: str) -> None:
        self.generated = ref
        self.remove_class("-empty")
        self._set((f"Sample · {ref}", ref), Text(text))

    def show_error(self, ref: str, message: str) -> None:
        self.generated = ref
        self.remove_class("-empty")
        self._set((f"Sample · {ref}", ref), Text(f"could not generate: {message}", style="red"))

    def _set(self, titles: tuple[str, ...], body: Text) -> None:
        """`titles`: the fullest first; the border shows the first that fits whole."""
        self._titles = titles
        self._fit_title()
        self.query_one("#sample-text", Static).update(body)
        self.scroll_home(animate=False)

    def on_resize(self) -> None:
        self._fit_title()

    def _fit_title(self) -> None:
        # the border keeps a corner, a rule and a space on each side of its title
        self.border_title = first_that_fits(self._titles, self.outer_size.width - BORDER_LABEL_MARGIN)

    @property
    def text(self) -> str:
        return str(self.query_one("#sample-text", Static).content)


def _step(sample: dict[str, Any]) -> int:
    step = sample.get("step")
    return step if isinstance(step, int) else 0
