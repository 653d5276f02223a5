"""What a client accepts from a control socket, message by message: a socket is untrusted input.

A run's `control.sock` link may lead anywhere (a copied run dir still points at the original's socket; any
process of the user can listen on a path), so every message is checked for the types the client goes on to
use before anything acts on it. Each check returns "" for a good message, else what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from tui_trainer.control.protocol import COMMANDS
from tui_trainer.core import events

# the status object of a hello and of a `status` reply: field -> accepted types
_NUMBER = (int, float)
STATUS_FIELDS: dict[str, tuple[type, ...]] = {
    "run": (str,),
    "state": (str,),
    "step": (int,),
    "max_steps": (int, type(None)),
    "loss": (*_NUMBER, type(None)),
    "eval_loss": (*_NUMBER, type(None)),
    "tokens_per_s": (*_NUMBER, type(None)),
    "last_checkpoint": (dict, type(None)),
    "failure": (str, type(None)),
    "pid": (int,),
}
# what an ok reply to each command carries: field -> must be a whole number >= 0
REPLY_STEPS = {"pause": "step", "save": "after_step"}
HELLO_FIELDS: dict[str, tuple[type, ...]] = {
    "protocol": (int,),
    "version": (str,),
    "run": (str,),
    "run_id": (str, type(None)),
    "run_dir": (str,),
    "pid": (int,),
    "status": (dict,),
}
NONFINITE = frozenset({"nan", "inf", "-inf"})


def check_hello(message: dict[str, Any]) -> str:
    if message.get("hello") != "tui-trainer":
        return "it is not a tui-trainer hello"
    if not isinstance(message.get("protocol"), int) or isinstance(message.get("protocol"), bool):
        return "the hello has no protocol version"
    return _fields(message, HELLO_FIELDS, "the hello") or check_status(message["status"])


def check_status(status: dict[str, Any]) -> str:
    problem = _fields(status, STATUS_FIELDS, "the status")
    ckpt = status.get("last_checkpoint")
    if not problem and ckpt is not None:
        problem = _fields(ckpt, {"step": (int,), "path": (str,)}, "the status's last_checkpoint")
    return problem


def check_reply(message: dict[str, Any]) -> str:
    """A reply ({"ok": ...}): ok a bool; an error a string; an ok reply the fields its command promises."""
    ok, cmd = message.get("ok"), message.get("reply")
    if not isinstance(ok, bool):
        return f'"ok" is {ok!r}, not true or false'
    if not ok:
        return "" if isinstance(message.get("error"), str) else "a refusal without an error message"
    if cmd not in COMMANDS:
        return f"an ok reply to {cmd!r}, which is no command"
    if cmd in REPLY_STEPS:
        key = REPLY_STEPS[cmd]
        if not _whole(message.get(key)):
            return f"the {cmd} reply's {key} is {message.get(key)!r}, not a step number"
    if cmd == "status":
        status = message.get("status")
        return check_status(status) if isinstance(status, dict) else "the status reply has no status object"
    return ""


def check_event(message: dict[str, Any]) -> str:
    """An event: every field of a known event type present with its type. An unknown type passes (a newer
    server may add some; the client ignores them)."""
    kind = message.get("event")
    if not isinstance(kind, str):
        return "an event without a type name"
    cls = getattr(events, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, events.Event) and dataclasses.is_dataclass(cls)):
        return ""
    nonfinite = message.get("nonfinite") or {}
    if not isinstance(nonfinite, dict) or not all(v in NONFINITE for v in nonfinite.values()):
        return f"a {kind} event with a malformed nonfinite map"
    for f, accepted in _event_fields(cls).items():
        if f.name not in message:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                return f"a {kind} event without {f.name}"
            continue
        value = message[f.name]
        if value is None and f.name in nonfinite and float in accepted:
            continue  # a NaN or inf, sent as null
        if not _is(value, accepted):
            return f"a {kind} event whose {f.name} is {_short(value)}"
    return ""


def names_run(hello: dict[str, Any], run_dir: Path, run_id: str | None) -> bool:
    """The hello is from the process training the run in `run_dir`: same name, same directory (a copy of it,
    or a run of that name in another runs dir, is another directory), and the same run id where both know
    one (none: a run made before ids, or a process that has not created its run yet)."""
    if hello["run"] != run_dir.name:
        return False
    if run_id is not None and hello["run_id"] is not None and hello["run_id"] != run_id:
        return False
    try:
        return os.path.samefile(hello["run_dir"], run_dir)
    except FileNotFoundError:  # a new run's process, before it made the dir: the same path, then
        return not run_dir.exists() and hello["run_dir"] == str(run_dir.resolve())
    except (OSError, ValueError):  # unreadable, or a path with a NUL in it
        return False


def _fields(record: dict[str, Any], spec: dict[str, tuple[type, ...]], what: str) -> str:
    for key, accepted in spec.items():
        if key not in record:
            return f"{what} has no {key}"
        if not _is(record[key], accepted):
            return f"{what}'s {key} is {_short(record[key])}"
    return ""


def _is(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true is a Python int: never a step or a loss
        return bool in accepted
    if isinstance(value, float) and not math.isfinite(value):
        return False  # the wire sends null for these
    return isinstance(value, accepted)


def _whole(value: Any) -> bool:
    return _is(value, (int,)) and value >= 0


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_EVENT_FIELDS: dict[str, dict[dataclasses.Field[Any], tuple[type, ...]]] = {}


def _event_fields(cls: type) -> dict[dataclasses.Field[Any], tuple[type, ...]]:
    """Each field of an event dataclass with the JSON types its annotation accepts (worked out once)."""
    if cls.__name__ not in _EVENT_FIELDS:
        hints = typing.get_type_hints(cls)
        _EVENT_FIELDS[cls.__name__] = {f: _json_types(hints[f.name]) for f in dataclasses.fields(cls)}
    return _EVENT_FIELDS[cls.__name__]


def _json_types(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _json_types(arg))
    if hint is type(None):
        return (type(None),)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return (str,)  # checked for its value where it is turned back into the enum
    if typing.get_origin(hint) is tuple or hint is tuple:
        return (list,)
    if hint is float:
        return (int, float)
    return (hint,)
