"""Shared by the fault tests (tests/test_faults_*.py): drive the real CLI (wait on it with
support.waiting.wait_for, never with fixed sleeps), compare losses with an uninterrupted in-process run,
and make real tiny filesystems. Tree digests live in support.files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from support import procs

from tui_trainer.core.config import load_config
from tui_trainer.core.plan import plan_train
from tui_trainer.core.store import TEMP_PREFIX, RunStore
from tui_trainer.engine import faults
from tui_trainer.engine.trainer import Trainer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RUNNER = "import sys\nfrom tui_trainer.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def cli_command(args: list[str], inject: str = "") -> list[str]:
    """`python -m tui_trainer ARGS`, or the same entry point after `inject` (fault-injection code) ran."""
    if not inject:
        return [sys.executable, "-m", "tui_trainer", *args]
    return [sys.executable, "-c", inject + "\n" + RUNNER, *args]


TESTS = Path(__file__).resolve().parent
_hooks = faults.NO_HOOKS


def installed_hooks() -> faults.Hooks:
    """The factory TUI_TRAINER_FAULTS names in-process (see install)."""
    return _hooks


def install(monkeypatch: pytest.MonkeyPatch, hooks: faults.Hooks) -> None:
    """Every Trainer this test starts, through cli.main too, runs with `hooks` (undone with monkeypatch)."""
    monkeypatch.setattr(sys.modules[__name__], "_hooks", hooks)
    monkeypatch.setenv(faults.ENV_VAR, f"{__name__}:installed_hooks")


def nth_forward(at_call: int, effect: Any) -> faults.Hooks:
    """From the `at_call`-th training forward on, `effect(output)` (may raise) replaces the output."""
    return faults.Hooks(after_forward=lambda n, out: effect(out) if n >= at_call else out)


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return procs.run(cli_command(list(args)), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


class Proc:
    """A real CLI process in the background; stderr goes to a file the test can poll."""

    def __init__(
        self, args: list[str], cwd: Path, inject: str = "", faults_from: str = "", env: dict[str, str] | None = None
    ) -> None:
        """`faults_from` names a Hooks factory (module:function, importable from tests/) the engine installs;
        `env` adds variables to the process's environment."""
        self.stderr_path = Path(tempfile.mkstemp(prefix="stderr-", suffix=".txt", dir=cwd)[1])
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in wait()
        env = {**ENV, **(env or {})}
        if faults_from:
            path = os.pathsep.join(filter(None, [str(TESTS), ENV.get("PYTHONPATH", "")]))
            env = {**env, faults.ENV_VAR: faults_from, "PYTHONPATH": path}
        # its own process group, killed when the test ends (support.procs): a Ctrl-C of the suite never
        # leaves it training on its own
        self.popen = procs.popen(
            cli_command(args, inject), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=self._err
        )
        self.pid = self.popen.pid

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        finally:
            self._err.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.wait()


def metric_lines(path: Path) -> list[dict[str, Any]]:
    """Raw records of a metrics file as written (no resume markers applied), torn lines skipped."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def last_step(path: Path) -> int:
    steps = [r["step"] for r in metric_lines(path) if "loss" in r]
    return steps[-1] if steps else 0


def losses(store: RunStore, run: str) -> dict[int, float]:
    """Per-step train loss as every reader sees it (RunStore applies resume markers)."""
    return {r["step"]: r["loss"] for r in store.metrics(run) if "loss" in r}


def eval_losses(store: RunStore, run: str) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in store.metrics(run) if "eval_loss" in r}


def temp_dirs(store: RunStore, run: str) -> list[Path]:
    root = store.checkpoints_dir(run)
    return sorted(p for p in root.iterdir() if p.name.startswith(TEMP_PREFIX)) if root.is_dir() else []


_REFERENCE: dict[tuple[str, ...], tuple[dict[int, float], dict[int, float]]] = {}


def reference(overrides: list[str], until_step: int | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """(train losses, eval losses) of an uninterrupted in-process run of this config (cached).
    Checkpoint settings never change the losses (saving consumes no randomness), so the reference
    runs without checkpoints and serves every checkpoint variant of the same config."""
    training = [o for o in overrides if not o.startswith("checkpoint.")]
    key = (*training, f"until={until_step}")
    if key not in _REFERENCE:
        store = RunStore(tempfile.mkdtemp(prefix="reference-runs-"))
        plan = plan_train(store, load_config(None, [*training, "checkpoint.every_steps=0"]), "reference")
        state = Trainer(store, plan, until_step=until_step).run()
        assert state == ("Paused" if until_step is not None else "Finished"), f"the reference run ended {state}"
        _REFERENCE[key] = (losses(store, "reference"), eval_losses(store, "reference"))
    return _REFERENCE[key]


# ---------------------------------------------------------------- real tiny filesystems


@pytest.fixture
def tmpfs(tmp_path: Path):
    """mount_tmpfs(size) -> a fresh mount point. Skips, saying why, where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}; needs root): the real "
                "disk-full/read-only cases are covered by the injected-error tests only"
            )
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt: Path, mode: str) -> None:
    result = subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], capture_output=True, text=True)
    assert result.returncode == 0, f"remount {mode} failed: {result.stderr}"


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem with a ballast file until ENOSPC, then free `leave` bytes of it."""
    ballast = mnt / "ballast"
    chunk = b"\0" * (64 * 1024)
    with open(ballast, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    size = ballast.stat().st_size
    os.truncate(ballast, max(0, size - leave))
    return ballast


def slow_pause_save() -> faults.Hooks:
    """For a CLI subprocess: once the pause save starts, its manifest write hangs, so a second Ctrl-C is
    certain to land in the middle of writing a checkpoint."""
    import time

    pausing = {"now": False}

    def before_save(step: int, blocking: bool) -> None:
        pausing["now"] = pausing["now"] or blocking

    def before_file(path: Path) -> None:
        if pausing["now"] and path.name == "manifest.json":
            sys.stderr.write("INJECTED: checkpoint write hangs\n")
            sys.stderr.flush()
            time.sleep(120)

    return faults.Hooks(before_save=before_save, before_checkpoint_file=before_file)


GATE_ENV = "TUI_TEST_GATE"  # a file path: the gated process waits until it exists
GATE_STEPS_ENV = "TUI_TEST_GATE_STEPS"  # "9,13": after those steps, wait for the file $TUI_TEST_GATE-<step>


def _wait_for_gate(path: str) -> None:
    import time

    while not os.path.exists(path):
        time.sleep(0.02)


def gated_steps() -> faults.Hooks:
    """For a CLI subprocess: after each optimizer step in $TUI_TEST_GATE_STEPS it waits until the file
    $TUI_TEST_GATE-<step> exists: a live run held still at a known step, nothing newer saved or evaluated."""
    steps = {int(s) for s in os.environ[GATE_STEPS_ENV].split(",")}
    gate = os.environ[GATE_ENV]
    return faults.Hooks(
        after_optimizer_step=lambda step, model: _wait_for_gate(f"{gate}-{step}") if step in steps else None
    )


# `inject` code: data preparation reports "tokenizing" 3 of 10, then waits for $TUI_TEST_GATE
GATED_PREPARATION = """
import os, time
from tui_trainer.engine import run_setup
_load = run_setup.load_training_data
def _gated(config, start, dist, device, progress):
    progress("tokenizing", 3, 10)
    while not os.path.exists(os.environ["TUI_TEST_GATE"]):
        time.sleep(0.02)
    return _load(config, start, dist, device, progress)
run_setup.load_training_data = _gated
"""
