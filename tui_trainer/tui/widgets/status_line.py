"""The one-line status: a state word with run, step, loss, tokens/s and ETA."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from tui_trainer.core import fmt
from tui_trainer.core.events import EvalLogged, State, StepLogged
from tui_trainer.tui.widgets.text_fit import fit

STATE_STYLES = {
    State.IDLE: "bold",
    State.STARTING: "bold yellow",
    State.RUNNING: "bold green",
    State.PAUSING: "bold black on yellow",
    State.PAUSED: "bold cyan",
    State.FINISHED: "bold blue",
    State.FAILED: "bold white on red",
    State.STOPPED: "bold magenta",
}


class StatusLine(Static):
    """State word, run and the newest step; `detail` overrides the numbers (e.g. 'Pausing after step 7…')."""

    state: reactive[State] = reactive(State.IDLE)
    run: reactive[str] = reactive("")
    detail: reactive[str] = reactive("")

    def __init__(self, **kwargs: object) -> None:
        super().__init__("", **kwargs)  # type: ignore[arg-type]
        self._step: StepLogged | None = None
        self._eval: EvalLogged | None = None

    def show_step(self, event: StepLogged | None) -> None:
        self._step = event
        self._redraw()

    def show_eval(self, event: EvalLogged) -> None:
        self._eval = event
        self._redraw()

    def watch_state(self) -> None:
        self.set_class(self.state == State.FAILED, "-failed")
        self._redraw()

    def watch_run(self) -> None:
        self._redraw()

    def watch_detail(self) -> None:
        self._redraw()

    def text(self) -> Text:
        """The line, cut after a whole word with an ellipsis when the terminal is narrower than it."""
        out = self._text()
        return fit(out, self.size.width) if self.size.width else out

    def _text(self) -> Text:
        out = Text()
        out.append(f" {self.state} ", style=STATE_STYLES.get(self.state, "bold"))
        if self.run:
            out.append(f" {self.run}", style="bold")
        if self.detail:
            out.append(f"  {self.detail}")
            return out
        e = self._step
        if e is not None and e.run == self.run:
            out.append(f"  step {e.step}/{e.max_steps}")
            out.append(f"  loss {fmt.loss(e.loss)}")
            tail = f"  {fmt.rate(e.tokens_per_s)}"
            if self.state in (State.RUNNING, State.STARTING):
                eta = f"  ETA {fmt.duration(e.eta_s)}"
                # a long run name leaves no room for both: the ETA stays (the device panel has tok/s)
                fits = not self.size.width or len(out) + len(tail) + len(eta) <= self.size.width
                tail = tail + eta if fits else eta
            ev = self._eval
            if ev is not None and ev.run == self.run:
                evaluated = f"  eval {fmt.loss(ev.eval_loss)} · ppl {fmt.perplexity(ev.eval_loss)}"
                # only where it fits: at 80 columns the ETA matters more (the tree shows eval losses)
                if len(out) + len(evaluated) + len(tail) <= self.size.width:
                    out.append(evaluated)
            out.append(tail)
        return out

    def _redraw(self) -> None:
        self.update(self.text(), layout=False)  # fixed size (CSS): skip the relayout
