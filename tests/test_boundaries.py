"""DESIGN §1: the UI never imports torch, the engine never imports textual."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module",
    [
        "tui_trainer.core.config",
        "tui_trainer.core.store",
        "tui_trainer.core.events",
        "tui_trainer.core.plan",
        "tui_trainer.cli",
    ],
)
def test_store_config_and_cli_do_not_import_torch(module):
    assert "torch" not in imported(module)


@pytest.mark.parametrize("module", ["tui_trainer.engine.trainer", "tui_trainer.engine.generate"])
def test_engine_does_not_import_textual(module):
    mods = imported(module)
    assert "torch" in mods and "textual" not in mods
