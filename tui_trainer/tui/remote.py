"""A run trained by another process, driven over its control channel (`tui-trainer attach`).

RemoteSession offers the screens what TrainingSession does (run / pause / save_now / stop, the same
coalescing messages), so the same widgets draw both. Its worker thread is the channel's only reader: events
go through TrainingSession.sink exactly as an in-process engine's do, and command replies are handed to the
UI thread waiting for them. The UI thread only ever writes to the socket.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from textual.message import Message

from tui_trainer.control.client import ChannelClosed, ControlClient
from tui_trainer.control.protocol import event_from_record
from tui_trainer.core.errors import UserError
from tui_trainer.core.events import State, StateChanged
from tui_trainer.core.launch import restarts_itself
from tui_trainer.core.store import RunStore
from tui_trainer.tui.session import TrainingSession

REPLY_TIMEOUT_S = 2.0  # the server answers from its own thread within a tick; longer means it is gone
_ENDED = frozenset({State.PAUSED, State.FINISHED, State.FAILED, State.STOPPED})


class RemoteSession(TrainingSession):
    """The app's handle on a run another process trains: watch it, pause / save / stop it, or detach."""

    keeps_training = True  # the run goes on without us: quitting detaches instead of pausing

    class Promised(Message):
        """The training process answered a pause: it saves and halts after `step` (None: it refused)."""

        def __init__(self, step: int | None, error: str | None) -> None:
            super().__init__()
            self.step = step
            self.error = error

    def __init__(self, store: RunStore, client: ControlClient, post: Callable[[Message], Any]) -> None:
        run = str(client.hello.get("run"))
        super().__init__(store, None, post, run_name=run)
        self.client = client
        self.pid = client.hello.get("pid")
        self.end_state: State | None = None  # the final state the run reported, if it did
        self.lost = False  # the channel closed without a final state: the process died
        self.detached = False
        self._send_lock = threading.Lock()
        self._next_id = 0
        self._closed = False  # the reader is done: nobody will answer a request any more
        self._waiting: dict[int, queue.SimpleQueue[dict[str, Any]]] = {}
        self._pauses: set[int] = set()  # ids of pause requests whose reply becomes a Promised message

    @property
    def started(self) -> bool:
        return True  # the other process built its engine already: pause and save apply at once

    # ---- worker thread: the channel's only reader

    def run(self) -> str:
        try:
            self._greet(self.client.hello.get("status") or {})
            self._read_until_closed()
            return self._final()
        finally:
            self._answer_all({"ok": False, "error": "the channel closed"})
            self.client.close()
            self.finished.set()

    def _greet(self, status: dict[str, Any]) -> None:
        """The hello's status stands in for the StateChanged events we missed before connecting."""
        with contextlib.suppress(ValueError):
            state = State(str(status.get("state")))
            if state != State.STARTING:
                self._on_event(StateChanged(self.run_name, state, int(status.get("step") or 0)))

    def _read_until_closed(self) -> None:
        while True:
            try:
                message = self.client.next_message(None)
            except (ChannelClosed, UserError, OSError, ValueError):
                return  # EOF, reset, or garbage: either way the channel is done
            if "event" in message:
                event = event_from_record(message)
                if event is not None:
                    self._on_event(event)
            elif "ok" in message:
                self._answer(message)

    def _answer(self, reply: dict[str, Any]) -> None:
        rid = reply.get("id")
        if rid in self._pauses:
            self._pauses.discard(rid)
            step = int(reply["step"]) if reply.get("ok") and "step" in reply else None
            self._post(self.Promised(step, None if reply.get("ok") else str(reply.get("error"))))
            return
        waiter = self._waiting.pop(rid, None)  # type: ignore[arg-type]
        if waiter is not None:
            waiter.put(reply)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, StateChanged) and event.state in _ENDED:
            self.end_state = event.state
        self.sink(event)

    def _final(self) -> str:
        if self.end_state is not None:
            return self.end_state
        if not self.detached:
            self.lost = True
        return State.STOPPED

    # ---- UI thread

    def pause(self) -> int | None:
        """Ask the process to pause; returns the step it promised to save (None if it did not answer)."""
        reply = self._request("pause")
        return int(reply["step"]) if reply.get("ok") and "step" in reply else None

    def pause_later(self) -> None:
        """Ask the process to pause without waiting: the UI says "Pausing" at once (a round trip waits for
        the other process's GIL, often a whole step) and the promised step follows as a Promised message."""
        with self._send_lock:
            self._next_id += 1
            self._pauses.add(self._next_id)
            self.client.send("pause", self._next_id)

    def ask_pause(self) -> tuple[int | None, bool]:
        """The step comes later, as a Promised message: a round trip waits for the other process's GIL."""
        self.pause_later()
        return None, True

    def leave(self) -> None:
        self.detach()

    def end_note(self, store: RunStore) -> str | None:
        """paused / finished / lost, with the newest valid checkpoint (None once we detached)."""
        if self.detached:
            return None
        newest = None
        with contextlib.suppress(UserError):
            newest = store.run(self.run_name).newest
        where = f"newest valid checkpoint {newest.ref}" if newest is not None else "no valid checkpoint"
        if self.lost:
            return f"lost: pid {self.pid} ended without a word (killed?) · {where} · r resumes it"
        state = self.end_state or State.STOPPED
        return f"{state.value.lower()} (pid {self.pid} exited) · {where}"

    def restart_wait(self, store: RunStore) -> str | None:
        """'lost' / 'failed' when the process died but the run restarts itself (--auto-resume, an elastic
        job whose rank 0 reported its peer's failure): the app waits to attach to the successor."""
        failed = self.end_state == State.FAILED
        if self.detached or not (self.lost or failed):
            return None
        try:
            again = restarts_itself(store.read_record(self.run_name), failed=failed)
        except UserError:
            return None
        return ("lost" if self.lost else "failed") if again else None

    def save_now(self) -> None:
        self._send("save")  # the CheckpointSaved event says when it landed

    def stop(self) -> None:
        self._send("stop")

    def detach(self) -> None:
        """Leave the run training: close our end (shutdown wakes the reader blocked in recv)."""
        self.detached = True
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(socket.SHUT_RDWR)

    def _request(self, cmd: str) -> dict[str, Any]:
        waiter: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        rid = self._send(cmd, waiter)
        try:
            return waiter.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            self._waiting.pop(rid, None)
            return {"ok": False, "error": f"no answer from pid {self.pid} in {REPLY_TIMEOUT_S:g}s"}

    def _send(self, cmd: str, waiter: queue.SimpleQueue[dict[str, Any]] | None = None) -> int:
        with self._send_lock:
            self._next_id += 1
            rid = self._next_id
            if waiter is not None:
                if self._closed:
                    waiter.put({"ok": False, "error": "the channel closed"})
                    return rid
                self._waiting[rid] = waiter  # before sending: the reply may beat us back
            self.client.send(cmd, rid)
        return rid

    def _answer_all(self, reply: dict[str, Any]) -> None:
        with self._send_lock:
            self._closed = True
            for waiter in self._waiting.values():
                waiter.put(reply)
            self._waiting.clear()
