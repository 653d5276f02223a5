"""The control protocol and where a run's socket lives.

Wire format: UTF-8 JSON objects, one per line (b"\\n"-terminated), both ways, nested at most MAX_DEPTH deep.

- server -> client, first: {"hello": "tui-trainer", "protocol": 2, "version": "0.1.0", "run": ..., "run_id": ...,
  "run_dir": ..., "pid": ..., "status": {...}}, or a refusal {"ok": false, "error": ..., "busy": true|false}
- client -> server: {"cmd": "status" | "pause" | "save" | "stop", "id": <anything, echoed>}
- server -> client: {"reply": <cmd>, "id": ..., "ok": true, ...} or {"reply": ..., "ok": false, "error": "..."}
- server -> client, unasked: every engine event as {"event": <type name>, **fields}, non-finite floats as
  null plus "nonfinite" (the `--json` CLI format)

Location: the socket itself lives in a private per-user directory (sockdir.py; the socket 0600), and
`runs/<run>/control.sock` is a symlink to it: the run dir makes it discoverable, the short target keeps under
the ~107-byte socket-path limit however deep the runs dir is, and the 0700 directory keeps other users from
even reaching it. The link is only a pointer: a client trusts what it reaches only once the peer's uid is its
own and the hello names this run (checks.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import sys
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from tui_trainer.control.sockdir import socket_dirs
from tui_trainer.core import events
from tui_trainer.core.store import json_safe

PROTOCOL = 2  # 2: the hello names run_id and run_dir, which clients check
LINK_NAME = "control.sock"
MAX_LINE = 64 * 1024  # longest request line a server accepts (a command is a few dozen bytes)
# Progress a slow client may miss: a newer one supersedes it. Everything else (state, checkpoints,
# evals, notices, failures, replies) is kept or the client is disconnected.
COALESCABLE = frozenset({"StepLogged", "DeviceSample", "DataProgress"})
COMMANDS = ("pause", "save", "status", "stop")
MAX_DEPTH = 32  # nesting a message may have ([ and {): a request is flat; 1,000 levels would blow the stack


def decode(line: bytes) -> Any:
    """One message line as JSON; ValueError (UnicodeDecodeError included) for malformed or too deeply nested
    input, never RecursionError: a hostile line costs an error reply, not the thread that reads it."""
    try:
        value = json.loads(line)
    except RecursionError:  # the C parser's own guard, ~1,000 levels: a clean exception, caught here
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    if _depth(value) > MAX_DEPTH:  # what parses may still be too deep to echo (json.dumps recurses too)
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # past the limit the answer is known
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def event_record(event: Any) -> dict[str, Any]:
    """An engine event as the `--json` CLI prints it: {"event": type name, **fields}, standard JSON."""
    fields = asdict(event) if is_dataclass(event) and not isinstance(event, type) else {}
    return json_safe({"event": type(event).__name__, **fields})


def socket_name(run_dir: Path) -> str:
    """<hash of the run dir>-<pid>.sock: short, one per process, and groups a run's sockets for cleanup."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return f"{digest}-{os.getpid()}.sock"


def process_sockets(run_dir: Path) -> list[Path]:
    """The sockets processes serving `run_dir` bound (socket_name's <hash>-<pid>.sock), newest first. A
    process preparing data serves one before the run dir's control.sock link appears (`status` finds it).
    Looked for only in directories that are ours and private (sockdir.socket_dirs)."""
    prefix = socket_name(run_dir).rsplit("-", 1)[0]
    found = []
    for directory in socket_dirs():
        with contextlib.suppress(OSError):
            for path in directory.glob(f"{prefix}-*.sock"):
                with contextlib.suppress(OSError):  # gone meanwhile: that process ended
                    found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found, reverse=True)]


def find_socket(run_dir: Path) -> Path | None:
    """The socket a run's control.sock points to (or is), or None when there is none."""
    link = run_dir / LINK_NAME
    if link.is_symlink():
        return run_dir / os.readlink(link)  # an absolute target replaces run_dir
    return link if link.exists() else None


def connect(path: Path, timeout: float = 10.0) -> socket.socket | None:
    """A connected socket, or None when nothing listens there (a stale socket after kill -9 refuses)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


def is_live(path: Path) -> bool:
    sock = connect(path, timeout=1.0)
    if sock is None:
        return False
    sock.close()
    return True


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end, from the kernel (None where the platform cannot say)."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux: struct ucred {pid, uid, gid}
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    if sys.platform == "darwin":  # LOCAL_PEERCRED at SOL_LOCAL: struct xucred {u_int version; uid_t uid; ...}
        creds = sock.getsockopt(0, 0x001, struct.calcsize("2Ih16I"))
        return int(struct.unpack("2I", creds[:8])[1])
    return None


def event_from_record(record: dict[str, Any]) -> Any:
    """The engine event an `event_record` line describes (the inverse of event_record), or None for an
    event type this version does not know (a newer server may add some) or a malformed record."""
    kind = record.get("event")
    cls = getattr(events, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, events.Event)):
        return None
    values = dict(record)
    for name, word in (values.pop("nonfinite", None) or {}).items():
        values[name] = float(word)  # "nan", "inf", "-inf": null on the wire, the float again here
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in known}
    try:
        if "state" in kwargs:
            kwargs["state"] = events.State(kwargs["state"])
        if "kind" in kwargs:
            kwargs["kind"] = events.FaultKind(kwargs["kind"])
        if "notes" in kwargs:
            kwargs["notes"] = tuple(kwargs["notes"] or ())
        return cls(**kwargs)
    except (TypeError, ValueError):
        return None
