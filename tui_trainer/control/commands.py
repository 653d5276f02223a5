"""The CLI's control commands: `pause RUN`, `save RUN`, `status RUN [--json]`, and `--detach`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.dispatch import ENDED
from tui_trainer.control.protocol import LINK_NAME, process_sockets
from tui_trainer.core import fmt
from tui_trainer.core.errors import UserError
from tui_trainer.core.plan import RunPlan
from tui_trainer.core.store import RunStore, json_safe, validate_run_name
from tui_trainer.core.store.files import open_regular

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


class NotDone(Exception):
    """A pause or save that did not happen: the run is not running, refused, or failed while we waited
    (exit 1 — not bad input). The message is the error line."""


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
        if _starting_status(store.run_dir(validate_run_name(name))) is None:
            raise
        asked = None
    if asked is None:
        starting = _starting_status(store.run_dir(name))
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


# ---------------------------------------------------------------- status


def status(store: RunStore, name: str, *, as_json: bool) -> int:
    """The live status when a process serves the run (also one still preparing data), else what the disk
    says. A live process reports what it did since it started; the disk fills in what came before it (the
    checkpoint it resumed from, the last eval) until it makes newer ones."""
    validate_run_name(name)
    asked = _ask(store, name, "status") if store.exists(name) or (store.run_dir(name) / LOG_NAME).exists() else None
    live = _starting_status(store.run_dir(name)) if asked is None else _reply_status(*asked)
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


def _reply_status(client: ControlClient, reply: dict[str, Any]) -> dict[str, Any]:
    client.close()
    return dict(reply.get("status") or {})


def _starting_status(run_dir: Path) -> dict[str, Any] | None:
    """The status of a process that serves `run_dir` but has not linked control.sock yet (it is loading the
    engine or preparing data, before it holds the run's lock); None when there is none."""
    for path in process_sockets(run_dir):
        try:  # the same checks as through the link: our uid, a hello that names this run
            client = ControlClient.at(path, run_dir, timeout=2.0)
            if client is not None:  # (None: a socket left by a killed process)
                with client:
                    return _reply_status(client, client.request("status"))
        except (ChannelClosed, UserError, OSError):
            continue  # another user's, too busy, or not this run's: not one we can ask
    return None


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


# ---------------------------------------------------------------- attach


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


# ---------------------------------------------------------------- detach


def detach(argv: Sequence[str], store: RunStore, run: str, *, name_option: bool) -> int:
    """Start `tui-trainer <argv> --headless` (minus --detach) in the background, say how to reach it, and
    return at once."""
    pid = spawn_detached(argv, store, run, name_option=name_option)
    log = store.run_dir(run) / LOG_NAME
    where = "" if store.root == Path("runs") else f" --runs-dir {store.root}"
    print(f"{run} is training in the background (pid {pid}); output: {log}")
    print(f"  tui-trainer attach {run}{where}      tui-trainer pause {run}{where}      tail -f {log}")
    return 0


def _log_tail(log: Path) -> str:
    """The end of our own train.log; a link planted there is neither followed nor echoed."""
    try:
        fd = open_regular(log)
    except OSError:
        return ""
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, 4096, max(0, size - 4096)).decode(errors="replace")
    finally:
        os.close(fd)


def spawn_detached(argv: Sequence[str], store: RunStore, run: str, *, name_option: bool) -> int:
    """Start `tui-trainer <argv> --headless` (minus --detach) in its own session, output to
    runs/<run>/train.log; returns its pid. The run name is fixed here so that the child trains the run
    this command announced."""
    child = [a for a in argv if not _is_detach_flag(a)] + ["--headless"]
    if name_option:  # a new run's name was picked here: pin it, so the child trains the announced run
        child += ["--name", run]
    run_dir = store.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)  # no run.json yet: the child still creates the run
    try:  # never through a planted symlink (it would append our output to its target)
        log_fd = open_regular(run_dir / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as exc:
        raise UserError(f"{run_dir / LOG_NAME}: {exc.strerror}") from None
    with os.fdopen(log_fd, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tui_trainer", *child],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no controlling terminal: closing it or logging out sends no SIGHUP
            env={**os.environ, DETACHED_ENV: "1"},
        )
    proc.returncode = 0  # not ours to wait for; keeps Popen's destructor quiet
    return proc.pid


def plan_argv(store: RunStore, plan: RunPlan) -> list[str]:
    """The command line that makes a process train `plan` (the app's r / b, run detached when attached)."""
    where = ["--runs-dir", str(store.root)]
    if plan.world_size > 1:  # a data-parallel run goes on with as many ranks (launched through torchrun)
        where += ["--nproc", str(plan.world_size)]
    if not plan.new_run or plan.parent is None:
        return ["resume", plan.run, *where]  # the run itself, from its newest checkpoint
    parent, step = plan.parent
    changed = _changed(store.run(parent).config, plan.config.to_dict())
    return ["branch", f"{parent}@{step}", "--name", plan.run, *where, *(a for kv in changed for a in ("--set", kv))]


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`section.key=<TOML value>` for every key whose value differs."""
    out = []
    for section, keys in after.items():
        for key, value in keys.items():
            if (before.get(section) or {}).get(key) != value:
                out.append(f"{section}.{key}={_toml(value)}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


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
        if pid is not None and not _running(pid):
            log = run_dir / LOG_NAME
            lines = _log_tail(log).strip().splitlines()
            raise UserError(f"{run} did not start: {lines[-1] if lines else 'no output'} (see {log})")
        give_up.wait(0.1)
    if give_up.is_set():
        raise UserError(f"stopped waiting for {run}")
    raise UserError(f"{run} did not open its control channel within {timeout:g}s (see {run_dir / LOG_NAME})")


def _running(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, and it exited (reaped now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_detach_flag(arg: str) -> bool:
    # argparse accepts unambiguous prefixes (--det); a detach flag left in the child would fork again
    return len(arg) > 3 and "--detach".startswith(arg)


def detached() -> bool:
    return os.environ.get(DETACHED_ENV) == "1"
