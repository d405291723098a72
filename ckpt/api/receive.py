"""The destination side of a live migration, in order.

    listen → accept until one source authenticates (gate.py: (TLS), token handshake,
             several at once, deadline, rate limit)     nothing is done before this
    LAYER_BEGIN{layout} 0 → spawn the restorer, map layout   staged restore (restore/staged.py)
    PAGES… → inflated straight into its memory (pool)        LAYER_ACK once all are in place
    LAYER_BEGIN{layout} k → remap what changed, pages…       per pre-copy round
    FROZEN (downtime clock starts) → final layout + pages    the rest of the restore:
    STATE → zap stale pages, apply_state() → RUNNING{pid}    PINGs keep the source waiting
    DONE → the handover is complete                          ABORT instead: kill our copy
    --keep-images: commit the image (stored chunks as they came), after the handover

Every failure before RUNNING kills the staged process (if any) and leaves no
image; the source keeps its copy. A source that sends no layouts (or
`receive --no-stage`) gets the older path: an image is assembled in a temp dir
(not fsynced: it only lives until the restore has read it) and restored after
the final round.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import CkptError, RestoreError
from ..model import ProcessImage
from ..transport import faults, protocol
from ..transport.auth import HANDSHAKE_DEADLINE, describe_protection
from ..transport.channel import Channel
from ..transport.errors import (
    ConnectionLost,
    ProtocolError,
    ReceiveFailed,
    SourceAborted,
    TlsError,
    TransportError,
    TransportTimeout,
)
from ..transport.gate import Gate
from ..transport.net import Address, listen
from ..transport.tls import TlsOptions, server_context
from .assemble import Assembler, check_image_destination
from .restoring import restore

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
    stage: bool = True  # build the process while the rounds arrive (if the source sends layouts)
    cipher: str = protocol.CIPHER_AEAD  # CIPHER_CLEAR: --insecure-cleartext
    handshake_timeout: float = HANDSHAKE_DEADLINE  # seconds for a whole handshake


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
    image_kept: bool = False
    confirmed: bool = False  # the source said its copy is gone
    staged: bool = False  # built while the rounds arrived (else restored from the image)
    parts: dict = field(default_factory=dict)  # where the destination's time went

    @property
    def downtime_ms(self) -> float:
        return self.source_frozen_ms + self.destination_ms


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
    gate = Gate(
        server, token=opts.token, cipher=opts.cipher, report=report, tls_ctx=ctx,
        io_timeout=opts.io_timeout, deadline=opts.handshake_timeout,
    )  # fmt: skip
    try:
        report(f"listening on {opts.listen}" + (" (TLS)" if ctx else ""))
        admitted = gate.run(opts.accept_timeout)
    except TransportError as exc:
        raise _with_suffix(exc, "nothing was received") from None
    finally:
        server.close()
    ch, info, peer = admitted.ch, admitted.info, admitted.peer
    report(
        f"authenticated {peer} ({info.host}, kernel {info.kernel}, ckpt {info.ckpt}); "
        + describe_protection(ch.cipher, ctx is not None)
    )
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

    asm = Assembler(
        path, opts.level, ack, stage=opts.stage, keep=bool(opts.keep_images),
        new_pid=opts.new_pid,
    )  # fmt: skip
    try:
        _session(ch, asm, opts, result, report, on_running)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.layers = asm.expect
    result.bytes_received = ch.bytes_received
    result.seconds = time.monotonic() - t0
    result.image = path if opts.keep_images and result.image_kept else None
    return result


def _session(ch, asm: Assembler, opts, result, report, on_running) -> None:
    # 1. the stream (staged: the process is built as the rounds arrive)
    try:
        while True:
            ch.doing = f"receiving {asm.round_name()}"
            state = asm.feed(ch.recv())
            if state is not None:
                break
        asm.close()
    except BaseException as exc:
        asm.abort()
        if isinstance(exc, OSError) and not isinstance(exc, CkptError):
            exc = ReceiveFailed(f"cannot store the incoming image: {exc}")
        if not isinstance(exc, ConnectionLost | TransportTimeout | SourceAborted | TlsError):
            _send_error(ch, exc)  # our own failure: the source should hear why
        ch.close()
        if isinstance(exc, CkptError):
            done = "nothing was restored here"
            if asm.staged is not None:
                done += " (the partly built copy was killed)"
            raise _with_suffix(exc, done) from None
        raise
    result.source_pid = int(state["state"].get("pid", 0) or 0)
    result.source_frozen_ms = asm.source_frozen_ms
    result.staged = asm.staged is not None

    # 2. the rest of the restore, while PINGs tell the source we are alive
    try:
        with heartbeat(ch):
            if asm.staged is not None:
                pid = _finish_staged(asm, state, result)
            else:
                pid = _restore_image(asm, state, opts, result)
    except BaseException as exc:
        asm.abort()
        if isinstance(exc, OSError) and not isinstance(exc, CkptError):
            exc = RestoreError(f"restore failed: {exc}")
        _send_error(ch, exc)
        ch.close()
        if isinstance(exc, CkptError):
            raise _with_suffix(exc, "the source keeps running its copy") from None
        raise
    result.pid = pid
    result.destination_ms = (time.monotonic() - asm.frozen_at) * 1000
    _mark_parts(asm, result)
    result.parts["staged"] = result.staged

    # 3. the handover. If the source gave up or vanished while we restored, it never
    # hears RUNNING and keeps (or got back) its copy: ours must go.
    ch.doing = "reporting the process running"
    try:
        _check_still_wanted(ch)
    except TransportError as exc:
        _kill(pid)
        asm.abort()
        ch.close()
        raise _with_suffix(exc, f"killed our copy (PID {pid}); the source keeps its own") from None
    try:
        running = protocol.encode(
            protocol.RUNNING, pid=pid, destination_ms=result.destination_ms,
            commit_ms=result.commit_ms, restore_ms=result.restore_ms, parts=result.parts,
        )  # fmt: skip
        ch.send(protocol.RUNNING, running)
        on_running(pid)
        result.confirmed = _wait_done(ch, report)
    except SourceAborted as exc:
        _kill(pid)
        asm.abort()
        ch.close()
        raise _with_suffix(exc, f"killed our copy (PID {pid}); the source keeps its own") from None
    except TransportError as exc:
        report(
            f"warning: {exc}; keeping process {pid} running here, but the source "
            "did not confirm that it stopped its copy: check the source host"
        )
        result.confirmed = False
    ch.finish(linger=1.0)
    # 4. a kept image is made durable only now: the process did not need to wait for it
    if asm.staged is not None and opts.keep_images:
        t = time.monotonic()
        try:
            asm.commit(state)
            result.image_kept = True
        except (OSError, CkptError) as exc:
            asm.abort_image()
            report(f"warning: process {pid} runs, but the image could not be kept: {exc}")
        result.commit_ms = (time.monotonic() - t) * 1000
    elif opts.keep_images:
        result.image_kept = True


def _finish_staged(asm: Assembler, state: dict, result: ReceiveResult) -> int:
    """Final layout, stale pages dropped, process state; returns the running PID."""
    staged = asm.staged
    assert staged is not None
    try:
        proc = ProcessImage.from_dict(state["state"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"the source sent a malformed process state ({exc})") from None
    t = time.monotonic()
    faults.restore_point()
    timings = staged.finish(proc)
    result.restore_ms = (time.monotonic() - t) * 1000
    result.parts.update({k: round(v, 3) for k, v in timings.items()})
    staged.close()
    return staged.child


def _restore_image(asm: Assembler, state: dict, opts, result: ReceiveResult) -> int:
    """The image path (a source that sends no layouts): commit, then a normal restore."""
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
    return restored.pid


def _mark_parts(asm: Assembler, result: ReceiveResult) -> None:
    """Final-round milestones, in ms after the FROZEN marker arrived."""
    assert asm.frozen_at is not None
    for name, at in asm.marks.items():
        result.parts[f"{name}_at_ms"] = round((at - asm.frozen_at) * 1000, 3)


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
