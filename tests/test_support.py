"""The shared test helpers themselves: a wait that fails saying what it waited for, a digest that sees
one changed byte. Everything else in tests/ leans on them, so they must not pass vacuously."""

from __future__ import annotations

import contextlib

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


INNER_SUITE = """
import os, re, time
from pathlib import Path

from conftest import CORPUS, tiny_overrides
from faults_support import Proc, cli, sets


def test_starts_two_trainers_then_waits(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:100_000])
    endless = sets(tiny_overrides(corpus, train__max_steps=100_000, train__eval_every=0, checkpoint__every_steps=0))
    proc = Proc(["train", "--run", "a", "--headless", "--runs-dir", "runs", *endless], tmp_path)
    out = cli("train", "--run", "b", "--detach", "--runs-dir", "runs", *endless, cwd=tmp_path)
    detached = int(re.search(r"[(]pid ([0-9]+)[)]", out.stdout).group(1))
    Path(os.environ["PIDS_FILE"]).write_text(f"{proc.pid} {detached}")
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_ctrl_c_of_the_suite_leaves_no_process_a_test_started(tmp_path) -> None:
    """Issue 19: interrupting the suite left a trainer a test had started training on its own. A suite of one
    test starts a headless trainer and a `--detach`ed one (its own session, by design), then Ctrl-C reaches
    pytest's process group as it does from a terminal: neither trainer may outlive pytest."""
    import os
    import signal
    import sys
    from pathlib import Path

    import psutil
    from support import procs

    tests = Path(__file__).resolve().parent
    (tmp_path / "test_inner.py").write_text(INNER_SUITE)
    pids_file = tmp_path / "pids"
    env = {
        **os.environ,
        "PIDS_FILE": str(pids_file),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH", "")])),
    }
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "test_inner.py"]
    log = (tmp_path / "inner.log").open("wb")
    suite = procs.popen([*argv, f"--basetemp={tmp_path / 'inner'}"], cwd=tmp_path, env=env, stdout=log, stderr=log)
    pids: list[int] = []

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        wait_for(lambda: pids_file.exists() and pids_file.read_text(), 180, "the inner test to start its trainers")
        pids = [int(p) for p in pids_file.read_text().split()]
        assert all(alive(pid) for pid in pids), (tmp_path / "inner.log").read_text()
        os.killpg(suite.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        assert suite.wait(timeout=60) != 0
        wait_for(lambda: not any(alive(pid) for pid in pids), 30, "every trainer the test started to be gone")
    finally:
        log.close()
        for pid in pids:  # without the fix they would outlive this test too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        procs.kill_group(suite)
