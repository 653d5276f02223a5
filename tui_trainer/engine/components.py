"""Checkpoint components: what a checkpoint saves and restores, as named parts in one registry
(torchtitan's CheckpointManager `states` dict of Stateful components). ARCHITECTURE.md: checkpoint components.

Setup builds the registry (engine/run_setup.py `checkpoint_components`); saving asks every component for its
parts in registration order and writes them (engine/checkpoint_save.py), loading hands every component the
verified checkpoint in the same order (engine/checkpoint_load.py). Neither names a component: a strategy
(e.g. FSDP) adds its own or replaces one by name without editing the save or load code.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from tui_trainer.engine.checkpoint_files import Part

if TYPE_CHECKING:
    from tui_trainer.engine.checkpoint_load import CheckpointReader


class Component:
    """One named piece of the training state. Subclasses set `name` and implement `save` and `load`."""

    name: str = ""

    def prepare(self, step: int, blocking: bool) -> None:
        """Called on every rank at each save (of checkpoint `step`), before rank 0 captures: collectives go
        here (DDP gathers every rank's RNG; a sharded strategy gathers or writes its shards, in the background
        unless `blocking`: a pause, the end, async saves off). Default: nothing."""

    def wait(self) -> None:
        """Every rank: block until the background work of this component's last save is done (FSDP's shard
        writes), before the process may leave the job. Never raises: the save reports its own failure.
        Default: nothing."""

    def save(self) -> list[Part]:
        """On rank 0, at a step boundary on the training thread: the parts to write (engine/checkpoint_files.py).
        Return the live state: capture copies `staged` parts into the staging buffers, the rest must not change
        until the write is done (return copies of small mutable state)."""
        raise NotImplementedError

    def load(self, ckpt: CheckpointReader) -> None:
        """On every rank, from a verified checkpoint (read through `ckpt`): restore this component in place,
        or raise CheckpointInvalid naming the file. Nothing has been written yet, so a refusal is clean."""
        raise NotImplementedError


class Components:
    """The registry: components by name, in the order they save and load (the RNG last: its load restores
    the generators, and nothing after it may draw from them)."""

    def __init__(self, *components: Component) -> None:
        self._by_name: dict[str, Component] = {}
        for component in components:
            self.add(component)

    def add(self, component: Component, *, before: str | None = None) -> None:
        """Register a new component, at the end or just before `before`."""
        if not component.name or component.name in self._by_name:
            raise ValueError(f"checkpoint component {component.name!r}: empty or registered twice")
        if before is not None and before not in self._by_name:
            raise KeyError(f"checkpoint component {component.name!r}: no component {before!r} to go before")
        items = list(self._by_name.items())
        at = len(items) if before is None else [name for name, _ in items].index(before)
        items.insert(at, (component.name, component))
        self._by_name = dict(items)

    def replace(self, component: Component) -> Component:
        """Put `component` in the place of the one of the same name (e.g. a sharded model for "model")."""
        old = self._by_name[component.name]
        self._by_name[component.name] = component
        return old

    def remove(self, name: str) -> Component:
        return self._by_name.pop(name)

    def __getitem__(self, name: str) -> Component:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Component]:
        return iter(list(self._by_name.values()))

    def names(self) -> list[str]:
        return list(self._by_name)

    def prepare(self, step: int, blocking: bool) -> None:
        for component in self:
            component.prepare(step, blocking)

    def wait(self) -> None:
        for component in self:
            component.wait()

    def save(self) -> list[Part]:
        return [part for component in self for part in component.save()]

    def load(self, ckpt: CheckpointReader) -> None:
        for component in self:
            component.load(ckpt)
