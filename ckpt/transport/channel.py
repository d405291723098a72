"""A framed, protected, paced socket: what both sides of a migration talk through.

Why each piece:
- Frames are `type | length | payload`, and the length is checked against the
  type's cap (protocol.max_payload) BEFORE the payload is read: a peer cannot
  make us allocate what it likes. Before the handshake is done only handshake
  messages of at most protocol.PREAUTH_MAX bytes are accepted, so a stranger
  cannot make us allocate more than a few KiB.
- After the handshake every frame is protected under per-direction keys derived
  from the token and both sides' nonces (auth.py):
  * default (AES-256-GCM): the payload is encrypted, the header (type, length)
    is the associated data, the nonce is the direction's frame counter. So the
    stream is confidential, and a frame that was altered, injected, replayed,
    reordered, dropped or moved to the other direction fails to decrypt.
  * --insecure-cleartext: the payload goes in the clear, followed by a 16-byte
    HMAC-SHA256 tag over (counter, header, payload): authenticated, not secret.
- Sends are paced by an optional token bucket (--max-bandwidth), in slices, so
  the rate is smooth even for megabyte frames.
- Every blocking call has a timeout, and the handshake a deadline for the whole
  exchange (set_deadline): a peer dripping one byte at a time cannot hold us.
  A timeout or a broken connection becomes TransportTimeout / ConnectionLost
  naming the peer and what we were doing.
"""

from __future__ import annotations

import hashlib
import hmac
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import protocol
from .errors import ConnectionLost, ProtocolError, TlsError, TransportTimeout
from .ratelimit import TokenBucket

_HEAD = struct.Struct("!BI")
TAG_LEN = 16  # the AEAD tag, or the truncated HMAC with --insecure-cleartext
_SLICE = 256 << 10  # pacing granularity of large frames
_NONCE_PAD = bytes(4)  # AES-GCM nonce: 4 zero bytes | the direction's frame counter (u64)


def _nonce(seq: int) -> bytes:
    return _NONCE_PAD + seq.to_bytes(8, "big")


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
        self.cipher: str | None = None  # set by protect(): protocol.CIPHER_AEAD or CIPHER_CLEAR
        self._aead_out: AESGCM | None = None
        self._aead_in: AESGCM | None = None
        self._mac_out = self._mac_in = None
        self._seq_out = self._seq_in = 0
        self._deadline: float | None = None  # monotonic; the handshake must be over by then
        self._deadline_s = 0.0
        self._closed = False
        self.doing = "talking"  # shown in errors: what the connection was used for
        self._lock = threading.Lock()  # only guards close()
        sock.settimeout(io_timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- keys and deadline ---------------------------------------------------------------

    def protect(self, cipher: str, out_key: bytes, in_key: bytes) -> None:
        """From now on every frame is protected: encrypted (CIPHER_AEAD) or only tagged
        (CIPHER_CLEAR). Each direction has its own 32-byte key and frame counter."""
        if cipher == protocol.CIPHER_AEAD:
            self._aead_out, self._aead_in = AESGCM(out_key), AESGCM(in_key)
        elif cipher == protocol.CIPHER_CLEAR:
            self._mac_out = hmac.new(out_key, digestmod=hashlib.sha256)
            self._mac_in = hmac.new(in_key, digestmod=hashlib.sha256)
        else:
            raise ValueError(f"unknown cipher {cipher!r}")
        self.cipher = cipher

    @property
    def protected(self) -> bool:
        return self.cipher is not None

    def set_deadline(self, seconds: float) -> None:
        """Every read and write must be done within `seconds` from now (the handshake)."""
        self._deadline = time.monotonic() + seconds
        self._deadline_s = seconds

    def clear_deadline(self) -> None:
        self._deadline = None
        self.sock.settimeout(self.io_timeout)

    def _late(self) -> TransportTimeout:
        return TransportTimeout(
            f"{self.peer} did not complete the handshake within {self._deadline_s:g} s"
        )

    def _bound(self, timeout: float | None) -> None:
        """Before a blocking call under a deadline: wait at most what is left of it."""
        if self._deadline is None:
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._late()
        self.sock.settimeout(min(timeout if timeout is not None else self.io_timeout, left))

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
        if self._aead_out is not None:
            # one AEAD call per frame (chunk-sized: OpenSSL does it at GB/s), ciphertext | tag
            plain = parts[0] if len(parts) == 1 else b"".join(parts)
            bufs = [head, self._aead_out.encrypt(_nonce(self._seq_out), plain, head)]
            self._seq_out += 1
        elif self._mac_out is not None:
            bufs = [head, *parts, self._tag(self._mac_out, self._seq_out, head, parts)]
            self._seq_out += 1
        else:
            bufs = [head, *parts]
        total = length + len(head) + (TAG_LEN if self.protected else 0)
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
        self._bound(None)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise self._late() from None
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
            # The peer's refusal of our proof comes unprotected (it never derived the keys).
            plain = not self.protected or (self._seq_in == 0 and mtype == protocol.REFUSED)
            limit = protocol.PREAUTH_MAX if plain else protocol.max_payload(mtype)
            if length > limit:
                raise ProtocolError(
                    f"{self.peer} sent a {protocol.name(mtype)} frame of {length} bytes "
                    f"(limit {limit}{' before authentication' if plain else ''})"
                )
            if plain and mtype not in protocol.HANDSHAKE_TYPES:
                raise ProtocolError(
                    f"{self.peer} sent {protocol.name(mtype)} before authenticating"
                )
            if plain:
                payload = self._recv_exact(length, timeout=timeout)
            elif self._aead_in is not None:
                body = self._recv_exact(length + TAG_LEN, timeout=timeout)
                try:
                    payload = self._aead_in.decrypt(_nonce(self._seq_in), body, head)
                except InvalidTag:
                    raise self._tampered() from None
                self._seq_in += 1
            else:
                payload = self._recv_exact(length, timeout=timeout)
                tag = self._recv_exact(TAG_LEN, timeout=timeout)
                want = self._tag(self._mac_in, self._seq_in, head, [payload])
                if not hmac.compare_digest(tag, want):
                    raise self._tampered()
                self._seq_in += 1
        finally:
            if timeout is not None:
                self.sock.settimeout(self.io_timeout)
        return Frame(mtype, payload)

    def _tampered(self) -> ProtocolError:
        return ProtocolError(
            f"frame {self._seq_in} from {self.peer} failed authentication (tampered with, "
            "replayed, reordered, or not from the authenticated peer)"
        )

    def _recv_exact(self, n: int, *, first: bool = False, timeout: float | None) -> bytearray:
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            self._bound(timeout)
            try:
                k = self.sock.recv_into(mv[got:], n - got)
            except TimeoutError:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    raise self._late() from None
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
