"""Migration failures, one class (and exit code) per situation an operator must tell apart.

Codes start at 20 so they never collide with the dump/restore codes (README).
Every message should also say where the process is now; the commands append
that ("process N keeps running here"), because only they know it.
"""

from __future__ import annotations

from ..errors import CkptError


class TransportError(CkptError):
    """Base class of every migration transport failure."""

    exit_code = 20


class AuthFailed(TransportError):
    """The peer did not prove it knows the token (or refused our proof)."""

    exit_code = 20


class ConnectionLost(TransportError):
    """The connection broke or the peer vanished mid-migration."""

    exit_code = 21


class ProtocolError(TransportError):
    """Malformed, out-of-order, oversized or tampered frame; or an incompatible peer."""

    exit_code = 22


class DestinationFailed(TransportError):
    """Source side: the destination reported an error (e.g. its restore failed)."""

    exit_code = 23


class TransportTimeout(TransportError):
    """The peer sent nothing (or accepted nothing) for too long."""

    exit_code = 24


class ConnectFailed(TransportError):
    """Could not connect to, or listen on, the given address."""

    exit_code = 25


class TlsError(TransportError):
    """TLS configuration or handshake failure (certificates, key, peer without TLS)."""

    exit_code = 26


class SourceAborted(TransportError):
    """Destination side: the source ended the migration (its dump failed or was interrupted)."""

    exit_code = 27


class ReceiveFailed(TransportError):
    """Destination side: the incoming image could not be stored (disk full, permissions)."""

    exit_code = 28


class TokenRejected(TransportError):
    """The token file is unusable: unreadable, not ours, open to group/others, or too weak."""

    exit_code = 29


class Busy(ConnectFailed):
    """Destination side: another source authenticated first (this one is refused)."""


def error_for_code(code: int) -> type[TransportError]:
    """The class a peer's refusal code stands for (REFUSED{code}); AuthFailed by default."""
    for cls in (ProtocolError, ConnectFailed, TlsError, TransportTimeout):
        if cls.exit_code == code:
            return cls
    return AuthFailed


__all__ = [
    "AuthFailed",
    "Busy",
    "ConnectFailed",
    "ConnectionLost",
    "DestinationFailed",
    "ProtocolError",
    "ReceiveFailed",
    "SourceAborted",
    "TlsError",
    "TokenRejected",
    "TransportError",
    "TransportTimeout",
    "error_for_code",
]
