"""Sender: the one thread that owns the migration socket while the rounds stream.

It sends queued frames strictly in order (a frame may be a compression still in
progress: it waits for it), paces them (the channel's token bucket), sends a
PING when it has been idle for a second, and between two sends reads whatever
the destination said, so an ERROR from it surfaces at once instead of as a
broken pipe later. Its queue is short on purpose: when the link is the
bottleneck the producer blocks, so the copy rate the pre-copy loop measures is
the link's. An `after` hook runs right after an item is on the wire (waiting
for a LAYER_ACK, fault points).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import protocol
from .channel import Channel
from .errors import ConnectionLost, DestinationFailed, ProtocolError, TransportTimeout

HEARTBEAT = 1.0  # seconds of silence before a PING
QUEUE = 4  # frames queued for the sender (≈ 4 MiB of raw pages in flight)


@dataclass
class Item:
    """build() gives (type, payload) when the item's turn comes."""

    build: Callable[[], tuple[int, Any]]
    after: Callable[[], None] | None = None


class Sender:
    """Owns the channel while the rounds stream; see the module docstring."""

    def __init__(self, ch: Channel, *, heartbeat: float = HEARTBEAT, queue: int = QUEUE):
        self.ch = ch
        self.heartbeat = heartbeat
        self.max_queue = queue
        self.error: BaseException | None = None
        self._q: deque[Item] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ckpt-send", daemon=True)
        self._thread.start()

    def put(self, item: Item) -> None:
        with self._cv:
            while len(self._q) >= self.max_queue and self.error is None and not self._stop:
                self._cv.wait(0.5)
            self._raise()
            self._q.append(item)
            self._cv.notify_all()

    def flush(self) -> None:
        """Wait until everything queued is on the wire (or raise the sender's error)."""
        with self._cv:
            while self._q and self.error is None:
                self._cv.wait(0.5)
            self._raise()

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """End the thread (after sending the queue, if drain). True if it ended in time."""
        if drain:
            self.flush()
        with self._cv:
            self._stop = True
            if not drain:
                self._q.clear()
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
        if self._stop:
            raise RuntimeError("sender stopped")

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    idle = self.heartbeat - (time.monotonic() - last)
                    if idle <= 0:
                        break
                    self._cv.wait(idle)
                if self._stop and (not self._q or self.error is not None):
                    return
                item = self._q[0] if self._q else None
            try:
                self._poll_incoming()
                if item is None:
                    self.ch.send(protocol.PING, protocol.encode(protocol.PING))
                else:
                    mtype, payload = item.build()
                    self.ch.send(mtype, payload)
                    if item.after is not None:
                        item.after()
                last = time.monotonic()
            except BaseException as exc:
                with self._cv:
                    self.error = explain(self.ch, exc)
                    self._cv.notify_all()
                return
            with self._cv:
                if self._q and self._q[0] is item:
                    self._q.popleft()
                self._cv.notify_all()

    def _poll_incoming(self) -> None:
        """Read what the destination sent meanwhile: PINGs, or an ERROR that ends it all."""
        while not self.ch.closed and self.ch.readable():
            handle_incoming(self.ch, self.ch.recv())


def handle_incoming(ch: Channel, f) -> None:
    if f.type == protocol.PING:
        return
    if f.type == protocol.ERROR:
        raise DestinationFailed(
            f"the destination {ch.peer} failed: {protocol.decode(f.type, f.payload)['message']}"
        )
    raise ProtocolError(f"{ch.peer} sent an unexpected {f.name} while we were {ch.doing}")


def explain(ch: Channel, exc: BaseException) -> BaseException:
    """A broken send often has a reason waiting in the receive queue: prefer that one."""
    if not isinstance(exc, ConnectionLost | TransportTimeout) or ch.closed:
        return exc
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and ch.readable():
            handle_incoming(ch, ch.recv(timeout=0.5))
    except DestinationFailed as better:
        return better
    except Exception:
        pass
    return exc
