"""The token file, and the mutual handshake that turns it into per-direction keys.

    source (client)                               destination (server)
    PREAMBLE, HELLO{nonce_c, cipher}  ─────►      cipher ≠ ours → REFUSED{code 22}
                                      ◄─────      PREAMBLE, HELLO{nonce_s, cipher}
    th = SHA-256(HELLO_c payload | HELLO_s payload)             (the transcript)
    keys = HKDF-SHA256(IKM = token, salt = nonce_c | nonce_s, info = label | th)
         → proof_c, proof_s, c2s, s2c (32 bytes each)
    PROOF{HMAC(proof_c, th)}          ─────►      check; wrong → REFUSED, close
                                      ◄─────      PROOF{HMAC(proof_s, th)}
    check; wrong → REFUSED, close
    PING (first protected frame)      ─────►      decrypts: both sides hold the keys
    then every frame: AES-256-GCM under c2s / s2c (channel.py), or with
    --insecure-cleartext an HMAC-SHA256 tag under the same keys

Why this shape: the token never crosses the wire, only MACs over a transcript
holding fresh random nonces from both sides (no replay) and both HELLOs (a man
in the middle who edits one, e.g. the cipher, breaks both proofs); distinct
keys for the two proofs keep one side's proof from being reflected as the
other's; comparisons use hmac.compare_digest. The client proves first, so a
server reveals nothing to a stranger beyond its nonce. The traffic keys are
fresh per connection and per direction, so counters used as AEAD nonces never
repeat under one key.

What this does not do: it is not a PAKE. Anyone who records a handshake can
test guesses of the token offline against the proofs, which is why load_token()
refuses tokens with less than MIN_TOKEN_BITS of estimated entropy.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
import platform
import secrets
import stat
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import __version__
from . import protocol
from .channel import Channel
from .errors import AuthFailed, Busy, ConnectionLost, ProtocolError, TokenRejected, error_for_code

MIN_TOKEN_BYTES = 16
MIN_TOKEN_BITS = 128
MAX_TOKEN_BYTES = 4096
NONCE_BYTES = 32
HANDSHAKE_DEADLINE = 10.0  # seconds for the whole handshake (receiver default)
CLIENT_HANDSHAKE_DEADLINE = 30.0  # the source waits longer: it must hear the receiver's refusal
_KDF_LABEL = b"ckpt-migrate 2 keys\0"
MAKE_TOKEN = "head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}"


@dataclass(frozen=True)
class PeerInfo:
    """What the other side said about itself in its HELLO (informational only)."""

    host: str
    kernel: str
    ckpt: str
    cipher: str = protocol.CIPHER_AEAD


# ---------------------------------------------------------------- the token file


def estimate_bits(token: bytes) -> float:
    """A conservative estimate of the token's entropy in bits.

    The smallest of: the length times the empirical entropy per byte (of the bytes, and of
    the differences between neighbours, which catches `abcdef…` and `0246…`),
    the length times log2 of the alphabet the token draws from (lower, upper, digits,
    punctuation, other bytes), and the size of the token deflated (which catches
    repeated words). Random tokens score close to their real entropy (a base64
    line of 32 random bytes: ~210 bits); it is an estimate, not a proof: a token
    made of words scores higher than it deserves.
    """
    n = len(token)
    if n < 2:
        return 0.0

    def shannon(seq) -> float:
        counts = Counter(seq)
        total = sum(counts.values())
        return -sum(c / total * math.log2(c / total) for c in counts.values())

    per_byte = min(shannon(token), shannon((b - a) & 0xFF for a, b in itertools.pairwise(token)))
    classes = (
        (b"abcdefghijklmnopqrstuvwxyz", 26), (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", 26),
        (b"0123456789", 10),
    )  # fmt: skip
    alphabet = 0
    rest = set(token)
    for chars, size in classes:
        if rest & set(chars):
            alphabet += size
            rest -= set(chars)
    if rest:
        printable = all(0x20 < b < 0x7F for b in rest)
        alphabet += 32 if printable else 256 - 94
    per_byte = min(per_byte, math.log2(alphabet))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: no header to subtract
    deflated_bits = 8 * len(c.compress(token) + c.flush())
    return min(n * per_byte, float(deflated_bits))


def load_token(path: str) -> bytes:
    """Read the shared secret. Refused (TokenRejected, exit 29), one reason each: a file
    we cannot read, not a regular file, owned by another user, open to group or others,
    too long, or a token with less than MIN_TOKEN_BITS of estimated entropy. The checks
    are made on the opened file (fstat), not on the path."""
    make = MAKE_TOKEN.format(path=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise TokenRejected(
            f"cannot read token file {path}: {exc.strerror}; make one with: {make}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenRejected(f"token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenRejected(
                f"token file {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): "
                f"anyone who controls it controls what we accept; chown {os.geteuid()} {path} "
                "or make a new one"
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenRejected(
                f"token file {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenRejected(f"cannot read token file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_BYTES:
        raise TokenRejected(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    token = data.strip()
    bits = estimate_bits(token)
    if len(token) < MIN_TOKEN_BYTES or bits < MIN_TOKEN_BITS:
        raise TokenRejected(
            f"the token in {path} is too weak ({len(token)} bytes, about {bits:.0f} bits of "
            f"entropy; at least {MIN_TOKEN_BITS} needed): make a random one with: {make}"
        )
    return token


# ---------------------------------------------------------------- the handshake


def describe_protection(cipher: str | None, tls: bool) -> str:
    """How the stream is protected, for the status lines of both sides."""
    if cipher == protocol.CIPHER_AEAD:
        return "encrypted (AES-256-GCM, keys from the token)" + (" inside TLS" if tls else "")
    if tls:
        return "encrypted by TLS only (--insecure-cleartext), frames tagged with the token"
    return "CLEARTEXT (--insecure-cleartext): frames authenticated, not encrypted"


@dataclass(frozen=True)
class _Keys:
    proof_c: bytes
    proof_s: bytes
    c2s: bytes
    s2c: bytes


def _keys(token: bytes, nc: bytes, ns: bytes, th: bytes) -> _Keys:
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=nc + ns, info=_KDF_LABEL + th).derive(
        token
    )
    return _Keys(okm[:32], okm[32:64], okm[64:96], okm[96:])


def _proof(key: bytes, th: bytes) -> bytes:
    return hmac.new(key, th, hashlib.sha256).digest()


def _hello(role: str, nonce: bytes, cipher: str) -> bytes:
    return protocol.encode(
        protocol.HELLO, version=protocol.VERSION, role=role, nonce=nonce, cipher=cipher,
        ckpt=__version__, host=platform.node(), kernel=platform.release(),
    )  # fmt: skip


def _preamble(ch: Channel) -> None:
    ch.send_raw(protocol.PREAMBLE)
    try:
        got = ch.recv_raw(len(protocol.PREAMBLE))
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


def _refused(ch: Channel, f, who: str) -> Exception:
    msg = protocol.decode(f.type, f.payload)
    cls = error_for_code(msg.get("code", AuthFailed.exit_code))
    return cls(f"{who} {ch.peer} refused us: {msg['reason']}")


def _peer_hello(ch: Channel, want_role: str) -> tuple[bytes, PeerInfo, bytes]:
    f = ch.recv()
    if f.type == protocol.REFUSED:
        raise _refused(ch, f, "the destination" if want_role == "destination" else "the source")
    if f.type != protocol.HELLO:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of HELLO")
    h = protocol.decode(f.type, f.payload)
    if h["version"] != protocol.VERSION or h["role"] != want_role:
        raise ProtocolError(
            f"{ch.peer} is not a matching peer (version {h['version']}, role {h['role']!r})"
        )
    if len(h["nonce"]) != NONCE_BYTES:
        raise ProtocolError(f"{ch.peer} sent a malformed nonce")
    if h["cipher"] not in protocol.CIPHERS:
        raise ProtocolError(f"{ch.peer} asks for an unknown cipher {h['cipher'][:40]!r}")
    return h["nonce"], PeerInfo(h["host"], h["kernel"], h["ckpt"], h["cipher"]), bytes(f.payload)


def _refuse(ch: Channel, reason: str, code: int = AuthFailed.exit_code) -> None:
    try:
        ch.send(protocol.REFUSED, protocol.encode(protocol.REFUSED, reason=reason, code=code))
    except Exception:
        pass


def _mismatch(ours: str, theirs: str, here: str) -> str:
    """Why two sides with different --insecure-cleartext settings cannot talk."""
    if ours == protocol.CIPHER_AEAD:
        return (
            f"the {here} requires encryption, the other side runs with --insecure-cleartext "
            "(use it on both sides, or on neither)"
        )
    return (
        f"the {here} runs with --insecure-cleartext, the other side encrypts "
        "(use it on both sides, or on neither)"
    )


def client_handshake(
    ch: Channel,
    token: bytes,
    cipher: str = protocol.CIPHER_AEAD,
    deadline: float = CLIENT_HANDSHAKE_DEADLINE,
) -> PeerInfo:
    """Source side. Returns the destination's HELLO info once both sides are proven;
    from then on the channel is protected."""
    ch.doing = "authenticating"
    ch.set_deadline(deadline)
    _preamble(ch)
    nc = secrets.token_bytes(NONCE_BYTES)
    hello_c = _hello("source", nc, cipher)
    ch.send(protocol.HELLO, hello_c)
    ns, info, hello_s = _peer_hello(ch, "destination")
    if info.cipher != cipher:
        reason = _mismatch(cipher, info.cipher, "source")
        _refuse(ch, reason, ProtocolError.exit_code)
        raise ProtocolError(f"cannot talk to {ch.peer}: {reason}")
    th = hashlib.sha256(hello_c + hello_s).digest()
    keys = _keys(token, nc, ns, th)
    ch.send(protocol.PROOF, protocol.encode(protocol.PROOF, mac=_proof(keys.proof_c, th)))
    f = ch.recv()
    if f.type == protocol.REFUSED:
        raise _refused(ch, f, "the destination")
    if f.type != protocol.PROOF:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of its PROOF")
    mac = protocol.decode(f.type, f.payload)["mac"]
    if not hmac.compare_digest(mac, _proof(keys.proof_s, th)):
        _refuse(ch, "the destination failed authentication (it does not know our token)")
        raise AuthFailed(
            f"the destination {ch.peer} failed authentication: it does not know our token "
            "(different token files?)"
        )
    ch.protect(cipher, keys.c2s, keys.s2c)
    ch.send(protocol.PING, protocol.encode(protocol.PING))
    ch.clear_deadline()
    return info


def server_handshake(
    ch: Channel,
    token: bytes,
    cipher: str = protocol.CIPHER_AEAD,
    deadline: float = HANDSHAKE_DEADLINE,
    claim: Callable[[], bool] | None = None,
    refusing: Callable[[], None] | None = None,
) -> PeerInfo:
    """Destination side. Returns the source's HELLO info once both sides are proven;
    from then on the channel is protected. `claim()` is asked once the source proved
    the token: False (another source got there first) refuses this one (Busy).
    `refusing()` runs before we refuse a source that failed (so a rate limit counts
    the failure before that source can try again)."""
    refusing = refusing or (lambda: None)
    ch.doing = "authenticating"
    ch.set_deadline(deadline)
    _preamble(ch)
    nc, info, hello_c = _peer_hello(ch, "source")
    if info.cipher != cipher:
        reason = _mismatch(cipher, info.cipher, "destination")
        refusing()
        _refuse(ch, reason, ProtocolError.exit_code)
        raise ProtocolError(reason)
    ns = secrets.token_bytes(NONCE_BYTES)
    hello_s = _hello("destination", ns, cipher)
    ch.send(protocol.HELLO, hello_s)
    th = hashlib.sha256(hello_c + hello_s).digest()
    keys = _keys(token, nc, ns, th)
    f = ch.recv()
    if f.type == protocol.REFUSED:
        raise _refused(ch, f, "the source")
    if f.type != protocol.PROOF:
        raise ProtocolError(f"{ch.peer} sent {f.name} instead of its PROOF")
    mac = protocol.decode(f.type, f.payload)["mac"]
    if not hmac.compare_digest(mac, _proof(keys.proof_c, th)):
        refusing()
        _refuse(ch, "authentication failed (wrong token?)")
        raise AuthFailed(
            "it failed authentication (it does not know our token; different token files?)"
        )
    if claim is not None and not claim():
        _refuse(ch, "another source is already migrating to this receiver", Busy.exit_code)
        raise Busy("another source authenticated first")
    ch.send(protocol.PROOF, protocol.encode(protocol.PROOF, mac=_proof(keys.proof_s, th)))
    ch.protect(cipher, keys.s2c, keys.c2s)
    f = ch.recv()  # the client's first protected frame, or its refusal
    if f.type == protocol.REFUSED:
        raise _refused(ch, f, "the source")
    if f.type != protocol.PING:
        raise ProtocolError(f"{ch.peer} sent {f.name} to end the handshake")
    ch.clear_deadline()
    return info
