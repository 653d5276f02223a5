"""One client of a ControlServer: its socket, what it sent so far, and its bounded queue of lines to send.

Used on the server thread only. The queue coalesces under pressure: when it is full the oldest progress
event goes first, so a slow reader sees fewer progress lines but never misses a state change or a reply.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

BATCH_BYTES = 65536  # one send() for a burst of lines


class Connection:
    """A non-blocking client socket registered in the server's selector (with itself as the key's data)."""

    def __init__(
        self,
        sock: socket.socket,
        sel: selectors.BaseSelector,
        queue_limit: int,
        on_drop: Callable[[Connection], None],
    ) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out: deque[tuple[bytes, bool]] = deque()  # (line, must keep)
        self.sending: memoryview | None = None  # the batch being written
        self.writing = False  # registered for EVENT_WRITE
        self.closed = False
        self._sel = sel
        self._queue_limit = queue_limit
        self._on_drop = on_drop
        sel.register(sock, selectors.EVENT_READ, self)

    def receive(self) -> list[bytes] | None:
        """The complete lines that arrived (possibly none); None when the client left or broke."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            self.drop()
            return None
        if not data:  # the client is done: answer what it asked, then part
            self.send()
            self.drop()
            return None
        start = len(self.inbuf)
        self.inbuf += data
        lines = []
        while (end := self.inbuf.find(b"\n", start)) >= 0:
            lines.append(bytes(self.inbuf[:end]))
            del self.inbuf[: end + 1]
            start = 0
        return lines

    def queue(self, data: bytes, keep: bool) -> bool:
        """Bounded: drop the oldest progress event first. A client whose queue is all lines it must not
        miss is not reading: False when one more such line comes (the caller counts it, then drops it)."""
        if len(self.out) >= self._queue_limit:
            for i, (_, must_keep) in enumerate(self.out):
                if not must_keep:
                    del self.out[i]
                    break
            else:
                return not keep
        self.out.append((data, keep))
        return True

    def send(self) -> None:
        """Write what the socket takes now; ask the selector for EVENT_WRITE while some is left."""
        while not self.closed:
            if self.sending is None:
                if not self.out:
                    break
                batch, size = [], 0
                while self.out and size < BATCH_BYTES:
                    data, _ = self.out.popleft()
                    batch.append(data)
                    size += len(data)
                self.sending = memoryview(b"".join(batch))
            try:
                sent = self.sock.send(self.sending)
            except (BlockingIOError, InterruptedError):
                self._want_write(True)
                return
            except OSError:  # the client left
                self.drop()
                return
            self.sending = self.sending[sent:] if sent < len(self.sending) else None
        self._want_write(False)

    def flush(self, deadline: float) -> None:
        """At close: write everything queued, blocking until `deadline` (monotonic) at most, then drop."""
        pending = b"".join([bytes(self.sending or b""), *(data for data, _ in self.out)])
        remaining = deadline - time.monotonic()
        if pending and remaining > 0:
            with contextlib.suppress(OSError):
                self.sock.setblocking(True)
                self.sock.settimeout(remaining)
                self.sock.sendall(pending)
        self.drop()

    def gone(self) -> bool:
        """The client hung up and is owed nothing: its EOF is waiting, unread, with no reply pending."""
        if self.out or self.sending:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def drop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_drop(self)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(self.sock)
        self.sock.close()

    def _want_write(self, on: bool) -> None:
        if self.closed or self.writing == on:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self._sel.modify(self.sock, events, self)
        self.writing = on
