"""The layers of ARCHITECTURE.md hold: core imports neither torch nor textual, the UI never imports torch,
the engine never imports textual. Checked two ways: import-linter's contracts (pyproject.toml) over every
import in the source, and a fresh interpreter's sys.modules after importing a module for real."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def imported(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_linter_contracts_are_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


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
def test_core_and_cli_do_not_import_torch_or_textual(module: str) -> None:
    mods = imported(module)
    assert "torch" not in mods
    assert module == "tui_trainer.cli" or "textual" not in mods


def test_the_app_module_does_not_import_torch() -> None:
    assert "torch" not in imported("tui_trainer.tui.app")


@pytest.mark.parametrize("module", ["tui_trainer.engine.trainer", "tui_trainer.engine.generate"])
def test_engine_does_not_import_textual(module: str) -> None:
    mods = imported(module)
    assert "torch" in mods and "textual" not in mods


def test_the_hf_callback_does_not_import_textual() -> None:
    # it runs inside other people's Trainer scripts, which need not have the app's dependencies loaded
    mods = imported("tui_trainer.integrations.hf")
    assert "transformers" in mods and "textual" not in mods


def test_the_main_screen_is_composed_not_stacked() -> None:
    # widgets own their state, plain controllers (tui/controllers/) do the work: no tower of screen classes,
    # and no module of the app so long that a newcomer must read all of it to change one panel
    from textual.screen import Screen

    from tui_trainer.tui.screens.main import MainScreen

    assert MainScreen.__bases__ == (Screen,)
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "tui_trainer" / "tui").rglob("*.py")}
    long = {name: lines for name, lines in sizes.items() if lines > 350}
    assert not long, long
