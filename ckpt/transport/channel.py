"""A framed, authenticated, paced socket: what both sides of a migration talk through.

Why each piece:
- Frames are `type | length | payload`, and the length is checked against the
  type's cap (protocol.max_payload) BEFORE the payload is read: a peer cannot
  make us allocate what it likes.
- After the handshake every frame carries a 16-byte HMAC-SHA256 tag over
  (direction, sequence number, header, payload) under a session key derived from
  the token and both nonces. Without TLS this is what stops a man in the middle
  from injecting, replaying, reordering or truncating frames; with TLS it costs
  little and keeps one code path.
- Sends are paced by an optional token bucket (--max-bandwidth), in slices, so
  the rate is smooth even for megabyte frames.
- Every blocking call has a timeout; a timeout or a broken connection becomes
  TransportTimeout / ConnectionLost naming the peer and what we were doing.
"""

from __future__ import annotations

import hashlib
import hmac
import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass

from . import protocol
from .errors import ConnectionLost, ProtocolError, TlsError, TransportTimeout
from .ratelimit import TokenBucket

_HEAD = struct.Struct("!BI")
TAG_LEN = 16
_SLICE = 256 << 10  # pacing granularity of large frames


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes | bytearray  # a fresh buffer per frame (never copied again)

    @property
    def name(self) -> str:
        return protocol.name(self.type)


class Channel:
    """One connection. Not thread-safe: one thread reads/writes it at a time."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        *,
        io_timeout: float,
        limiter: TokenBucket | None = None,
    ):
        self.sock = sock
        self.peer = peer
        self.io_timeout = io_timeout
        self.limiter = limiter
        self.bytes_sent = 0
        self.bytes_received = 0
        self._mac_out = self._mac_in = None
        self._seq_out = self._seq_in = 0
        self._closed = False
        self.doing = "talking"  # shown in errors: what the connection was used for
        self._lock = threading.Lock()  # only guards close()
        sock.settimeout(io_timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- keys ---------------------------------------------------------------------------

    def authenticate(self, key: bytes, role: str) -> None:
        """From now on every frame is tagged; `role` says which direction is ours."""
        out, inn = (b"c2s", b"s2c") if role == "client" else (b"s2c", b"c2s")
        self._mac_out = hmac.new(key + out, digestmod=hashlib.sha256)
        self._mac_in = hmac.new(key + inn, digestmod=hashlib.sha256)

    def _tag(self, base, seq: int, head: bytes, parts) -> bytes:
        m = base.copy()
        m.update(seq.to_bytes(8, "big"))
        m.update(head)
        for p in parts:
            m.update(p)
        return m.digest()[:TAG_LEN]

    # -- sending -------------------------------------------------------------------------

    def send(self, mtype: int, payload) -> int:
        """Send one frame; `payload` is bytes or a list of buffers. Returns bytes on the wire."""
        parts = payload if isinstance(payload, list) else [payload]
        length = sum(memoryview(p).nbytes for p in parts)
        if length > protocol.max_payload(mtype):
            raise ProtocolError(f"refusing to send an oversized {protocol.name(mtype)} frame")
        head = _HEAD.pack(mtype, length)
        bufs = [head, *parts]
        if self._mac_out is not None:
            bufs.append(self._tag(self._mac_out, self._seq_out, head, parts))
            self._seq_out += 1
        total = length + len(head) + (TAG_LEN if self._mac_out is not None else 0)
        if total <= _SLICE:
            self._sendall(b"".join(bufs))
        else:
            for b in bufs:
                mv = memoryview(b).cast("B")
                for off in range(0, len(mv), _SLICE):
                    self._sendall(mv[off : off + _SLICE])
        return total

    def _sendall(self, data) -> None:
        if self.limiter is not None:
            self.limiter.take(len(data))
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TransportTimeout(
                f"{self.peer} accepted no data for {self.io_timeout:g} s while {self.doing}"
            ) from None
        except ssl.SSLError as exc:
            raise TlsError(f"TLS error talking to {self.peer} while {self.doing}: {exc}") from None
        except OSError as exc:
            raise ConnectionLost(
                f"lost the connection to {self.peer} while {self.doing} ({exc.strerror or exc})"
            ) from None
        self.bytes_sent += len(data)

    # -- receiving -----------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Unframed bytes (the preamble)."""
        self._sendall(data)

    def recv_raw(self, n: int, timeout: float | None = None) -> bytes:
        """Exactly n unframed bytes (the preamble)."""
        return bytes(self._recv_exact(n, first=True, timeout=timeout))

    def readable(self) -> bool:
        """Is a frame (or EOF) waiting? Never blocks."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def recv(self, timeout: float | None = None) -> Frame:
        """Read one frame (waiting at most `timeout`, default the I/O timeout, per read)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            head = self._recv_exact(_HEAD.size, first=True, timeout=timeout)
            mtype, length = _HEAD.unpack(head)
            if length > protocol.max_payload(mtype):
                raise ProtocolError(
                    f"{self.peer} sent a {protocol.name(mtype)} frame of {length} bytes "
                    f"(limit {protocol.max_payload(mtype)})"
                )
            payload = self._recv_exact(length, timeout=timeout)
            # The peer's refusal of our proof comes untagged (it never derived the key).
            refusal = self._seq_in == 0 and mtype == protocol.REFUSED
            if self._mac_in is not None and not refusal:
                tag = self._recv_exact(TAG_LEN, timeout=timeout)
                want = self._tag(self._mac_in, self._seq_in, head, [payload])
                if not hmac.compare_digest(tag, want):
                    raise ProtocolError(
                        f"frame {self._seq_in} from {self.peer} failed authentication "
                        "(tampered with, or not from the authenticated peer)"
                    )
                self._seq_in += 1
        finally:
            if timeout is not None:
                self.sock.settimeout(self.io_timeout)
        return Frame(mtype, payload)

    def _recv_exact(self, n: int, *, first: bool = False, timeout: float | None) -> bytearray:
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(mv[got:], n - got)
            except TimeoutError:
                secs = timeout if timeout is not None else self.io_timeout
                raise TransportTimeout(
                    f"no data from {self.peer} for {secs:g} s while {self.doing}"
                ) from None
            except ssl.SSLError as exc:
                raise TlsError(
                    f"TLS error talking to {self.peer} while {self.doing}: {exc}"
                ) from None
            except OSError as exc:
                raise ConnectionLost(
                    f"lost the connection to {self.peer} while {self.doing} ({exc.strerror or exc})"
                ) from None
            if k == 0:
                where = "" if first and got == 0 else " in the middle of a frame"
                raise ConnectionLost(f"{self.peer} closed the connection{where} while {self.doing}")
            got += k
        self.bytes_received += n
        return buf

    # -- closing -------------------------------------------------------------------------

    def close(self, *, abrupt: bool = False) -> None:
        """Close once. `abrupt` skips the orderly shutdown (used by fault points)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if abrupt:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def finish(self, linger: float = 2.0) -> None:
        """Half-close, then drain what the peer still sends (up to `linger` s) and close.

        Closing with unread data makes the kernel send a reset, which can destroy
        the frame we just sent (our ERROR) before the peer reads it.
        """
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(linger)
            while self.sock.recv(65536):
                pass
        except (OSError, ValueError):
            pass
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed
