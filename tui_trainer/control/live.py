"""Finding and reaching the runs live processes train: their channels (the app's `a`, `tui-trainer attach`,
the app waiting for a run it started in the background), and a run's status as its files tell it when no
process answers. The CLI prints from these (cli/control.py); the app shows them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.protocol import LINK_NAME, process_sockets
from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.launch import LOG_NAME, log_tail, process_running
from tui_trainer.core.store import RunStore, validate_run_name


def run_dir_of(store: RunStore, name: str) -> Path:
    validate_run_name(name)
    run_dir = store.run_dir(name)
    if not store.exists(name) and not (run_dir / LOG_NAME).exists():
        raise UserError(f"no run named {name!r} in {fmt.folder(store.root)}")
    return run_dir


def live_runs(store: RunStore, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """{run: its hello's status} for every run a live process serves (a stale socket is skipped)."""
    found: dict[str, dict[str, Any]] = {}
    if not store.root.is_dir():
        return found
    for run_dir in sorted(store.root.iterdir()):
        if not (run_dir / LINK_NAME).is_symlink():
            continue
        try:
            client = ControlClient.open(run_dir, timeout)
        except UserError:
            continue  # another user's, or too busy to answer: not one we can attach to
        if client is not None:
            with client:
                found[run_dir.name] = client.hello.get("status") or {}
    return found


def connect_live(store: RunStore, name: str | None) -> ControlClient:
    """A connection to RUN's training process (RUN None: the only live run); UserError names the problem."""
    if name is None:
        live = live_runs(store)
        if len(live) != 1:
            listed = ", ".join(f"{n} (step {s.get('step')})" for n, s in live.items())
            raise UserError(
                f"{len(live)} live runs in {fmt.folder(store.root)}: name one ({listed})"
                if live
                else f"no live run in {fmt.folder(store.root)} to attach to (start one: tui-trainer train --detach)"
            )
        name = next(iter(live))
    client = ControlClient.open(run_dir_of(store, name))
    if client is None:
        state = disk_status(store, name)["state"]
        raise UserError(f"cannot attach to {name}: it is not running (status: {state}); tui-trainer open browses it")
    return client


def wait_for_channel(
    store: RunStore, run: str, pid: int | None, give_up: threading.Event, timeout: float = 600.0
) -> ControlClient:
    """Connect to `run` once its (just started) process serves the channel; UserError when that process
    ends first (with the last line of its train.log), nothing answers within `timeout` seconds, or
    `give_up` is set (the app closes: the run goes on without us)."""
    run_dir = store.run_dir(run)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not give_up.is_set():
        client = ControlClient.open(run_dir)
        if client is not None:
            return client
        if pid is not None and not process_running(pid):
            log = run_dir / LOG_NAME
            lines = log_tail(log).strip().splitlines()
            raise UserError(f"{run} did not start: {lines[-1] if lines else 'no output'} (see {log})")
        give_up.wait(0.1)
    if give_up.is_set():
        raise UserError(f"stopped waiting for {run}")
    raise UserError(f"{run} did not open its control channel within {timeout:g}s (see {run_dir / LOG_NAME})")


def starting_status(run_dir: Path) -> dict[str, Any] | None:
    """The status of a process that serves `run_dir` but has not linked control.sock yet (it is loading the
    engine or preparing data, before it holds the run's lock); None when there is none."""
    for path in process_sockets(run_dir):
        try:  # the same checks as through the link: our uid, a hello that names this run
            client = ControlClient.at(path, run_dir, timeout=2.0)
            if client is not None:  # (None: a socket left by a killed process)
                with client:
                    return reply_status(client, client.request("status"))
        except (ChannelClosed, UserError, OSError):
            continue  # another user's, too busy, or not this run's: not one we can ask
    return None


def reply_status(client: ControlClient, reply: dict[str, Any]) -> dict[str, Any]:
    client.close()
    return dict(reply.get("status") or {})


def disk_status(store: RunStore, name: str) -> dict[str, Any]:
    if not store.exists(name):  # a detached run still starting, or one that failed before its first write
        log = store.run_dir(name) / LOG_NAME
        return {"run": name, "live": False, "state": f"not started (see {log})", "step": 0, "last_checkpoint": None}
    info = store.run(name)
    newest = info.newest
    # no live process, yet the record says it trains: that process died without pausing (kill -9, crash)
    state = "interrupted" if info.status in ("running", "created") else info.status
    return {
        "run": name,
        "live": False,
        "state": state,
        "step": newest.step if newest else 0,
        "max_steps": info.config.get("train", {}).get("max_steps"),
        "loss": newest.loss if newest else None,
        "eval_loss": newest_eval(store, name),
        "tokens_per_s": None,
        "last_checkpoint": {"step": newest.step, "path": str(newest.path)} if newest else None,
        "restarts": info.restarts,
    }


def newest_eval(store: RunStore, name: str) -> float | None:
    """The last eval loss in the run's history on disk (its lineage's, as the app's curve shows), or None."""
    import numpy as np

    from tui_trainer.core.metrics_cache import history_columns

    try:
        segments = history_columns(store, name)
    except (UserError, OSError):
        return None
    for _, columns in reversed(segments):
        evals = columns["eval_loss"]
        measured = evals[~np.isnan(evals)]
        if len(measured):
            return float(measured[-1])
    return None
