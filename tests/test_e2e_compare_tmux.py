"""End to end in a real terminal (tmux): `tui-trainer open` on pre-existing runs, two runs marked for
comparison with the space key, both named in the plot's legend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.app import build_demo_store
from support.tmux import TMUX, Pane
from test_e2e_tmux import tui_trainer_command

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")


def legend_line(screen: str) -> str:
    return next((line for line in screen.splitlines() if "x: step" in line), "")


def test_space_marks_two_runs_and_the_legend_names_both(tmp_path: Path) -> None:
    build_demo_store(tmp_path / "runs")
    pane = Pane(tmp_path)
    try:
        pane.start([*tui_trainer_command(), "open", "--runs-dir", str(tmp_path / "runs")])
        pane.wait_for(lambda s: "━━ train" in legend_line(s), 30)  # demo's history is drawn
        pane.send("Space")  # mark demo
        pane.send("Down", "Down", "Down")  # demo@100, demo@200, the branch demo-lr3e-4 under it
        pane.wait_for(r"branched from demo@200", 10)  # the detail pane follows the cursor
        pane.send("Space")
        # a frame reaches the terminal in pieces: wait for all of it, then read it
        screen = pane.wait_for(
            lambda s: (
                re.search(r"━━ demo-lr3e-4\b", legend_line(s)) is not None
                and all(t in s for t in ("● demo-lr3e-4", "● demo ", "2 runs"))
            ),
            10,
        )
        assert re.search(r"━━ demo\s", legend_line(screen)), legend_line(screen)
        assert "2 runs" in screen
        assert "● demo " in screen  # the tree's compare dots, in each run's plot colour
        pane.send("q")
        pane.wait_for(r"EXIT=0", 20)
    finally:
        pane.close()
