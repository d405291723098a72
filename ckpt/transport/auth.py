"""Mutual authentication by a shared token, before any process data flows.

    source (client)                               destination (server)
    PREAMBLE, HELLO{nonce_c}          ─────►
                                      ◄─────      PREAMBLE, HELLO{nonce_s}
    PROOF{HMAC(T, "client"|ns|nc)}    ─────►      check; wrong → REFUSED, close
                                      ◄─────      PROOF{HMAC(T, "server"|nc|ns)}
    check; wrong → REFUSED, close
    PING (first frame tagged with K)  ─────►      check tag: both sides proved T
    K = HMAC(T, "session"|nc|ns) tags every later frame (channel.py)

Why this shape: the token never crosses the wire, only MACs over fresh random
nonces from both sides (no replay); the role label in each MAC keeps one side's
proof from being reflected as the other's; comparisons use hmac.compare_digest.
The client proves first, so a server never reveals anything to a stranger
beyond its nonce. The session key binds every later frame to this handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import platform
import secrets
import stat
from dataclasses import dataclass

from .. import __version__
from ..errors import UsageError
from . import protocol
from .channel import Channel
from .errors import AuthFailed, ConnectionLost, ProtocolError

MIN_TOKEN_BYTES = 16
MAX_TOKEN_BYTES = 4096
NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 15.0


@dataclass(frozen=True)
class PeerInfo:
    """What the other side said about itself in its HELLO (informational only)."""

    host: str
    kernel: str
    ckpt: str


def load_token(path: str) -> bytes:
    """Read the shared secret; refuse files others can read, and short tokens."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"token file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
        )
    token = data.strip()
    if len(data) > MAX_TOKEN_BYTES:
        raise UsageError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    if len(token) < MIN_TOKEN_BYTES:
        raise UsageError(
            f"token file {path} holds {len(token)} bytes; use at least {MIN_TOKEN_BYTES} "
            f"random bytes (e.g. head -c 32 /dev/urandom | base64 > {path})"
        )
    return token


def _mac(token: bytes, label: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, b"ckpt-migrate " + label + b"\0" + a + b, hashlib.sha256).digest()


def _hello(role: str, nonce: bytes) -> bytes:
    return protocol.encode(
        protocol.HELLO, version=protocol.VERSION, role=role, nonce=nonce, ckpt=__version__,
        host=platform.node(), kernel=platform.release(),
    )  # fmt: skip


def _preamble(ch: Channel) -> None:
    ch.send_raw(protocol.PREAMBLE)
    try:
        got = ch.recv_raw(len(protocol.PREAMBLE), HANDSHAKE_TIMEOUT)
    except ConnectionLost as exc:
        raise ConnectionLost(f"{exc} (does the peer expect TLS? see --tls-ca/--tls-cert)") from None
    if got != protocol.PREAMBLE:
        if got[:1] == b"\x16":  # a TLS record: ClientHello
            raise ProtocolError(
                f"{ch.peer} starts a TLS handshake, but TLS is off here (--tls-cert/--tls-key)"
            )
        if got[:7] == protocol.PREAMBLE[:7]:
            raise ProtocolError(
                f"{ch.peer} speaks migration protocol version {got[7]}, we speak "
                f"{protocol.PREAMBLE[7]}; use the same ckpt version on both hosts"
            )
        raise ProtocolError(f"{ch.peer} does not speak the ckpt migration protocol")


def _peer_hello(ch: Channel, want_role: str) -> tuple[bytes, PeerInfo]:
    f = ch.recv(HANDSHAKE_TIMEOUT)
    if f.type == protocol.REFUSED:
        raise AuthFailed(f"{ch.peer} refused us: {protocol.decode(f.type, f.payload)['reason']}")
    if f.type != protocol.HELLO:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of HELLO")
    h = protocol.decode(f.type, f.payload)
    if h["version"] != protocol.VERSION or h["role"] != want_role:
        raise ProtocolError(
            f"{ch.peer} is not a matching peer (version {h['version']}, role {h['role']!r})"
        )
    if len(h["nonce"]) != NONCE_BYTES:
        raise ProtocolError(f"{ch.peer} sent a malformed nonce")
    return h["nonce"], PeerInfo(h["host"], h["kernel"], h["ckpt"])


def _refuse(ch: Channel, reason: str) -> None:
    try:
        ch.send(protocol.REFUSED, protocol.encode(protocol.REFUSED, reason=reason))
    except Exception:
        pass


def client_handshake(ch: Channel, token: bytes) -> PeerInfo:
    """Source side. Returns the destination's HELLO info once both sides are proven."""
    ch.doing = "authenticating"
    _preamble(ch)
    nc = secrets.token_bytes(NONCE_BYTES)
    ch.send(protocol.HELLO, _hello("source", nc))
    ns, info = _peer_hello(ch, "destination")
    ch.send(protocol.PROOF, protocol.encode(protocol.PROOF, mac=_mac(token, b"client", ns, nc)))
    f = ch.recv(HANDSHAKE_TIMEOUT)
    if f.type == protocol.REFUSED:
        reason = protocol.decode(f.type, f.payload)["reason"]
        raise AuthFailed(f"the destination {ch.peer} refused us: {reason}")
    if f.type != protocol.PROOF:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of its PROOF")
    mac = protocol.decode(f.type, f.payload)["mac"]
    if not hmac.compare_digest(mac, _mac(token, b"server", nc, ns)):
        _refuse(ch, "the destination failed authentication (it does not know our token)")
        raise AuthFailed(
            f"the destination {ch.peer} failed authentication: it does not know our token "
            "(different token files?)"
        )
    ch.authenticate(_mac(token, b"session", nc, ns), "client")
    ch.send(protocol.PING, protocol.encode(protocol.PING))
    return info


def server_handshake(ch: Channel, token: bytes) -> PeerInfo:
    """Destination side. Returns the source's HELLO info once both sides are proven."""
    ch.doing = "authenticating"
    _preamble(ch)
    nc, info = _peer_hello(ch, "source")
    ns = secrets.token_bytes(NONCE_BYTES)
    ch.send(protocol.HELLO, _hello("destination", ns))
    f = ch.recv(HANDSHAKE_TIMEOUT)
    if f.type != protocol.PROOF:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of its PROOF")
    mac = protocol.decode(f.type, f.payload)["mac"]
    if not hmac.compare_digest(mac, _mac(token, b"client", ns, nc)):
        _refuse(ch, "authentication failed (wrong token?)")
        raise AuthFailed(
            f"refused {ch.peer}: it failed authentication (it does not know our token; "
            "different token files?)"
        )
    ch.send(protocol.PROOF, protocol.encode(protocol.PROOF, mac=_mac(token, b"server", nc, ns)))
    ch.authenticate(_mac(token, b"session", nc, ns), "server")
    f = ch.recv(HANDSHAKE_TIMEOUT)  # the client's first tagged frame, or its refusal
    if f.type == protocol.REFUSED:
        reason = protocol.decode(f.type, f.payload)["reason"]
        raise AuthFailed(f"the source {ch.peer} refused us: {reason}")
    if f.type != protocol.PING:
        raise ProtocolError(f"{ch.peer} sent {f.name} to end the handshake")
    return info
