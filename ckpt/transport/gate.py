"""Admission at the destination: accept connections until one source authenticates.

The receiver listens until a peer completes the token handshake; everything a
stranger can do before that is bounded:

- Several connections are handled at once, each by its own thread, so an idle
  or slow peer delays nobody. The first to prove the token wins (auth.py asks
  `claim()` right after checking its proof; a second one is told the receiver
  is busy); once its handshake is complete the listener closes and every other
  pending connection is closed.
- Each handshake, TLS included, has one deadline for the whole exchange
  (`receive --handshake-timeout`, default 10 s): the channel bounds every read
  by what is left of it, and a watchdog shuts the socket down when it passes
  (a TLS handshake reads on its own).
- Before authentication a frame may be at most protocol.PREAUTH_MAX bytes
  (channel.py refuses a longer length before reading anything), and at most
  MAX_PENDING connections (MAX_PENDING_PER_HOST from one address) may be
  unauthenticated at a time: beyond that a new one is closed at once.
- Failed handshakes are rate-limited per address (FailureLimiter: FAIL_BURST
  at once, then one every FAIL_EVERY s): a connection from an address over its
  budget is refused before any handshake (it gets a REFUSED frame that says
  when to retry).
- Every refusal is logged as one line, `refused ADDR:PORT: why`; refusals of a
  rate-limited address are summarised (at most one line per LOG_EVERY s).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CkptError
from . import protocol
from .auth import HANDSHAKE_DEADLINE, PeerInfo, server_handshake
from .channel import Channel
from .errors import AuthFailed, Busy, ConnectFailed, TransportError, TransportTimeout
from .net import Address
from .tls import wrap_server

MAX_PENDING = 32  # unauthenticated connections at a time
MAX_PENDING_PER_HOST = 8
FAIL_BURST = 5  # failed handshakes an address may have at once ...
FAIL_EVERY = 2.0  # ... then one per this many seconds
LOG_EVERY = 5.0  # seconds between two log lines about one rate-limited address
REFUSE_LINGER = 1.0  # seconds a refused connection may take to read our REFUSED


class FailureLimiter:
    """A token bucket of failed handshakes per address: `burst` at once, then one per
    `every` seconds. An address whose bucket is empty is refused before any handshake."""

    def __init__(
        self,
        burst: int = FAIL_BURST,
        every: float = FAIL_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.burst = float(burst)
        self.every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # host -> (tokens, when)

    def _level(self, host: str, now: float) -> float:
        tokens, when = self._tokens.get(host, (self.burst, now))
        return min(self.burst, tokens + (now - when) / self.every)

    def wait(self, host: str) -> float:
        """Seconds until `host` may try again (0: now)."""
        with self._lock:
            level = self._level(host, self._clock())
        return 0.0 if level >= 1 else (1 - level) * self.every

    def failed(self, host: str) -> None:
        with self._lock:
            now = self._clock()
            self._tokens[host] = (self._level(host, now) - 1, now)
            if len(self._tokens) > 4096:  # forget addresses whose bucket is full again
                full = [h for h in self._tokens if self._level(h, now) >= self.burst]
                for h in full:
                    del self._tokens[h]


@dataclass
class Admitted:
    """The authenticated source: its channel (protected from now on) and its HELLO."""

    ch: Channel
    info: PeerInfo
    peer: str


@dataclass(eq=False)
class _Pending:
    """One connection not authenticated yet."""

    sock: socket.socket
    peer: str
    host: str
    waker: socket.socket  # a dup of sock: shutting it down wakes the handshake thread
    why_closed: str = ""  # set when we cut it: the deadline passed, another source won
    done: bool = False
    counted: bool = False  # its failure is in the rate limiter already
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cut(self, why: str) -> bool:
        """Shut the connection down under the handshake thread (once, if still running)."""
        with self.lock:
            if self.done or self.why_closed:
                return False
            self.why_closed = why
        with contextlib.suppress(OSError):
            self.waker.shutdown(socket.SHUT_RDWR)
        return True

    def finish(self) -> bool:
        """The handshake thread is done with it; False if it was cut first."""
        with self.lock:
            self.done = True
            return not self.why_closed


class Gate:
    """Runs the accept loop; see the module docstring."""

    def __init__(
        self,
        server: socket.socket,
        *,
        token: bytes,
        cipher: str,
        report: Callable[[str], None],
        tls_ctx=None,
        io_timeout: float = 20.0,
        deadline: float = HANDSHAKE_DEADLINE,
        limiter: FailureLimiter | None = None,
    ):
        self.server = server
        self.token = token
        self.cipher = cipher
        self.tls_ctx = tls_ctx
        self.io_timeout = io_timeout
        self.deadline = deadline
        self.limiter = limiter or FailureLimiter()
        self._report = report
        self._report_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: set[_Pending] = set()
        self._claimed: _Pending | None = None
        self._winner: Admitted | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._muted: dict[str, tuple[float, int]] = {}  # host -> (last logged, suppressed)
        self.refused = 0
        self.last_error: TransportError | None = None
        self.last_refusal = ""

    # -- the accept loop -------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Admitted:
        """Accept and authenticate until one source is admitted (or `timeout` passes)."""
        end = None if timeout is None else time.monotonic() + timeout
        self.server.setblocking(False)
        try:
            while True:
                with self._lock:
                    if self._winner is not None:
                        break
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise self._no_source(timeout)
                ready, _, _ = select.select([self.server, self._wake_r], [], [], left)
                if self.server in ready:
                    self._accept()
            with self._lock:
                winner = self._winner
                others = [p for p in self._pending if p is not self._claimed]
            for p in others:
                p.cut("another source authenticated first")
            assert winner is not None
            return winner
        finally:
            with contextlib.suppress(OSError):
                self.server.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        try:
            sock, addr = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: say so, and do not spin
            self.log(f"cannot accept a connection: {exc.strerror or exc}")
            time.sleep(0.1)
            return
        sock.setblocking(True)
        host = addr[0]
        peer = str(Address(host, addr[1]))
        with self._lock:
            crowded = len(self._pending) >= MAX_PENDING or (
                sum(p.host == host for p in self._pending) >= MAX_PENDING_PER_HOST
            )
        why = "too many connections waiting to authenticate"
        if not crowded:
            try:
                pending = _Pending(sock, peer, host, sock.dup())
                wait = self.limiter.wait(host)
                target = self._refuse_limited if wait > 0 else self._handshake
                args = (pending, wait) if wait > 0 else (pending,)
                with self._lock:
                    self._pending.add(pending)
                t = threading.Thread(target=target, args=args, name="ckpt-admit", daemon=True)
                try:
                    t.start()
                    return
                except RuntimeError:  # no thread left: like a crowd
                    with self._lock:
                        self._pending.discard(pending)
                    pending.waker.close()
            except OSError as exc:  # no fd left for the waker
                why = f"cannot handle it ({exc.strerror or exc})"
        sock.close()
        self._refusal(host, peer, why, muted=True)

    # -- one connection --------------------------------------------------------------------

    def _handshake(self, p: _Pending) -> None:
        watchdog = threading.Timer(
            self.deadline, p.cut, (f"did not complete the handshake within {self.deadline:g} s",)
        )
        watchdog.daemon = True
        watchdog.start()
        ch = None
        try:
            sock = p.sock
            sock.settimeout(min(self.io_timeout, self.deadline))
            if self.tls_ctx is not None:
                sock = wrap_server(self.tls_ctx, sock, p.peer)
            ch = Channel(sock, p.peer, io_timeout=self.io_timeout)
            info = server_handshake(
                ch, self.token, self.cipher, deadline=self.deadline,
                claim=lambda: self._claim(p), refusing=lambda: self._count(p),
            )  # fmt: skip
        except BaseException as exc:
            watchdog.cancel()
            self._failed(p, ch, exc)
            return
        watchdog.cancel()
        if not p.finish():  # cut right at the end (deadline, or another source won)
            self._failed(p, ch, None)
            return
        with contextlib.suppress(OSError):
            p.waker.close()
        with self._lock:
            self._pending.discard(p)
            self._winner = Admitted(ch, info, p.peer)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"!")

    def _claim(self, p: _Pending) -> bool:
        """First proven source wins; called by server_handshake after the proof checks."""
        with self._lock:
            if self._claimed is not None and self._claimed is not p:
                return False
            self._claimed = p
            return not p.why_closed

    def _count(self, p: _Pending) -> None:
        """A failed attempt of p's address, counted once (before we refuse it, if we do)."""
        if not p.counted:
            p.counted = True
            self.limiter.failed(p.host)

    def _failed(self, p: _Pending, ch: Channel | None, exc: BaseException | None) -> None:
        p.finish()
        with self._lock:
            self._pending.discard(p)
            if self._claimed is p:
                self._claimed = None  # proven, but the handshake did not complete
        if ch is not None:
            ch.close()
        else:
            with contextlib.suppress(OSError):
                p.sock.close()
        with contextlib.suppress(OSError):
            p.waker.close()
        won = p.why_closed == "another source authenticated first" or isinstance(exc, Busy)
        if p.why_closed:
            why = p.why_closed
            err: TransportError = TransportTimeout(why) if not won else Busy(why)
        elif isinstance(exc, TransportError):
            why, err = str(exc), exc
        elif isinstance(exc, CkptError | OSError):
            why = str(exc)
            err = ConnectFailed(why)
        else:  # a bug: say so rather than hide it
            why = f"internal error: {type(exc).__name__}: {exc}"
            err = TransportError(why)
        if not won:
            self._count(p)
            with self._lock:
                self.refused += 1
                self.last_error, self.last_refusal = err, f"{p.peer}: {why}"
        self._refusal(p.host, p.peer, why)

    def _refuse_limited(self, p: _Pending, wait: float) -> None:
        """An address over its failure budget: a REFUSED saying when to retry, no handshake."""
        reason = f"too many failed attempts from {p.host}; rate limited, try again in {wait:.0f} s"
        try:
            p.sock.settimeout(REFUSE_LINGER)
            frame = protocol.encode(protocol.REFUSED, reason=reason, code=AuthFailed.exit_code)
            p.sock.sendall(protocol.PREAMBLE + struct.pack("!BI", protocol.REFUSED, len(frame)))
            p.sock.sendall(frame)
            p.sock.shutdown(socket.SHUT_WR)
            end = time.monotonic() + REFUSE_LINGER  # let it read that before we close
            while time.monotonic() < end and p.sock.recv(4096):
                pass
        except OSError:
            pass
        finally:
            p.finish()
            with self._lock:
                self._pending.discard(p)
            p.sock.close()
            with contextlib.suppress(OSError):
                p.waker.close()
        self._refusal(p.host, p.peer, reason, muted=True)

    # -- logging -----------------------------------------------------------------------------

    def log(self, line: str) -> None:
        with self._report_lock:
            self._report(line)

    def _refusal(self, host: str, peer: str, why: str, *, muted: bool = False) -> None:
        """One line per refusal; `muted` ones (a flood) at most one per LOG_EVERY s per host."""
        if why.startswith(peer + " "):  # "ADDR sent …" → "refused ADDR: it sent …"
            why = "it" + why[len(peer) :]
        if muted:
            now = time.monotonic()
            with self._lock:
                last, skipped = self._muted.get(host, (-LOG_EVERY, 0))
                if now - last < LOG_EVERY:
                    self._muted[host] = (last, skipped + 1)
                    return
                self._muted[host] = (now, 0)
            if skipped:
                why += f" (and {skipped} more from {host} not logged)"
        self.log(f"refused {peer}: {why}")

    def _no_source(self, timeout: float | None) -> TransportError:
        with self._lock:
            err, last, n = self.last_error, self.last_refusal, self.refused
        if err is None:
            return TransportTimeout(f"no source connected within {timeout:g} s")
        msg = (
            f"no source authenticated within {timeout:g} s: refused {n} connection"
            f"{'s' if n != 1 else ''}, the last one {last}"
        )
        try:
            return type(err)(msg)
        except TypeError:
            return TransportTimeout(msg)
