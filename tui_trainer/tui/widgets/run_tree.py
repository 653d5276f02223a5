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
from tui_trainer.tui.widgets.text_fit import fit


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

    class CompareChanged(Message):
        """The runs to overlay on the plot changed: `runs` (the baseline first, then the marked ones)."""

        def __init__(self, runs: list[str], baseline: str | None) -> None:
            super().__init__()
            self.runs = runs
            self.baseline = baseline

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
        self.marked: tuple[str, ...] = ()  # runs marked for comparison, in mark order (replaced, never mutated)
        self.baseline: str | None = None  # the run pinned as the baseline (stays when marks are cleared)

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

    # ---- the compare set: this widget owns it and says when it changed (CompareChanged)

    def toggle_mark(self, run: str) -> None:
        """Mark / unmark `run` for the overlay."""
        self.marked = tuple(r for r in self.marked if r != run) if run in self.marked else (*self.marked, run)
        self._compare_changed()

    def toggle_baseline(self, run: str) -> None:
        """Pin `run` as the baseline; again unpins it."""
        self.baseline = None if self.baseline == run else run
        self._compare_changed()

    def clear_marks(self) -> None:
        self.marked = ()
        self._compare_changed()

    def compared(self) -> list[str]:
        """The runs overlaid besides the highlighted one: the baseline, then the marked ones in mark order."""
        runs = [self.baseline] if self.baseline else []
        return runs + [r for r in self.marked if r != self.baseline]

    def _compare_changed(self) -> None:
        self.post_message(self.CompareChanged(self.compared(), self.baseline))

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


def mark_words(run: RunInfo, ckpt: CheckpointInfo) -> list[tuple[str, str]]:
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
