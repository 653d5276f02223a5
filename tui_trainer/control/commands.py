"""The CLI's control commands: `pause RUN`, `save RUN`, `status RUN [--json]`, and `--detach`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.server import ENDED
from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.store import RunStore, json_safe, validate_run_name

LOG_NAME = "train.log"
DETACHED_ENV = "TUI_TRAINER_DETACHED"  # set in a detached child: it never detaches again


def run_dir_of(store: RunStore, name: str) -> Path:
    validate_run_name(name)
    run_dir = store.run_dir(name)
    if not store.exists(name) and not (run_dir / LOG_NAME).exists():
        raise UserError(f"no run named {name!r} in {fmt.folder(store.root)}")
    return run_dir


def _fail(message: str) -> int:
    print(f"tui-trainer: error: {message}", file=sys.stderr)
    return 1


class RunFailed(Exception):
    """The run failed while we waited (a training fault, exit 1 — not bad input)."""


def _not_running(store: RunStore, name: str, verb: str) -> int:
    state = disk_status(store, name)["state"]
    return _fail(f"cannot {verb} {name}: it is not running (status: {state})")


# ---------------------------------------------------------------- pause, save


def _ask(store: RunStore, name: str, cmd: str) -> tuple[ControlClient, dict[str, Any]] | None:
    """Connect and send `cmd`: (client, reply), or None when no live process trains the run."""
    client = ControlClient.open(run_dir_of(store, name))
    if client is None:
        return None
    try:
        return client, client.request(cmd)
    except ChannelClosed:
        client.close()
        return None  # it ended just now: the caller says what the disk says


def pause(store: RunStore, name: str, *, as_json: bool) -> int:
    """Ask the run to pause, wait for the checkpoint at the promised step, print that step."""
    asked = _ask(store, name, "pause")
    if asked is None:
        return _not_running(store, name, "pause")
    client, reply = asked
    with client:
        if not reply.get("ok"):
            return _fail(f"cannot pause {name}: {reply.get('error')}")
        step = int(reply["step"])
        try:
            path = _await_checkpoint(client, store, name, lambda s: s == step)
        except RunFailed as exc:
            return _fail(str(exc))
    return _report(name, "paused", step, path, as_json)


def save(store: RunStore, name: str, *, as_json: bool) -> int:
    """Ask the run to save at its next step boundary, wait for that checkpoint, print its step."""
    asked = _ask(store, name, "save")
    if asked is None:
        return _not_running(store, name, "save")
    client, reply = asked
    with client:
        if not reply.get("ok"):
            return _fail(f"cannot save {name}: {reply.get('error')}")
        after = int(reply.get("after_step") or 0)
        try:
            path = _await_checkpoint(client, store, name, lambda s: s >= after)
        except RunFailed as exc:
            return _fail(str(exc))
    newest = store.run(name).newest if path is None else None
    if path is None and newest is not None and newest.step >= after:
        path = (newest.step, str(newest.path))  # the run ended right after: its final save holds the state
    return _report(name, "saved", path[0] if path else after, path, as_json)


def _await_checkpoint(
    client: ControlClient, store: RunStore, name: str, wanted: Callable[[int], bool]
) -> tuple[int, str] | None:
    """(step, path) of the first checkpoint `wanted` accepts; None if the run ended or failed first."""
    try:
        while True:
            event = client.next_event()
            kind = event["event"]
            if kind == "CheckpointSaved" and wanted(int(event["step"])):
                return int(event["step"]), str(event["path"])
            if kind == "Failed":
                raise RunFailed(f"{name} failed at step {event.get('step')}: {event.get('message')}")
            if kind == "StateChanged" and event.get("state") in ENDED:
                break
    except ChannelClosed:
        pass
    # the process ended before we saw the event: the disk knows whether the checkpoint landed
    for ckpt in reversed(store.run(name).checkpoints):
        if ckpt.valid and wanted(ckpt.step):
            return ckpt.step, str(ckpt.path)
    return None


def _report(name: str, verb: str, step: int, found: tuple[int, str] | None, as_json: bool) -> int:
    if found is None:
        return _fail(f"{name}: the training process ended without saving step {step}")
    step, path = found
    if as_json:
        print(json.dumps({"run": name, "step": step, "checkpoint": path}))
    else:
        print(f"{verb} {name} at step {step}: {path}")
    return 0


# ---------------------------------------------------------------- status


def status(store: RunStore, name: str, *, as_json: bool) -> int:
    """The live status when a process serves the run, else what the disk says."""
    asked = _ask(store, name, "status")
    if asked is None:
        record = disk_status(store, name)
    else:
        client, reply = asked
        client.close()
        record = {"live": True, **reply.get("status", {})}
    if as_json:
        print(json.dumps(json_safe(record), allow_nan=False))
    else:
        print(_status_line(record))
    return 0


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
        "eval_loss": newest.eval_loss if newest else None,
        "tokens_per_s": None,
        "last_checkpoint": {"step": newest.step, "path": str(newest.path)} if newest else None,
    }


def _status_line(r: dict[str, Any]) -> str:
    ckpt = r.get("last_checkpoint")
    parts = [
        str(r.get("run")),
        str(r.get("state")) + ("" if r.get("live") else " (not running)"),
        f"step {r.get('step')}" + (f"/{r['max_steps']}" if r.get("max_steps") else ""),
        f"loss {fmt.loss(r.get('loss'))}",
        f"eval {fmt.loss(r.get('eval_loss'))}",
    ]
    if r.get("live"):
        parts.append(fmt.rate(r.get("tokens_per_s")))
    parts.append(f"last checkpoint {ckpt['step'] if ckpt else '–'}")
    if r.get("live"):
        parts.append(f"pid {r.get('pid')}")
    if r.get("failure"):
        parts.append(f"failed: {r['failure']}")
    return "  ".join(parts)


# ---------------------------------------------------------------- detach


def detach(argv: Sequence[str], store: RunStore, run: str, *, name_option: bool) -> int:
    """Start `tui-trainer <argv> --headless` (minus --detach) in its own session, output to
    runs/<run>/train.log, and return at once. The run name is fixed here so that the child trains the
    run this command announced."""
    child = [a for a in argv if not _is_detach_flag(a)] + ["--headless"]
    if name_option:  # train and branch pick a free name: pin it, so the child trains the announced run
        child += ["--run", run]
    run_dir = store.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)  # no run.json yet: the child still creates the run
    log = run_dir / LOG_NAME
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui_trainer", *child],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no controlling terminal: closing it or logging out sends no SIGHUP
            env={**os.environ, DETACHED_ENV: "1"},
        )
    proc.returncode = 0  # not ours to wait for; keeps Popen's destructor quiet
    where = "" if store.root == Path("runs") else f" --runs-dir {store.root}"
    print(f"{run} is training in the background (pid {proc.pid}); output: {log}")
    print(f"  tui-trainer status {run}{where}      tui-trainer pause {run}{where}      tail -f {log}")
    return 0


def _is_detach_flag(arg: str) -> bool:
    # argparse accepts unambiguous prefixes (--det); a detach flag left in the child would fork again
    return len(arg) > 3 and "--detach".startswith(arg)


def detached() -> bool:
    return os.environ.get(DETACHED_ENV) == "1"
