"""NetSink: ImageWriter's interface (begin_layer/add_run/close, commit, abort) over a Channel.

dump() writes pre-copy rounds and the final round into a sink; this one streams
them to the destination as they are produced, so the network transfer overlaps
the pre-copy rounds instead of following them.

Threads, and why: the dump thread (caller) copies pages into 1 MiB chunks; a
small pool compresses chunks (zstd releases the GIL) while the next is filled;
the sender thread (sender.py) owns the socket while the rounds stream and puts
the frames on the wire in order. Its queue is short, so the caller blocks when
the link is the bottleneck: the copy rate the pre-copy loop measures is then
the link's, and its estimate of the final freeze includes the transfer.

At commit the sender stops and the channel passes back to the caller
(after_commit waits for the destination's RUNNING report on it).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..image.codec import DEFAULT_LEVEL, Compressor
from ..units import PAGE_SIZE
from . import faults, protocol
from .channel import Channel
from .errors import DestinationFailed, ProtocolError, TransportError, TransportTimeout
from .sender import Item, Sender, handle_incoming

PROGRESS_EVERY = 2.0  # seconds between progress lines within a long round


@dataclass(frozen=True)
class LayerReport:
    """What NetLayer.close() returns (the pre-copy loop reads bytes_stored)."""

    layer: int
    pages: int
    chunks: int
    bytes_raw: int
    bytes_stored: int  # bytes this layer put on the wire, framing included
    seconds: float


@dataclass
class Running:
    """The destination's RUNNING report, plus when we received it."""

    pid: int
    destination_ms: float
    commit_ms: float
    restore_ms: float
    received_at: float
    parts: dict = field(default_factory=dict)  # the destination's breakdown (staged restore)


class NetLayer:
    """One layer (round) being streamed: packs runs into chunks for the sender."""

    def __init__(self, sink: NetSink, layer: int):
        self.sink = sink
        self.layer = layer
        self._t0 = time.monotonic()
        self._wire0 = sink.ch.bytes_sent
        self._buf = bytearray(protocol.CHUNK_BYTES)
        self._fill = 0
        self._runs: list[list[int]] = []
        self._pages = 0
        self._chunks = 0
        self._closed = False
        self._last_report = self._t0

    def add_runs(self, runs, buf) -> None:
        """Several runs whose pages lie back to back in buf (LayerWriter.add_runs)."""
        mv = memoryview(buf).cast("B")
        off = 0
        for vaddr, npages in runs:
            self.add_run(vaddr, mv[off : off + npages * PAGE_SIZE])
            off += npages * PAGE_SIZE
        if off != len(mv):
            raise ValueError(
                f"runs hold {off // PAGE_SIZE} pages but the buffer has {len(mv)} bytes"
            )

    def add_run(self, vaddr: int, buf) -> None:
        """Copy the pages of one run (the caller may reuse buf afterwards)."""
        if self._closed:
            raise RuntimeError(f"layer {self.layer} is closed")
        mv = memoryview(buf).cast("B")
        if len(mv) % PAGE_SIZE or vaddr % PAGE_SIZE:
            raise ValueError(f"run at 0x{vaddr:x}: not whole pages")
        self._pages += len(mv) // PAGE_SIZE
        while mv:
            take = min(len(mv), protocol.CHUNK_BYTES - self._fill)
            self._buf[self._fill : self._fill + take] = mv[:take]
            n = take // PAGE_SIZE
            last = self._runs[-1] if self._runs else None
            if last is not None and last[0] + last[1] * PAGE_SIZE == vaddr:
                last[1] += n
            else:
                self._runs.append([vaddr, n])
            self._fill += take
            vaddr += take
            mv = mv[take:]
            if self._fill == protocol.CHUNK_BYTES:
                self._seal()

    def _seal(self) -> None:
        data = memoryview(self._buf)[: self._fill]
        runs = [(a, n) for a, n in self._runs]
        layer, ulen = self.layer, self._fill
        fut = self.sink.pool.submit(self.sink.compressor.compress, data)
        self._buf = bytearray(protocol.CHUNK_BYTES)  # the pool owns the old one now
        self._fill = 0
        self._runs = []
        self._chunks += 1
        self._maybe_report()

        def build() -> tuple[int, Any]:
            frame, crc = fut.result()
            return protocol.PAGES, protocol.encode_chunk(layer, runs, frame, crc, ulen)

        self.sink.sender.put(Item(build))

    def _maybe_report(self) -> None:
        """A progress line now and then during a long round (from the dump thread, so it
        can never come after the final error line)."""
        now = time.monotonic()
        if self.sink.progress is None or now - self._last_report < PROGRESS_EVERY:
            return
        self._last_report = now
        sent = self.sink.ch.bytes_sent - self._wire0
        mib = float(1 << 20)
        self.sink.progress(
            f"round {self.layer:>2}: {self._pages * PAGE_SIZE / mib:.1f} MiB copied so far, "
            f"{sent / mib:.1f} MiB on the wire, {sent / mib / (now - self._t0):.1f} MiB/s"
        )

    def close(self) -> LayerReport:
        """Send the rest and the layer's end, and wait until it is all on the wire."""
        if self._fill:
            self._seal()
        self._closed = True
        end = protocol.encode(
            protocol.LAYER_END, layer=self.layer, pages=self._pages, chunks=self._chunks
        )
        # A pre-copy layer waits for the destination's LAYER_ACK: its backlog is then empty
        # when the final round starts (nothing queues ahead of the FROZEN marker), and the
        # copy rate the pre-copy loop measures is what the destination really absorbs.
        # The final layer does not wait: the process state follows at once.
        final = self.sink.frozen_for_ms is not None
        ack = None if final else (lambda layer=self.layer: self.sink.wait_ack(layer))
        self.sink.sender.put(Item(lambda: (protocol.LAYER_END, end), ack))
        self.sink.sender.flush()
        report = LayerReport(
            layer=self.layer, pages=self._pages, chunks=self._chunks,
            bytes_raw=self._pages * PAGE_SIZE, bytes_stored=self.sink.ch.bytes_sent - self._wire0,
            seconds=time.monotonic() - self._t0,
        )  # fmt: skip
        self.sink.layers.append(report)
        return report


@dataclass
class FreezeClock:
    """When the target was (about to be) frozen: the controller stamps the end of every
    round callback, and dump() freezes right after the last one returns."""

    last_round_end: float = field(default_factory=time.monotonic)

    def stamp(self) -> None:
        self.last_round_end = time.monotonic()


class NetSink:
    """The network image writer handed to dump(sink=...)."""

    def __init__(
        self,
        ch: Channel,
        pid: int,
        clock: FreezeClock,
        *,
        level: int | None = None,
        threads: int = 2,
        restore_timeout: float = 300.0,
        progress: Callable[[str], None] | None = None,
        layout: Callable[[], list] | None = None,
        target_frozen: Callable[[], bool] = lambda: False,
    ):
        """layout: the target's VMAs (model Vmas) as of now, sent before each round's
        pages so the destination stages the process; None: no layouts, the destination
        assembles an image and restores it at the end. target_frozen: is the target in
        our ptrace stop now (then the layer begun is the final one)? The orchestrator
        (api/migrate.py) provides both: the wire does not read processes."""
        self.ch = ch
        self.layouts = layout is not None
        self._read_layout = layout
        self._target_frozen = target_frozen
        self.pid = pid
        self.clock = clock
        self.restore_timeout = restore_timeout
        self.progress = progress
        self.compressor = Compressor(DEFAULT_LEVEL if level is None else level)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-zstd")
        self.sender = Sender(ch)
        self.layers: list[LayerReport] = []
        self.frozen_for_ms: float | None = None  # source: freeze → FROZEN marker on the wire
        self.running: Running | None = None
        self.committed = False  # the final state went out: the destination may restore
        self.abort_sent = False  # ABORT handed to the kernel (delivery is not confirmed)
        self._next = 0
        self._state = "streaming"  # → committed → (done | aborted)
        self.state_sent_at: float | None = None  # monotonic: the STATE frame went out

    # -- ImageWriter's interface ------------------------------------------------------------

    def begin_layer(self) -> NetLayer:
        if self._state != "streaming":
            raise RuntimeError(f"sink is {self._state}")
        if self.frozen_for_ms is None and self._target_frozen():
            self._send_frozen()
        layer = self._next
        self._next += 1
        self.ch.doing = (
            "sending the final round" if self.frozen_for_ms is not None
            else f"sending pre-copy round {layer}"
        )  # fmt: skip
        extra = {"vmas": protocol.encode_layout(self._read_layout())} if self.layouts else {}
        begin = protocol.encode(protocol.LAYER_BEGIN, layer=layer, pid=self.pid, **extra)
        if len(begin) > protocol.max_payload(protocol.LAYER_BEGIN):
            raise ProtocolError(f"the memory layout is too large to send ({len(begin)} bytes)")
        self.sender.put(Item(lambda: (protocol.LAYER_BEGIN, begin)))
        return NetLayer(self, layer)

    def commit(self, state: dict, meta: dict | None = None) -> str:
        """Send the process state (the image is complete); the channel returns to us."""
        if self.frozen_for_ms is None:
            self._send_frozen()
        payload = protocol.encode(protocol.STATE, state=state, meta=meta or {})
        if len(payload) > protocol.max_payload(protocol.STATE):
            raise ProtocolError(f"the process state is too large to send ({len(payload)} bytes)")
        self.ch.doing = "sending the process state"

        def sent() -> None:
            self.state_sent_at = time.monotonic()
            self.committed = True

        self.sender.put(Item(lambda: (protocol.STATE, payload), sent))
        self.sender.stop(drain=True)
        self.pool.shutdown(wait=True)
        self._state = "committed"
        return str(self.ch.peer)

    def abort(self) -> None:
        """dump() failed (or after_commit raised): tell the destination, drop the stream.

        Called while the target may still be frozen, so never wait long here.
        """
        if self._state in ("aborted", "done"):
            return
        self._state = "aborted"
        exc = sys.exc_info()[1]
        reason = str(exc) if isinstance(exc, Exception) and str(exc) else "the source gave up"
        ended = self.sender.stop(drain=False, timeout=0.5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        # Tell the destination, if the channel still works: then it never runs its copy,
        # even if it was about to (it kills a copy it restored on ABORT instead of DONE).
        if ended and self.sender.error is None and not self.ch.closed:
            try:
                self.ch.sock.settimeout(1.0)
                self.ch.send(protocol.ABORT, protocol.encode(protocol.ABORT, reason=reason))
                self.abort_sent = True
            except Exception:
                pass
        self.ch.close(abrupt=not ended)

    def wait_ack(self, layer: int) -> None:
        """Sender thread: block until the destination has stored `layer`."""
        while True:
            f = self.ch.recv()
            if f.type == protocol.LAYER_ACK:
                got = protocol.decode(f.type, f.payload)["layer"]
                if got != layer:
                    raise ProtocolError(f"{self.ch.peer} acknowledged layer {got}, not {layer}")
                return
            handle_incoming(self.ch, f)

    # -- the handover ------------------------------------------------------------------------

    def wait_running(self) -> None:
        """dump()'s after_commit: return once the destination runs the process, else raise
        (dump() then thaws our copy, which keeps running)."""
        self.ch.doing = "waiting for the destination to restore the process"
        deadline = time.monotonic() + self.restore_timeout
        late = TransportTimeout(
            f"the destination {self.ch.peer} did not report the process running "
            f"within {self.restore_timeout:g} s"
        )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise late
            try:
                f = self.ch.recv(timeout=min(self.ch.io_timeout, left))
            except TransportTimeout:
                if left < self.ch.io_timeout:  # the wait was cut short by the deadline
                    raise late from None
                raise
            if f.type == protocol.RUNNING:
                r = protocol.decode(f.type, f.payload)
                self.running = Running(
                    r["pid"], r["destination_ms"], r["commit_ms"], r["restore_ms"],
                    time.monotonic(), dict(r.get("parts") or {}),
                )  # fmt: skip
                return
            if f.type == protocol.ERROR:
                msg = protocol.decode(f.type, f.payload)["message"]
                raise DestinationFailed(f"the destination could not restore the process: {msg}")
            handle_incoming(self.ch, f)

    def done(self) -> bool:
        """Our copy is gone: say so, and close in order. False if the peer did not hear it."""
        self._state = "done"
        try:
            self.ch.doing = "confirming the handover"
            self.ch.send(protocol.DONE, protocol.encode(protocol.DONE))
            ok = True
        except TransportError:
            ok = False
        self.ch.finish(linger=2.0)
        return ok

    # -- the final round's marker --------------------------------------------------------------

    def _send_frozen(self) -> None:
        def build() -> tuple[int, Any]:
            self.frozen_for_ms = (time.monotonic() - self.clock.last_round_end) * 1000
            return protocol.FROZEN, protocol.encode(
                protocol.FROZEN, frozen_for_ms=self.frozen_for_ms
            )

        def after() -> None:
            if faults.active("migrate-cut-final"):  # the connection drops under us
                with contextlib.suppress(OSError):
                    self.ch.sock.shutdown(socket.SHUT_RDWR)
            faults.frozen_hook()

        self.frozen_for_ms = 0.0  # marks "sent" for begin_layer; build() sets the real value
        self.sender.put(Item(build, after))
