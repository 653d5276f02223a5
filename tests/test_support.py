"""The shared test helpers themselves: a wait that fails saying what it waited for, a digest that sees
one changed byte. Everything else in tests/ leans on them, so they must not pass vacuously."""

from __future__ import annotations

import pytest
from support.files import tree_digest
from support.waiting import wait_for, wait_for_async


def test_wait_for_returns_the_value_once_the_condition_holds() -> None:
    calls = iter([0, "", None, "ready"])
    assert wait_for(lambda: next(calls), 5, "the fourth poll", interval=0) == "ready"


def test_wait_for_keeps_polling_until_the_deadline_then_fails_naming_what_it_waited_for() -> None:
    polls: list[int] = []
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s waiting for the moon"):
        wait_for(lambda: polls.append(1), 0.05, "the moon", interval=0.01)
    assert len(polls) >= 2


async def test_the_async_wait_pauses_between_polls_and_fails_the_same_way() -> None:
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    state = {"n": 0}

    def third() -> bool:
        state["n"] += 1
        return state["n"] == 3

    assert await wait_for_async(third, pause, 5, "the third poll", interval=0.5) is True
    assert pauses == [0.5, 0.5]
    with pytest.raises(AssertionError, match="waiting for never"):
        await wait_for_async(lambda: False, pause, 0, "never")


def test_tree_digest_sees_one_changed_byte_but_not_the_run_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "w.bin").write_bytes(b"\0" * 1000)
    before = tree_digest(tmp_path)
    assert list(before) == ["a/b/w.bin"]
    (tmp_path / ".lock").write_text("123")
    assert tree_digest(tmp_path) == before
    (tmp_path / "a" / "b" / "w.bin").write_bytes(b"\0" * 999 + b"\1")
    assert tree_digest(tmp_path) != before
