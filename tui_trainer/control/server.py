"""ControlServer: serves one live run's control socket on its own thread.

The training side only ever calls publish(event): an append to a deque (and, for the rare events that
must not wait for the next tick, one non-blocking byte into a wake pipe). Everything else — accepting,
checking the peer's uid, parsing requests, encoding events, per-client queues — happens on the server
thread, so no client, however hostile, can block or break training.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tui_trainer import __version__
from tui_trainer.control.protocol import (
    COALESCABLE,
    COMMANDS,
    LINK_NAME,
    MAX_LINE,
    PROTOCOL,
    encode,
    event_record,
    find_socket,
    is_live,
    peer_uid,
    runtime_dir,
    socket_name,
)
from tui_trainer.core.store import json_safe

ENDED = frozenset({"Paused", "Finished", "Failed", "Stopped"})


class Controllable(Protocol):
    """What the server steers: the Trainer's control surface."""

    def pause(self) -> int: ...

    def save_now(self) -> None: ...

    def stop(self) -> None: ...


class _Refused(Exception):
    """A request that cannot apply now; the message is the error reply."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    out: deque[tuple[bytes, bool]] = field(default_factory=deque)  # (line, must keep)
    sending: memoryview | None = None  # the batch being written
    writing: bool = False  # registered for EVENT_WRITE
    closed: bool = False


class ControlServer:
    """Serve `control` (pause/save_now/stop) and the events passed to publish() for the run in `run_dir`.

    start() binds the socket in the private runtime dir; the run dir's `control.sock` link appears once
    an event shows the trainer left Starting (by then it holds the run's lock, so it never displaces the
    socket of another process training that run, and bad input leaves nothing in the runs dir).
    """

    TICK_S = 0.05  # progress events wait at most this long; state changes and replies go at once
    FLUSH_S = 1.0  # at close, how long queued events (the final state) may take to reach clients
    TOUCH_EVERY_S = 3600.0  # keep age-based /tmp cleaners off a weeks-long run's socket

    def __init__(
        self,
        run_dir: Path,
        control: Controllable,
        *,
        allowed_uid: int | None = None,
        queue_limit: int = 1024,
        max_clients: int = 64,
        inbox_limit: int = 10_000,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.control = control
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.queue_limit = queue_limit
        self.max_clients = max_clients
        self.inbox_limit = inbox_limit
        self.path: Path | None = None
        self.status: dict[str, Any] = {
            "run": self.run_dir.name,
            "state": "Starting",
            "step": 0,
            "max_steps": None,
            "loss": None,
            "eval_loss": None,
            "tokens_per_s": None,
            "last_checkpoint": None,
            "failure": None,
            "pid": os.getpid(),
        }
        self.refused = 0  # connections turned away (wrong uid, too many clients)
        self.cut_off = 0  # clients disconnected for not reading or sending garbage
        self._inbox: deque[Any] = deque()
        self._clients: set[_Client] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # closed only with this object: a publish racing close() must never write to a reused fd number
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._wake_pending = False
        self._running = False
        self._closing = False
        self._linked = False
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._last_touch = time.monotonic()

    # ------------------------------------------------------------ any thread

    def start(self) -> Path:
        """Bind the socket and start serving; raises OSError when the socket cannot be made."""
        directory = runtime_dir()
        name = socket_name(self.run_dir)
        self._clean_stale(directory, name.rsplit("-", 1)[0])
        path = directory / name
        path.unlink(missing_ok=True)  # a previous process with our pid
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o600)  # the 0700 directory already shuts others out; this says so twice
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            path.unlink(missing_ok=True)
            raise
        self.path, self._listener = path, listener
        self._sel.register(listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="control-server", daemon=True)
        self._thread.start()
        return path

    def publish(self, event: object) -> None:
        """Hand an engine event to the server: O(1), never blocks, never raises (training thread)."""
        try:
            if not self._running:
                return
            coalescable = type(event).__name__ in COALESCABLE
            if coalescable and len(self._inbox) >= self.inbox_limit:
                return  # the server thread is behind: a newer progress event will follow
            self._inbox.append(event)
            if not coalescable and not self._wake_pending:
                self._wake_pending = True
                os.write(self._wake_w, b"\0")
        except Exception:
            pass

    def close(self) -> None:
        """Deliver what is queued (briefly), disconnect every client (they see EOF), remove the socket."""
        if self._thread is None:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout=self.FLUSH_S + 10)
        self._thread = None

    # ------------------------------------------------------------ server thread

    def _serve(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._sel.select(self.TICK_S):
                    self._ready(key, mask)
                self._drain()
                self._maintain()
            self._drain()
            self._flush_all()
        except Exception:
            pass  # the server is a convenience: whatever broke it, training goes on without it
        finally:
            self._running = False
            self._teardown()

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            self._wake_pending = False  # before draining: a publish from now on wakes us again
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
        else:
            client: _Client = key.data
            if mask & selectors.EVENT_READ:
                self._read(client)
            if not client.closed and mask & selectors.EVENT_WRITE:
                self._send(client)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a burst of connections must not starve the rest of the loop
            try:
                conn, _ = self._listener.accept()
            except OSError:  # BlockingIOError when none is left; EMFILE and friends: try next tick
                return
            conn.setblocking(False)
            reason = self._refusal(conn)
            if reason:
                self.refused += 1
                with contextlib.suppress(OSError):
                    conn.send(encode({"ok": False, "error": reason}))
                conn.close()
                continue
            client = _Client(conn)
            self._clients.add(client)
            self._sel.register(conn, selectors.EVENT_READ, client)
            self._queue(client, encode(self._hello()), keep=True)
            self._send(client)

    def _refusal(self, conn: socket.socket) -> str:
        try:
            uid = peer_uid(conn)
        except OSError:
            uid = None
        if uid is None or uid != self.allowed_uid:
            # checked before anything is read: only the run's owner may watch or steer it
            return f"permission denied: uid {uid} is not the owner of this run"
        if len(self._clients) >= self.max_clients:
            return f"too many clients ({self.max_clients}); try again later"
        return ""

    def _hello(self) -> dict[str, Any]:
        return {
            "hello": "tui-trainer",
            "protocol": PROTOCOL,
            "version": __version__,
            "run": self.run_dir.name,
            "pid": os.getpid(),
            "status": self._status(),
        }

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:  # the client is done: answer what it asked, then part
            self._send(client)
            self._drop(client)
            return
        client.inbuf += data
        start = len(client.inbuf) - len(data)
        while (end := client.inbuf.find(b"\n", start)) >= 0:
            line = bytes(client.inbuf[:end])
            del client.inbuf[: end + 1]
            start = 0
            if len(line) > MAX_LINE:
                self._cut_off(client, f"request line longer than {MAX_LINE} bytes")
                return
            self._handle(client, line)
            if client.closed:
                return
        if len(client.inbuf) > MAX_LINE:
            self._cut_off(client, f"request line longer than {MAX_LINE} bytes")
            return
        self._send(client)

    def _handle(self, client: _Client, line: bytes) -> None:
        if not line.strip():
            return
        try:
            request = json.loads(line)
        except ValueError as exc:  # also undecodable UTF-8
            self._reply(client, {"reply": None, "ok": False, "error": f"malformed JSON: {exc}"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            self._reply(client, {"reply": None, "ok": False, "error": 'expected a JSON object with a "cmd" string'})
            return
        cmd, rid = request["cmd"], request.get("id")
        try:
            fields = self._command(cmd)
        except _Refused as exc:
            self._reply(client, {"reply": cmd, "id": rid, "ok": False, "error": str(exc)})
            return
        except Exception as exc:  # the control object failed: say so, keep serving
            self._reply(client, {"reply": cmd, "id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        self._reply(client, {"reply": cmd, "id": rid, "ok": True, **fields})

    def _command(self, cmd: str) -> dict[str, Any]:
        state, step = self.status["state"], self.status["step"]
        if cmd == "status":
            return {"status": self._status()}
        if cmd not in COMMANDS:
            raise _Refused(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
        if state in ENDED:
            raise _Refused(f"the run is {state.lower()} already, at step {step}")
        if cmd == "pause":
            return {"step": int(self.control.pause())}  # the step whose checkpoint the pause saves
        if cmd == "save":
            self.control.save_now()
            return {"after_step": step}  # the save lands at the next step boundary, at or after this
        self.control.stop()
        return {}

    def _reply(self, client: _Client, message: dict[str, Any]) -> None:
        try:
            data = encode(message)
        except ValueError:  # an "id" with NaN in it: answer without echoing it
            data = encode({"reply": message.get("reply"), "ok": False, "error": "id is not standard JSON"})
        self._queue(client, data, keep=True)

    def _cut_off(self, client: _Client, why: str) -> None:
        self.cut_off += 1
        self._queue(client, encode({"reply": None, "ok": False, "error": f"{why}; disconnecting"}), keep=True)
        self._send(client)
        self._drop(client)

    def _queue(self, client: _Client, data: bytes, keep: bool) -> None:
        """Bounded per client: drop the oldest progress event first; a client whose queue is all events
        it must not miss is not reading, and is disconnected."""
        if len(client.out) >= self.queue_limit:
            for i, (_, must_keep) in enumerate(client.out):
                if not must_keep:
                    del client.out[i]
                    break
            else:
                if keep:
                    self.cut_off += 1
                    self._drop(client)
                return
        client.out.append((data, keep))

    def _send(self, client: _Client) -> None:
        while not client.closed:
            if client.sending is None:
                if not client.out:
                    break
                batch, size = [], 0
                while client.out and size < 65536:  # one syscall for a burst of lines
                    data, _ = client.out.popleft()
                    batch.append(data)
                    size += len(data)
                client.sending = memoryview(b"".join(batch))
            try:
                sent = client.sock.send(client.sending)
            except (BlockingIOError, InterruptedError):
                self._want_write(client, True)
                return
            except OSError:  # the client left
                self._drop(client)
                return
            client.sending = client.sending[sent:] if sent < len(client.sending) else None
        self._want_write(client, False)

    def _want_write(self, client: _Client, on: bool) -> None:
        if client.closed or client.writing == on:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self._sel.modify(client.sock, events, client)
        client.writing = on

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.discard(client)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(client.sock)
        client.sock.close()

    def _drain(self) -> None:
        """Fan the published events out: encoded once, queued per client."""
        while True:
            try:
                event = self._inbox.popleft()
            except IndexError:
                break
            self._note(event)
            if not self._clients:
                continue
            try:
                data = encode(event_record(event))
            except Exception:
                continue
            keep = type(event).__name__ not in COALESCABLE
            for client in list(self._clients):
                self._queue(client, data, keep)
        for client in list(self._clients):
            if client.out and not client.writing:
                self._send(client)

    def _note(self, event: Any) -> None:
        """Keep the status a `status` request answers (and the hello carries) current."""
        kind, s = type(event).__name__, self.status
        if kind == "StateChanged":
            s["state"], s["step"] = event.state, event.step
            if event.state != "Starting" and not self._linked:
                self._link()
        elif kind == "StepLogged":
            s.update(step=event.step, loss=event.loss, tokens_per_s=event.tokens_per_s, max_steps=event.max_steps)
        elif kind == "EvalLogged":
            s["eval_loss"] = event.eval_loss
        elif kind == "CheckpointSaved":
            s["last_checkpoint"] = {"step": event.step, "path": event.path}
        elif kind == "Failed":
            s["failure"] = event.message

    def _status(self) -> dict[str, Any]:
        return json_safe(dict(self.status))

    def _link(self) -> None:
        """Point runs/<run>/control.sock at our socket (atomically), unless a live server owns it."""
        self._linked = True
        assert self.path is not None
        link = self.run_dir / LINK_NAME
        with contextlib.suppress(OSError):
            existing = find_socket(self.run_dir)
            if existing is not None and existing != self.path and is_live(existing):
                return
            tmp = self.run_dir / f".{LINK_NAME}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            os.symlink(self.path, tmp)
            os.replace(tmp, link)

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_touch >= self.TOUCH_EVERY_S and self.path is not None:
            self._last_touch = now
            with contextlib.suppress(OSError):
                os.utime(self.path)
                os.utime(self.path.parent)

    def _flush_all(self) -> None:
        """At close: give every client's queued lines (the final state) up to FLUSH_S in all."""
        deadline = time.monotonic() + self.FLUSH_S
        for client in list(self._clients):
            pending = b"".join([bytes(client.sending or b""), *(data for data, _ in client.out)])
            remaining = deadline - time.monotonic()
            if pending and remaining > 0:
                with contextlib.suppress(OSError):
                    client.sock.setblocking(True)
                    client.sock.settimeout(remaining)
                    client.sock.sendall(pending)
            self._drop(client)

    def _teardown(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
        link = self.run_dir / LINK_NAME
        with contextlib.suppress(OSError):
            if self.path is not None and os.readlink(link) == str(self.path):
                link.unlink()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._sel.close()

    @staticmethod
    def _clean_stale(directory: Path, prefix: str) -> None:
        """Remove sockets this run's earlier processes left behind when killed (connect is refused)."""
        for old in directory.glob(f"{prefix}-*.sock"):
            with contextlib.suppress(OSError):
                if not is_live(old):
                    old.unlink()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Tee:
    """A sink that forwards every event to several sinks; one failing never starves the others."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = list(sinks)

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def __call__(self, event: object) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink(event)
