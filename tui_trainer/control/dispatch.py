"""What a ControlServer answers: the run's status kept current from its events, and one request line ->
one reply (socket-free, so the whole request vocabulary reads in one place; the README documents it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from tui_trainer import __version__
from tui_trainer.control.protocol import COMMANDS, PROTOCOL, decode
from tui_trainer.core.store import json_safe

ENDED = frozenset({"Paused", "Finished", "Failed", "Stopped"})


class Controllable(Protocol):
    """What the server steers: the Trainer's control surface."""

    def pause(self) -> int: ...

    def save_now(self) -> None: ...

    def stop(self) -> None: ...


class Refused(Exception):
    """A request that cannot apply now; the message is the error reply."""


def new_status(run: str) -> dict[str, Any]:
    """The status of a run that has not reported anything yet."""
    return {
        "run": run,
        "state": "Starting",
        "step": 0,
        "max_steps": None,
        "loss": None,
        "eval_loss": None,
        "tokens_per_s": None,
        "last_checkpoint": None,
        "failure": None,
        "preparing": None,  # while Starting: the data preparation stage {"stage", "done", "total"}
        "pid": os.getpid(),
    }


def note(status: dict[str, Any], event: Any) -> None:
    """Keep the status a `status` request answers (and the hello carries) current."""
    kind, s = type(event).__name__, status
    if kind == "StateChanged":
        s["state"], s["step"] = event.state, event.step
        if event.state != "Starting":
            s["preparing"] = None
    elif kind == "DataProgress":
        s["preparing"] = {"stage": event.stage, "done": event.done, "total": event.total}
    elif kind == "StepLogged":
        s.update(step=event.step, loss=event.loss, tokens_per_s=event.tokens_per_s, max_steps=event.max_steps)
    elif kind == "EvalLogged":
        s["eval_loss"] = event.eval_loss
    elif kind == "CheckpointSaved":
        s["last_checkpoint"] = {"step": event.step, "path": event.path}
    elif kind == "Failed":
        s["failure"] = event.message


def hello(run_dir: Path, run_id: str | None, status: dict[str, Any]) -> dict[str, Any]:
    """The first line every client gets: who serves which run, and its status now."""
    return {
        "hello": "tui-trainer",
        "protocol": PROTOCOL,
        "version": __version__,
        "run": run_dir.name,
        "run_id": run_id,
        "run_dir": str(run_dir.resolve()),
        "pid": os.getpid(),
        "status": snapshot(status),
    }


def snapshot(status: dict[str, Any]) -> dict[str, Any]:
    """The status as standard JSON (a NaN loss becomes null)."""
    return json_safe(dict(status))


def answer(line: bytes, status: dict[str, Any], control: Controllable) -> dict[str, Any] | None:
    """The reply to one request line; None for a blank line (nothing to answer). Never raises: whatever a
    line holds costs an error reply, never the server thread."""
    try:
        return _answer(line, status, control)
    except Exception as exc:  # a bug of ours on some input: that request fails, the channel goes on
        return {"reply": None, "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


def _answer(line: bytes, status: dict[str, Any], control: Controllable) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        request = decode(line)  # depth-limited: 1,000 nested [ is an error reply, not a RecursionError
    except ValueError as exc:  # also undecodable UTF-8
        return {"reply": None, "ok": False, "error": f"malformed JSON: {exc}"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"reply": None, "ok": False, "error": 'expected a JSON object with a "cmd" string'}
    cmd, rid = request["cmd"], request.get("id")
    try:
        fields = _command(cmd, status, control)
    except Refused as exc:
        return {"reply": cmd, "id": rid, "ok": False, "error": str(exc)}
    except Exception as exc:  # the control object failed: say so, keep serving
        return {"reply": cmd, "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"reply": cmd, "id": rid, "ok": True, **fields}


def _command(cmd: str, status: dict[str, Any], control: Controllable) -> dict[str, Any]:
    state, step = status["state"], status["step"]
    if cmd == "status":
        return {"status": snapshot(status)}
    if cmd not in COMMANDS:
        raise Refused(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
    if state in ENDED:
        raise Refused(f"the run is {state.lower()} already, at step {step}")
    if cmd == "pause":
        return {"step": int(control.pause())}  # the step whose checkpoint the pause saves
    if cmd == "save":
        control.save_now()
        return {"after_step": step}  # the save lands at the next step boundary, at or after this
    control.stop()
    return {}
