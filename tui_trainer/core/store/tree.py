"""Runs as a family tree: each branch under the checkpoint it started from."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tui_trainer.core.store.info import RunInfo
from tui_trainer.core.store.runs import RunStore, mark_cycles


@dataclass(frozen=True)
class FamilyNode:
    """A run in the family tree, with the runs branched from it (in display order)."""

    run: RunInfo
    children: tuple[FamilyNode, ...] = ()


def family_tree(runs: Iterable[RunInfo]) -> list[FamilyNode]:
    """The one order of runs, for `ls` and the app: roots oldest first (then by name); a run's branches by
    the step they started from, then by name. A run whose parent is gone is a root, and so is each run of a
    parent loop (x -> y -> x, marked by `cycle`): no run ever drops out of the tree."""
    by_name = {r.name: r for r in runs}
    mark_cycles(list(by_name.values()))
    kids: dict[str, list[RunInfo]] = {}
    roots = []
    for r in by_name.values():
        if r.parent and r.parent[0] in by_name and not r.cycle:
            kids.setdefault(r.parent[0], []).append(r)
        else:
            roots.append(r)

    def node(run: RunInfo) -> FamilyNode:
        branches = sorted(kids.get(run.name, []), key=lambda c: (c.parent[1] if c.parent else 0, c.name))
        return FamilyNode(run, tuple(node(b) for b in branches))

    return [node(root) for root in sorted(roots, key=lambda r: (r.created, r.name))]


def iter_tree(store: RunStore) -> Iterable[tuple[int, RunInfo]]:
    """Runs depth-first as a family tree: (depth, run), children after their parent."""

    def walk(node: FamilyNode, depth: int) -> Iterator[tuple[int, RunInfo]]:
        yield depth, node.run
        for child in node.children:
            yield from walk(child, depth + 1)

    for root in family_tree(store.runs()):
        yield from walk(root, 0)
