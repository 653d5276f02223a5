"""The CLI's control commands: `pause RUN`, `save RUN`, `status RUN [--json]` print what a live run's
process answered (control/live.py reaches it), and `--detach` says how to reach the run it started in the
background (core/launch.py starts it)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.dispatch import ENDED
from tui_trainer.control.live import disk_status, newest_eval, reply_status, run_dir_of, starting_status
from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.launch import LOG_NAME, spawn_detached
from tui_trainer.core.store import RunStore, json_safe, validate_run_name


def _fail(message: str) -> int:
    print(f"tui-trainer: error: {message}", file=sys.stderr)
    return 1


class NotDone(Exception):
    """A pause or save that did not happen: the run is not running, refused, or failed while we waited
    (exit 1 — not bad input). The message is the error line."""


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
    try:
        step, path = _ask_and_await(store, name, "pause", lambda reply: int(reply["step"]), exact=True)
    except NotDone as exc:
        return _fail(str(exc))
    return _report(name, "paused", step, path, as_json)


def save(store: RunStore, name: str, *, as_json: bool) -> int:
    """Ask the run to save at its next step boundary, wait for that checkpoint, print its step."""
    try:
        after, path = _ask_and_await(store, name, "save", lambda reply: int(reply.get("after_step") or 0), exact=False)
    except NotDone as exc:
        return _fail(str(exc))
    newest = store.run(name).newest if path is None else None
    if path is None and newest is not None and newest.step >= after:
        path = (newest.step, str(newest.path))  # the run ended right after: its final save holds the state
    return _report(name, "saved", path[0] if path else after, path, as_json)


def _ask_and_await(
    store: RunStore, name: str, cmd: str, promised: Callable[[dict[str, Any]], int], exact: bool
) -> tuple[int, tuple[int, str] | None]:
    """Send `cmd` and wait for the checkpoint its reply promises: at exactly that step (pause) or at any
    step from it on (save). (the promised step, (step, path) of the checkpoint or None); raises NotDone."""
    try:
        asked = _ask(store, name, cmd)
    except UserError:  # no such run on disk: unless a process is about to create it
        if starting_status(store.run_dir(validate_run_name(name))) is None:
            raise
        asked = None
    if asked is None:
        starting = starting_status(store.run_dir(name))
        if starting is not None:  # it takes commands once it holds the run's lock, after data preparation
            raise NotDone(f"cannot {cmd} {name} yet: it is {_doing(starting)} (pid {starting.get('pid')}); try again")
        state = disk_status(store, name)["state"]
        raise NotDone(f"cannot {cmd} {name}: it is not running (status: {state})")
    client, reply = asked
    with client:
        if not reply.get("ok"):
            raise NotDone(f"cannot {cmd} {name}: {reply.get('error')}")
        step = promised(reply)
        return step, _await_checkpoint(client, store, name, (lambda s: s == step) if exact else (lambda s: s >= step))


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
                raise NotDone(f"{name} failed at step {event.get('step')}: {event.get('message')}")
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


def status(store: RunStore, name: str, *, as_json: bool) -> int:
    """The live status when a process serves the run (also one still preparing data), else what the disk
    says. A live process reports what it did since it started; the disk fills in what came before it (the
    checkpoint it resumed from, the last eval) until it makes newer ones."""
    validate_run_name(name)
    asked = _ask(store, name, "status") if store.exists(name) or (store.run_dir(name) / LOG_NAME).exists() else None
    live = starting_status(store.run_dir(name)) if asked is None else reply_status(*asked)
    if live is None:
        run_dir_of(store, name)  # no run and no process: "no run named ..."
        record = disk_status(store, name)
    else:
        record = {"live": True, **live}
        if store.exists(name):
            _fill_from_disk(record, store, name)
    if as_json:
        print(json.dumps(json_safe(record), allow_nan=False))
    else:
        print(_status_line(record))
    return 0


def _fill_from_disk(record: dict[str, Any], store: RunStore, name: str) -> None:
    """A resumed process reports only what it did itself: until its first logged step, save and eval, the
    disk's step count, loss, newest checkpoint and last eval stand."""
    info = store.run(name)
    newest = info.newest
    ckpt = record.get("last_checkpoint")
    known = ckpt.get("step") if isinstance(ckpt, dict) else None
    if newest is not None and (not isinstance(known, int) or known < newest.step):
        record["last_checkpoint"] = {"step": newest.step, "path": str(newest.path)}
    if record.get("max_steps") is None:
        record["max_steps"] = info.config.get("train", {}).get("max_steps")
    if record.get("loss") is None and newest is not None and record.get("step") == newest.step:
        record["loss"] = newest.loss  # the loss at the step it resumed from
    if record.get("eval_loss") is None:
        record["eval_loss"] = newest_eval(store, name)
    record["restarts"] = info.restarts  # torchrun restarts, requeues, --auto-resume continuations


def _doing(r: dict[str, Any]) -> str:
    """What a process that has not started training yet is doing: 'preparing data: tokenizing 30%'."""
    prep = r.get("preparing")
    if isinstance(prep, dict) and isinstance(prep.get("stage"), str):
        return fmt.preparing(prep["stage"], int(prep.get("done") or 0), prep.get("total"))
    return "starting"


def _status_line(r: dict[str, Any]) -> str:
    ckpt = r.get("last_checkpoint")
    if r.get("live") and r.get("state") == "Starting":  # before the first step: what it is doing
        parts = [str(r.get("run")), _doing(r)]
        if ckpt:
            parts.append(f"last checkpoint {ckpt['step']}")
        return "  ".join([*parts, f"pid {r.get('pid')}"])
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
    if r.get("restarts"):
        parts.append(fmt.plural(int(r["restarts"]), "restart"))
    if r.get("live"):
        parts.append(f"pid {r.get('pid')}")
    if r.get("failure"):
        parts.append(f"failed: {r['failure']}")
    return "  ".join(parts)


def detach(argv: Sequence[str], store: RunStore, run: str, *, name_option: bool) -> int:
    """Start `tui-trainer <argv> --headless` (minus --detach) in the background, say how to reach it, and
    return at once."""
    pid = spawn_detached(argv, store, run, name_option=name_option)
    log = store.run_dir(run) / LOG_NAME
    where = "" if store.root == Path("runs") else f" --runs-dir {store.root}"
    print(f"{run} is training in the background (pid {pid}); output: {log}")
    print(f"  tui-trainer attach {run}{where}      tui-trainer pause {run}{where}      tail -f {log}")
    return 0
