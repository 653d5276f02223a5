"""Waiting on a condition, never on a fixed sleep: one poll loop, one timeout message, sync and async."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Deadline:
    """`timeout` seconds from now; `check()` fails naming what was awaited (and, if given, what was seen)."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.end = time.monotonic() + timeout

    def check(self, seen: str = "") -> None:
        if time.monotonic() > self.end:
            detail = f"; last seen:\n{seen}" if seen else ""
            raise AssertionError(f"timed out after {self.timeout:g}s waiting for {self.what}{detail}")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll `condition` until it returns something truthy and return that; fail naming `what` after
    `timeout` seconds. The condition is checked once more after the deadline passes, before failing."""
    deadline = Deadline(timeout, what)
    while not (value := condition()):
        deadline.check()
        time.sleep(interval)
    return value


async def wait_for_async(
    condition: Callable[[], T],
    pause: Callable[[float], Awaitable[Any]],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """wait_for with an awaitable pause between checks (a Textual Pilot's `pilot.pause`), so the app
    keeps processing its messages while the test waits."""
    deadline = Deadline(timeout, what)
    while not (value := condition()):
        deadline.check()
        await pause(interval)
    return value
