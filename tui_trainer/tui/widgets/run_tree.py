"""The run tree / checkpoint browser: runs, their checkpoints, and branches nested under the checkpoint
they started from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from tui_trainer.core import fmt
from tui_trainer.core.events import State
from tui_trainer.core.store import CheckpointInfo, FamilyNode, RunInfo, family_tree
from tui_trainer.tui.widgets.text_fit import fit, wrap_at_joints


@dataclass(frozen=True)
class NodeRef:
    """What a tree line points at: a run (step None) or one of its checkpoints."""

    run: str
    step: int | None = None

    @property
    def ref(self) -> str:
        return self.run if self.step is None else f"{self.run}@{self.step}"


# the column header shown above the tree; marks come right after the step so a narrow panel drops the
# age and size (the detail pane repeats them), never the marks
# (aligned with a top-level run's checkpoint lines, which start after a 2-column guide)
AGE_WIDTH = 3  # fmt.age: now, 59s, 59m, 23h, 6d (a 100-day age pushes the size one column right)
TREE_HEADER = f"{'':3}step mark train/eval {'age':>{AGE_WIDTH}}"


SIZE_COLUMN_FROM = 44  # the tree shows checkpoint sizes from this width on (the detail pane always does)


def checkpoint_label(run: RunInfo, ckpt: CheckpointInfo, now: float, show_size: bool = True) -> Text:
    label = Text(no_wrap=True, overflow="crop")
    if not ckpt.valid:
        label.append(f"{ckpt.step:>5} ", style="red")
        label.append(f"{fmt.MARK_INVALID:<4}invalid", style="bold red")
        return label
    label.append(f"{ckpt.step:>5} ", style="bold")
    label.append(f"{fmt.marks(run, ckpt):<4}", style="bold yellow")
    label.append(f"{fmt.loss(ckpt.loss)}", style="cyan")
    label.append("/")
    label.append(f"{fmt.loss(ckpt.eval_loss)}", style="green")
    label.append(" " * max(0, 11 - len(fmt.loss(ckpt.loss)) - 1 - len(fmt.loss(ckpt.eval_loss))))
    label.append(f" {fmt.age(max(0.0, now - ckpt.created)):>{AGE_WIDTH}}", style="dim")
    if show_size:
        label.append(f" {fmt.size(ckpt.size_bytes):>5}", style="dim")
    return label


LIVE_STYLES = {State.RUNNING: "green", State.PAUSING: "yellow", State.FAILED: "red"}


def run_label(run: RunInfo, live_state: State | None, compare_color: str | None = None) -> Text:
    """The run's name and state: the live run's from the app, any other's as run.json records it; a run
    overlaid for comparison starts with a dot in its plot colour."""
    label = Text(no_wrap=True)
    if compare_color is not None:
        label.append("● ", style=compare_color)
    label.append(run.name, style="bold")
    if run.damaged:  # run.json is unusable (core/store/schema.py): the details pane says why
        label.append(f" {fmt.MARK_INVALID} damaged", style="bold red")
        return label
    if run.cycle:
        label.append(f" {fmt.MARK_INVALID} parent loop", style="red")
    if live_state is not None:
        label.append(f" {live_state.status}", style=LIVE_STYLES.get(live_state, "dim"))
    else:
        label.append(f" {run.status}", style="red" if run.status == State.FAILED.status else "dim")
    if run.world_size > 1:  # trained data-parallel (torchrun): its effective batch is world_size times larger
        label.append(f" · {fmt.plural(run.world_size, 'rank')}", style="dim")
    if not run.checkpoints:
        label.append(" · none saved", style="dim")
    return label


class TreeHeader(Static):
    """The tree's column names; as wide as the tree, so it shows "size" exactly when the tree does."""

    def on_resize(self) -> None:
        self.update(TREE_HEADER + (f" {'size':>5}" if self.size.width >= SIZE_COLUMN_FROM else ""))


class RunTree(Tree[NodeRef]):
    """Arrow keys move; Enter expands a run. The highlighted line drives the plot and the keys."""

    # space marks the highlighted run for comparison (Tree's own space only toggles, as enter does)
    BINDINGS: ClassVar[list[BindingType]] = [Binding("space", "screen.compare_mark", "Compare", show=False)]

    class Highlighted(Message):
        """The cursor moved to another run or checkpoint."""

        def __init__(self, node: NodeRef | None) -> None:
            super().__init__()
            self.node = node

    def __init__(self, clock: Callable[[], float], **kwargs: object) -> None:
        super().__init__("runs", **kwargs)  # type: ignore[arg-type]
        self.show_root = False
        self.guide_depth = 2
        self.clock = clock
        self.runs: dict[str, RunInfo] = {}
        self.show_size = True
        self._by_ref: dict[NodeRef, TreeNode[NodeRef]] = {}
        self._live: dict[str, State] = {}
        self.compare_marks: dict[str, str] = {}  # run -> its colour on the plot, for runs overlaid there

    def rebuild(self, runs: list[RunInfo], live: dict[str, State] | None = None, select: NodeRef | None = None) -> None:
        """Rebuild from the store, keeping the cursor on the same run/checkpoint (or moving to `select`)."""
        keep = select or (self.cursor_node.data if self.cursor_node is not None else None)
        self.runs = {r.name: r for r in runs}
        self._live = live or {}
        self.clear()
        self._by_ref = {}
        for family in family_tree(runs):
            self._add_run(self.root, family, live or {}, self.clock())
        self.root.expand()
        target = self._by_ref.get(keep) if keep else None
        if target is None and keep is not None:
            target = self._by_ref.get(NodeRef(keep.run))
        if target is None and self._by_ref:
            target = next(iter(self._by_ref.values()))
        _ = self.last_line  # lay out lines so node.line is known
        self.move_cursor(target)

    def _add_run(self, parent: TreeNode[NodeRef], family: FamilyNode, live: dict[str, State], now: float) -> None:
        """A run line, its checkpoint lines, and each branch nested under the checkpoint it started from."""
        run = family.run
        label = run_label(run, live.get(run.name), self.compare_marks.get(run.name))
        node = parent.add(label, data=NodeRef(run.name), expand=True)
        self._by_ref[NodeRef(run.name)] = node
        at_step: dict[int, list[FamilyNode]] = {}
        for branch in family.children:
            at_step.setdefault(branch.run.parent[1] if branch.run.parent else -1, []).append(branch)
        for ckpt in run.checkpoints:
            ref = NodeRef(run.name, ckpt.step)
            label = checkpoint_label(run, ckpt, now, self.show_size)
            branches = at_step.pop(ckpt.step, [])
            # a branch point stays open and has no toggle icon: its columns line up with its siblings'
            child = (
                node.add(label, data=ref, expand=True, allow_expand=False)
                if branches
                else node.add_leaf(label, data=ref)
            )
            self._by_ref[ref] = child
            for branch in branches:
                self._add_run(child, branch, live, now)
        # branches whose start checkpoint is gone still belong under their parent run
        for orphans in at_step.values():
            for branch in orphans:
                self._add_run(node, branch, live, now)

    def render_label(self, node: TreeNode[NodeRef], base_style: Style, style: Style) -> Text:
        """The label as Tree draws it (toggle icon + text), cut to the room its indent leaves: whole, or
        cut after a whole word with an ellipsis (an age is shown whole or not at all)."""
        label = super().render_label(node, base_style, style)
        depth, parent = 0, node.parent
        while parent is not None and parent is not self.root:
            depth, parent = depth + 1, parent.parent
        icon = len(self.ICON_NODE_EXPANDED) if node.allow_expand else 0  # "▼ " / "▶ ": not a word to cut at
        room = self.scrollable_content_region.width - depth * self.guide_depth - icon
        return Text.assemble(label[:icon], fit(label[icon:], room))

    def watch_show_vertical_scrollbar(self) -> None:
        """The scrollbar takes a column from every label: cut them again (Tree caches lines by width)."""
        self._invalidate()

    def on_resize(self) -> None:
        wide = self.size.width >= SIZE_COLUMN_FROM
        if wide != self.show_size:
            self.show_size = wide
            self.refresh_ages()

    def refresh_ages(self) -> None:
        """Relabel checkpoint lines whose text changed (ages: a timer calls this; no disk access)."""
        now = self.clock()
        for ref, node in self._by_ref.items():
            run = self.runs.get(ref.run)
            if ref.step is None or run is None:
                continue
            ckpt = next((c for c in run.checkpoints if c.step == ref.step), None)
            if ckpt is None:
                continue
            label = checkpoint_label(run, ckpt, now, self.show_size)
            if label.plain != str(node.label):
                node.set_label(label)

    def set_compare_marks(self, marks: dict[str, str]) -> None:
        """Relabel run lines whose compare mark changed (no rebuild: the cursor stays put)."""
        changed = {run for run in set(marks) | set(self.compare_marks) if marks.get(run) != self.compare_marks.get(run)}
        self.compare_marks = dict(marks)
        for run in changed:
            node, info = self._by_ref.get(NodeRef(run)), self.runs.get(run)
            if node is not None and info is not None:
                node.set_label(run_label(info, self._live.get(run), marks.get(run)))

    def select_ref(self, ref: NodeRef) -> bool:
        node = self._by_ref.get(ref)
        if node is None:
            return False
        self.move_cursor(node)
        return True

    @property
    def selected(self) -> NodeRef | None:
        node = self.cursor_node
        return node.data if node is not None else None

    def selected_checkpoint(self) -> CheckpointInfo | None:
        ref = self.selected
        if ref is None or ref.run not in self.runs:
            return None
        run = self.runs[ref.run]
        if ref.step is None:
            return run.newest
        return next((c for c in run.checkpoints if c.step == ref.step), None)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[NodeRef]) -> None:
        event.stop()
        self.post_message(self.Highlighted(event.node.data))

    def on_tree_node_selected(self, event: Tree.NodeSelected[NodeRef]) -> None:
        event.stop()


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
                words = [word for mark, word in _mark_words(run, ckpt)]
                if words:
                    out.append("\n" + " · ".join(words), style="bold yellow")
        return out

    def _wrap(self, text: str) -> str:
        """A long run name breaks after one of its joints, not wherever the pane ends."""
        return wrap_at_joints(text, self.content_region.width if self.is_mounted else 0)

    def on_resize(self) -> None:
        if self._shown is not None:
            self._shown = None  # re-wrapped on the clock's next call (within a second)


def _mark_words(run: RunInfo, ckpt: CheckpointInfo) -> list[tuple[str, str]]:
    out = []
    if run.newest and run.newest.step == ckpt.step:
        out.append((fmt.MARK_NEWEST, f"{fmt.MARK_NEWEST} newest"))
    if run.best and run.best.step == ckpt.step:
        out.append((fmt.MARK_BEST, f"{fmt.MARK_BEST} best"))
    if ckpt.pinned:
        out.append((fmt.MARK_PINNED, f"{fmt.MARK_PINNED} pinned"))
    return out


def short_problem(ckpt: CheckpointInfo) -> str:
    """`verify`'s reason without the long checkpoint path: "model.safetensors: size 10 bytes, manifest says …"."""
    prefix = f"{ckpt.path}/"
    return ckpt.problem.removeprefix(prefix) if ckpt.problem.startswith(prefix) else ckpt.problem
