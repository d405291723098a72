"""The destination side of a live migration, in order.

    listen → accept one source → (TLS) → authenticate       nothing is written before this
    LAYER_BEGIN/PAGES/LAYER_END per round → ImageWriter       a normal image, in a temp dir
    FROZEN (downtime clock starts) → final layer → STATE      (or --keep-images DIR)
    commit the image → restore() here → RUNNING{pid}          PINGs keep the source waiting
    DONE → the handover is complete                            ABORT instead: kill our copy

Every failure before RUNNING leaves no process here and, unless --keep-images
was given and the image completed, no image; the source keeps its copy. Layer
files are fsynced in the background as each layer closes, so the commit during
the downtime only has the final layer left to flush.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import CkptError, ImageExists, ImageNotFound
from ..image import ImageWriter, fsio
from ..image.layer_writer import LayerWriter, index_name, pages_name
from ..kernel.native import PAGE_SIZE
from ..restore.run import restore
from . import faults, protocol
from .auth import server_handshake
from .channel import Channel
from .errors import (
    ConnectionLost,
    ProtocolError,
    ReceiveFailed,
    SourceAborted,
    TlsError,
    TransportError,
    TransportTimeout,
)
from .net import Address, accept, listen
from .tls import TlsOptions, server_context, wrap_server

HEARTBEAT = 1.0


@dataclass
class ReceiveOptions:
    listen: Address
    token: bytes
    work_dir: str | None = None
    keep_images: str | None = None
    new_pid: bool = False
    io_timeout: float = 20.0
    accept_timeout: float | None = None
    tls: TlsOptions = field(default_factory=TlsOptions)
    level: int | None = None


@dataclass
class ReceiveResult:
    peer: str
    source_pid: int = 0
    pid: int = 0
    layers: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    source_frozen_ms: float = 0.0  # source: freeze → FROZEN marker sent
    destination_ms: float = 0.0  # here: FROZEN marker received → process running
    commit_ms: float = 0.0
    restore_ms: float = 0.0
    image: str | None = None  # kept image, if --keep-images
    confirmed: bool = False  # the source said its copy is gone

    @property
    def downtime_ms(self) -> float:
        return self.source_frozen_ms + self.destination_ms


def check_image_destination(path: str) -> None:
    """Fail before listening if --keep-images cannot be created (ImageWriter's own rules)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ImageNotFound(f"{parent}: directory does not exist (cannot keep the image there)")
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ImageExists(f"{path}: already exists (choose a new path for --keep-images)")


class Assembler:
    """Turns the frame stream into image layers, enforcing the message order."""

    def __init__(self, path: str, level: int | None, ack: Callable[[int], None]):
        self.path = path
        self.ack = ack
        self.level = level
        self.writer: ImageWriter | None = None
        self.layer: LayerWriter | None = None
        self.expect = 0  # next layer number
        self.pages = self.chunks = 0
        self.frozen_at: float | None = None
        self.frozen_layer = -1  # first layer after FROZEN
        self.source_frozen_ms = 0.0
        self._fsync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-fsync")
        self._fsyncs: list = []

    def round_name(self) -> str:
        if self.frozen_at is not None:
            return "the final round"
        return f"pre-copy round {self.expect}"

    def feed(self, f) -> dict | None:
        """Handle one frame; returns the STATE message when the image is complete."""
        t = f.type
        if t == protocol.PING:
            return None
        if t == protocol.ABORT:
            reason = protocol.decode(t, f.payload)["reason"]
            raise SourceAborted(f"the source aborted the migration: {reason}")
        if t == protocol.PAGES:
            if self.layer is None:
                raise ProtocolError("page chunk outside a layer")
            chunk = protocol.decode_chunk(f.payload)
            if chunk.layer != self.expect:
                raise ProtocolError(f"page chunk of layer {chunk.layer} inside layer {self.expect}")
            self.layer.add_runs(chunk.runs, chunk.data)
            self.chunks += 1
            self.pages += len(chunk.data) // PAGE_SIZE
            return None
        msg = protocol.decode(t, f.payload)
        if t == protocol.LAYER_BEGIN:
            if self.layer is not None or msg["layer"] != self.expect:
                raise ProtocolError(f"layer {msg['layer']} begins, expected {self.expect}")
            if self.expect == 1:
                faults.kill_point("receive-midstream")
            if self.writer is None:
                self.writer = ImageWriter(self.path, level=self.level)
            self.layer = self.writer.begin_layer()
            self.pages = self.chunks = 0
        elif t == protocol.LAYER_END:
            if self.layer is None or msg["layer"] != self.expect:
                raise ProtocolError(f"layer {msg['layer']} ends, but layer {self.expect} is open")
            if (msg["pages"], msg["chunks"]) != (self.pages, self.chunks):
                raise ProtocolError(
                    f"layer {self.expect} ends after {self.pages} pages in {self.chunks} chunks, "
                    f"the source sent {msg['pages']} in {msg['chunks']}"
                )
            self.layer.close()
            self._sync_later(self.expect)
            self.layer = None
            if self.frozen_at is None:
                self.ack(self.expect)
            self.expect += 1
        elif t == protocol.FROZEN:
            if self.layer is not None or self.frozen_at is not None:
                raise ProtocolError("FROZEN marker out of place")
            self.frozen_at = time.monotonic()
            self.frozen_layer = self.expect
            self.source_frozen_ms = float(msg["frozen_for_ms"])
        elif t == protocol.STATE:
            if self.layer is not None or self.frozen_at is None or self.expect <= self.frozen_layer:
                raise ProtocolError("process state before the final round")
            return msg
        else:
            raise ProtocolError(f"unexpected {f.name} from the source")
        return None

    def _sync_later(self, layer: int) -> None:
        """fsync a closed layer now, off the critical path (commit fsyncs again, cheaply)."""
        assert self.writer is not None
        d = self.writer.tmp_path
        for name in (pages_name(layer), index_name(layer)):
            self._fsyncs.append(self._fsync.submit(fsio.fsync_path, os.path.join(d, name)))

    def commit(self, msg: dict) -> None:
        for fut in self._fsyncs:
            try:
                fut.result()
            except OSError:
                pass  # commit() fsyncs again and reports a real failure
        assert self.writer is not None
        self.writer.commit(msg["state"], msg["meta"])
        self._fsync.shutdown(wait=False)

    def abort(self) -> None:
        self._fsync.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.abort()


@contextmanager
def heartbeat(ch: Channel, interval: float = HEARTBEAT):
    """PING the source while we are busy (commit, restore) and not reading the channel."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            try:
                ch.send(protocol.PING, protocol.encode(protocol.PING))
            except Exception:
                return

    t = threading.Thread(target=run, name="ckpt-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def _send_error(ch: Channel, exc: BaseException) -> None:
    """Best effort: tell the source why, so it can say so too."""
    code = exc.exit_code if isinstance(exc, CkptError) else 1
    message = str(exc) or f"the destination stopped ({type(exc).__name__})"
    try:
        ch.sock.settimeout(2.0)
        ch.send(protocol.ERROR, protocol.encode(protocol.ERROR, message=message, code=code))
    except Exception:
        return
    ch.finish(linger=2.0)


def _with_suffix(exc: CkptError, suffix: str) -> CkptError:
    try:
        return type(exc)(f"{exc}; {suffix}", pid=exc.pid, step=exc.step)
    except TypeError:
        return exc


def receive(
    opts: ReceiveOptions,
    report: Callable[[str], None],
    on_running: Callable[[int], None] = lambda pid: None,
) -> ReceiveResult:
    """Receive one process and run it here (as our child); see the module docstring."""
    if opts.keep_images:
        check_image_destination(opts.keep_images)
    ctx = server_context(opts.tls)
    server = listen(opts.listen)
    try:
        report(f"listening on {opts.listen}" + (" (TLS)" if ctx else ""))
        sock, peer = accept(server, opts.accept_timeout)
    finally:
        server.close()
    sock.settimeout(opts.io_timeout)
    if ctx is not None:
        sock = wrap_server(ctx, sock, peer)
    ch = Channel(sock, peer, io_timeout=opts.io_timeout)
    try:
        info = server_handshake(ch, opts.token)
    except TransportError as exc:
        ch.close()
        raise _with_suffix(exc, "nothing was received") from None
    report(f"authenticated {peer} ({info.host}, kernel {info.kernel}, ckpt {info.ckpt})")
    t0 = time.monotonic()
    result = ReceiveResult(peer=peer)
    tmp = None
    if opts.keep_images:
        path = os.path.abspath(opts.keep_images)
    else:
        tmp = tempfile.mkdtemp(prefix="ckpt-receive-", dir=opts.work_dir)
        path = os.path.join(tmp, "image")

    def ack(layer: int) -> None:
        ch.send(protocol.LAYER_ACK, protocol.encode(protocol.LAYER_ACK, layer=layer))

    asm = Assembler(path, opts.level, ack)
    try:
        _session(ch, asm, opts, result, report, on_running)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.layers = asm.expect
    result.bytes_received = ch.bytes_received
    result.seconds = time.monotonic() - t0
    result.image = path if opts.keep_images else None
    return result


def _session(ch, asm: Assembler, opts, result, report, on_running) -> None:
    # 1. the stream
    try:
        while True:
            ch.doing = f"receiving {asm.round_name()}"
            state = asm.feed(ch.recv())
            if state is not None:
                break
    except BaseException as exc:
        asm.abort()
        if isinstance(exc, OSError):
            exc = ReceiveFailed(f"cannot store the incoming image: {exc}")
        if not isinstance(exc, ConnectionLost | TransportTimeout | SourceAborted | TlsError):
            _send_error(ch, exc)  # our own failure: the source should hear why
        ch.close()
        if isinstance(exc, CkptError):
            raise _with_suffix(exc, "nothing was restored here") from None
        raise
    result.source_pid = int(state["state"].get("pid", 0) or 0)
    result.source_frozen_ms = asm.source_frozen_ms

    # 2. commit + restore, while PINGs tell the source we are alive
    try:
        with heartbeat(ch):
            t = time.monotonic()
            try:
                asm.commit(state)
            except OSError as exc:
                raise ReceiveFailed(f"cannot store the incoming image: {exc}") from None
            result.commit_ms = (time.monotonic() - t) * 1000
            t = time.monotonic()
            faults.restore_point()
            restored = restore(asm.path, new_pid=opts.new_pid)
            result.restore_ms = (time.monotonic() - t) * 1000
    except BaseException as exc:
        asm.abort()
        _send_error(ch, exc)
        ch.close()
        if isinstance(exc, CkptError):
            raise _with_suffix(exc, "the source keeps running its copy") from None
        raise
    result.pid = restored.pid
    result.destination_ms = (time.monotonic() - asm.frozen_at) * 1000

    # 3. the handover. If the source gave up or vanished while we restored, it never
    # hears RUNNING and keeps (or got back) its copy: ours must go.
    ch.doing = "reporting the process running"
    try:
        _check_still_wanted(ch)
    except TransportError as exc:
        _kill(restored.pid)
        ch.close()
        raise _with_suffix(
            exc, f"killed our copy (PID {restored.pid}); the source keeps its own"
        ) from None
    try:
        running = protocol.encode(
            protocol.RUNNING, pid=restored.pid, destination_ms=result.destination_ms,
            commit_ms=result.commit_ms, restore_ms=result.restore_ms,
        )  # fmt: skip
        ch.send(protocol.RUNNING, running)
        on_running(restored.pid)
        result.confirmed = _wait_done(ch, report)
    except SourceAborted as exc:
        _kill(restored.pid)
        ch.close()
        raise _with_suffix(
            exc, f"killed our copy (PID {restored.pid}); the source keeps its own"
        ) from None
    except TransportError as exc:
        report(
            f"warning: {exc}; keeping process {restored.pid} running here, but the source "
            "did not confirm that it stopped its copy: check the source host"
        )
        result.confirmed = False
    ch.finish(linger=1.0)


def _check_still_wanted(ch: Channel) -> None:
    """Before RUNNING: read what arrived while we restored (ABORT, EOF) without waiting."""
    while ch.readable():
        f = ch.recv(timeout=1.0)
        if f.type == protocol.ABORT:
            reason = protocol.decode(f.type, f.payload)["reason"]
            raise SourceAborted(f"the source called the handover off: {reason}")
        if f.type != protocol.PING:
            raise ProtocolError(f"unexpected {f.name} from the source during the handover")


def _wait_done(ch: Channel, report) -> bool:
    ch.doing = "waiting for the source to confirm the handover"
    while True:
        f = ch.recv()
        if f.type == protocol.PING:
            continue
        if f.type == protocol.DONE:
            return True
        if f.type == protocol.ABORT:
            reason = protocol.decode(f.type, f.payload)["reason"]
            raise SourceAborted(f"the source called the handover off: {reason}")
        raise ProtocolError(f"unexpected {f.name} from the source during the handover")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
