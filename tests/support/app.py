"""Helpers for the app tests: a store with pre-existing runs written without torch, fixed clock and device.

Imported as `support.app` by tests/test_app*.py, tests/test_snapshots.py and the attach / preemption tests: the
checkpoints here are real store entries (manifest with checksums, files of the listed sizes) but hold no
weights, so they browse, plot, pin and verify like real ones; only resume/generate need real ones.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tui_trainer.core.config import Config
from tui_trainer.core.events import DeviceSample
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore, checkpoint_dirname, write_json_atomic, write_manifest

NOW = 1_700_000_000.0  # the fixed "now" of every snapshot


def fixed_clock() -> float:
    return NOW


def fixed_probe() -> DeviceSample:
    return DeviceSample(run="", device="cpu", name="this process", rss_bytes=512 * 2**20, cpu_percent=187.0)


def demo_loss(step: int, lr_scale: float = 1.0) -> float:
    """A deterministic, noisy, falling curve."""
    return 1.6 + 4.2 * math.exp(-step * lr_scale / 120) + 0.12 * math.sin(step * 0.9) + 0.05 * math.cos(step * 2.3)


def write_run(
    store: RunStore,
    name: str,
    *,
    created: float,
    steps: range,
    checkpoints: list[int],
    parent: tuple[str, int] | None = None,
    status: str = "paused",
    pinned: tuple[int, ...] = (),
    lr: float = 1e-3,
    lr_scale: float = 1.0,
    eval_every: int = 50,
    invalid: tuple[int, ...] = (),
) -> None:
    config = Config().to_dict()
    config["optim"]["lr"] = lr
    config["train"]["max_steps"] = 400
    config["train"]["eval_every"] = eval_every
    store.create_run(name, config, parent)
    write_json_atomic(
        store.run_dir(name) / "run.json",
        {
            "name": name,
            "created": created,
            "config": config,
            "parent": {"run": parent[0], "step": parent[1]} if parent else None,
            "status": status,
            "pinned": sorted(pinned),
        },
    )
    lines = []
    for step in steps:
        loss = demo_loss(step, lr_scale)
        lines.append({"step": step, "loss": loss, "lr": lr, "tokens": step * 2048, "tokens_per_s": 9000.0 + step})
        if step % eval_every == 0:
            lines.append({"step": step, "eval_loss": loss + 0.15})
    store.metrics_path(name).write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    first = steps[0]
    for step in checkpoints:
        directory = store.checkpoint_dir(name, step)
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"\0" * (1_200_000 + step))
        (directory / "trainer_state.json").write_text(json.dumps({"step": step}), encoding="utf-8")
        loss = demo_loss(step, lr_scale)
        write_manifest(
            directory,
            {
                "step": step,
                "created": created + (step - first) * 9.0,
                "loss": loss,
                "eval_loss": loss + 0.15 if step % eval_every == 0 else None,
                "eval_step": step if step % eval_every == 0 else None,
            },
        )
        if step in invalid:
            (directory / "model.safetensors").write_bytes(b"\0" * 10)  # truncated: size check fails


def build_demo_store(root: Path) -> RunStore:
    """demo (400 steps) -> demo-lr3e-4 branched at demo@200 -> and an unrelated run with a bad checkpoint."""
    store = RunStore(root)
    t0 = NOW - 2 * 3600
    write_run(store, "demo", created=t0, steps=range(1, 401), checkpoints=[100, 200, 300, 400], pinned=(100,))
    write_run(
        store,
        "demo-lr3e-4",
        created=t0 + 3000,
        steps=range(201, 351),
        checkpoints=[250, 300, 350],
        parent=("demo", 200),
        lr=3e-4,
        lr_scale=1.4,
    )
    write_run(
        store,
        "scratch",
        created=t0 + 5000,
        steps=range(1, 61),
        checkpoints=[20, 40],
        invalid=(40,),
        status="failed",
    )
    return store


async def wait_for(
    pilot: object, condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition"
) -> None:
    """Poll `condition` between Pilot pauses until it holds; fail with `what` after `timeout` seconds."""
    pause: Callable[[float], Awaitable[None]] = pilot.pause  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await pause(0.05)


async def plot_ready(pilot: object, timeout: float = 30.0) -> None:
    """Wait until history loads are done and the plot shows the run the app wants to show."""
    app = pilot.app  # type: ignore[attr-defined]

    def ready() -> bool:
        wanted = app.main.browse.wanted_run
        curves = app.main.plot.curves
        loading = any(w.group == "history" and not w.is_finished for w in app.workers)
        return not loading and (wanted is None or (curves is not None and curves.run == wanted))

    await wait_for(pilot, ready, timeout, "the plot's history to load")


def checkpoint_name(step: int) -> str:
    return checkpoint_dirname(step)


def step_event(run: str, step: int, max_steps: int = 1000):  # type: ignore[no-untyped-def]
    from tui_trainer.core.events import StepLogged

    return StepLogged(
        run, step, demo_loss(step), 1e-3, step * 2048, 9100.0, 0.225, max_steps, (max_steps - step) * 0.225
    )


class ScriptedTrainer:
    """Stands in for the engine where a test needs a fixed story (snapshots): emits `events`, returns `final`."""

    def __init__(self, events: list[object], final: str, sink) -> None:  # type: ignore[no-untyped-def]
        self.events, self.final, self.sink, self.step = events, final, sink, 0

    def run(self) -> str:
        for event in self.events:
            self.sink(event)
        return self.final

    def pause(self) -> int:
        return self.step + 1

    def stop(self) -> None:
        pass

    def save_now(self) -> None:
        pass


def scripted(events: list[object], final: str):  # type: ignore[no-untyped-def]
    """A trainer_factory for TrainerApp that plays `events` then ends in state `final`."""
    return lambda store, plan, sink, until_step: ScriptedTrainer(events, final, sink)


def continued_demo(store: RunStore) -> RunPlan:
    """demo continued from its step-400 checkpoint. Its recorded max_steps is 400, which plan_resume
    rightly refuses to continue; the scripted events run to 1000, so the plan says so (no trainer runs)."""
    config = Config.from_dict(store.run("demo").config)
    config.train.max_steps = 1000
    ckpt = store.checkpoint("demo", 400)
    return RunPlan(run="demo", config=config, start=ckpt.path, start_step=400, new_run=False)


class HeldTrainer:
    """An engine that has started and is mid-step: pause() promises the step after the newest."""

    step = 410

    def pause(self) -> int:
        return self.step + 1

    def save_now(self) -> None:
        pass


def screen_text(app: object) -> str:
    """The app's screen as plain text, line by line, as a terminal would show it (what a snapshot draws)."""
    import io

    from rich.console import Console

    width, height = app.size  # type: ignore[attr-defined]
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True)
    screen = app.screen  # type: ignore[attr-defined]
    console.print(screen._compositor.render_update(full=True, screen_stack=app._background_screens))  # type: ignore[attr-defined]
    return console.export_text(styles=False)


def build_long_names_store(root: Path) -> RunStore:
    """demo, a branch with a long name and no checkpoint yet (running), and one nested two levels deep whose
    checkpoint is 13 seconds old: what cut labels and ages at 80 columns."""
    store = build_demo_store(root)
    write_run(
        store,
        "demo-from200",
        created=NOW - 40,
        steps=range(201, 210),
        checkpoints=[],
        parent=("demo", 200),
        status="running",
    )
    write_run(
        store,
        "demo-lr3e-4-from300-longer",
        created=NOW - 13,
        steps=range(301, 302),
        checkpoints=[301],
        parent=("demo-lr3e-4", 300),
        status="running",
    )
    return store
