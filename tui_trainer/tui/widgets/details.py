"""The pane under the run tree: the highlighted run or checkpoint spelled out in full."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui_trainer.core import fmt
from tui_trainer.core.store import CheckpointInfo, RunInfo
from tui_trainer.tui.widgets.run_tree import mark_words, short_problem
from tui_trainer.tui.widgets.text_fit import wrap_at_joints


class CheckpointDetails(Static):
    """A few lines under the tree spelling out the highlighted run or checkpoint in full."""

    _shown: Text | None = None

    def show(self, run: RunInfo | None, ckpt: CheckpointInfo | None, now: float) -> None:
        out = self._details(run, ckpt, now)
        # a clock calls this every second: an unchanged text costs no re-render and no relayout (the UI
        # thread's time is the trainer's GIL time)
        if out != self._shown:
            self._shown = out
            self.update(out)

    def _details(self, run: RunInfo | None, ckpt: CheckpointInfo | None, now: float) -> Text:
        out = Text()
        if run is None:
            out.append("no runs yet", style="dim")
        elif ckpt is None:
            out.append(self._wrap(run.name), style="bold")
            if run.damaged:
                out.append(f"\n{fmt.MARK_INVALID} damaged: {run.damaged}", style="red")
            if run.cycle:
                out.append(f"\n{fmt.MARK_INVALID} parent loop: {' -> '.join(run.cycle)}", style="red")
            out.append(f"\n{fmt.plural(len(run.checkpoints), 'checkpoint')} · {run.status}", style="dim")
            if run.world_size > 1:
                out.append(f" · {fmt.plural(run.world_size, 'rank')}", style="dim")
            if run.parent:
                out.append("\n" + self._wrap(f"branched from {run.parent[0]}@{run.parent[1]}"), style="dim")
            model = fmt.model_line(run.config)
            if model:  # the family, the base model, the LoRA rank: only for runs that are not a new GPT-2
                out.append("\n" + self._wrap(model), style="dim")
        else:
            out.append(self._wrap(ckpt.ref), style="bold")
            if not ckpt.valid:
                out.append(f"\n{fmt.MARK_INVALID} invalid: {short_problem(ckpt)}", style="red")
            else:
                evaluated = f"eval {fmt.loss(ckpt.eval_loss)}" if ckpt.eval_loss is not None else "not evaluated"
                out.append(f"\nloss {fmt.loss(ckpt.loss)} · {evaluated}")
                out.append("\n")
                if ckpt.eval_loss is not None:  # perplexity leads the next line: the pane is 34 columns at 80
                    out.append(f"ppl {fmt.perplexity(ckpt.eval_loss)} · ")
                age = fmt.age(max(0.0, now - ckpt.created))
                saved = "saved just now" if age == "now" else f"saved {age} ago"
                out.append(f"{saved} · {fmt.size(ckpt.size_bytes)}", style="dim")
                if not ckpt.manifest:  # valid, but nothing to verify it against
                    out.append("\nno manifest (Hugging Face Trainer checkpoint)", style="dim")
                words = [word for mark, word in mark_words(run, ckpt)]
                if words:
                    out.append("\n" + " · ".join(words), style="bold yellow")
        return out

    def _wrap(self, text: str) -> str:
        """A long run name breaks after one of its joints, not wherever the pane ends."""
        return wrap_at_joints(text, self.content_region.width if self.is_mounted else 0)

    def on_resize(self) -> None:
        if self._shown is not None:
            self._shown = None  # re-wrapped on the clock's next call (within a second)
