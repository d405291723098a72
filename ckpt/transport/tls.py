"""Optional TLS around the migration socket (Python's ssl), configured from CLI options.

The frame layer is already encrypted with keys derived from the token (auth.py,
channel.py); TLS adds certificate-based identity and forward secrecy (its ECDHE
key exchange) for those who have a PKI. The token handshake still runs inside
the TLS session: a peer needs both the right certificate and the token.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from .errors import TlsError


@dataclass(frozen=True)
class TlsOptions:
    """--tls-cert/--tls-key (our certificate), --tls-ca (whom we trust)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None  # client: the name to check the server certificate for
    enabled: bool = False  # client: --tls with neither CA nor certificate (system CAs)

    @property
    def active(self) -> bool:
        return self.enabled or bool(self.cert or self.ca)


def _load(ctx: ssl.SSLContext, opts: TlsOptions) -> None:
    try:
        if opts.cert:
            ctx.load_cert_chain(opts.cert, opts.key)
        if opts.ca:
            ctx.load_verify_locations(cafile=opts.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS certificate, key or CA: {exc}") from None


def server_context(opts: TlsOptions) -> ssl.SSLContext | None:
    """None without --tls-cert. With --tls-ca, clients must present a certificate it signed."""
    if not opts.cert:
        if opts.key or opts.ca:
            raise TlsError("--tls-key and --tls-ca need --tls-cert on the receiving side")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, opts)
    if opts.ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(opts: TlsOptions) -> ssl.SSLContext | None:
    """None unless TLS is asked for. The server's certificate is always verified."""
    if not opts.active:
        if opts.key:
            raise TlsError("--tls-key needs --tls-cert")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not opts.ca:
        ctx.load_default_certs()
    _load(ctx, opts)
    return ctx


def wrap_server(ctx: ssl.SSLContext, sock: socket.socket, peer: str) -> ssl.SSLSocket:
    try:
        return ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TlsError(
            f"TLS handshake with {peer} failed ({exc}); does the source use --tls-ca "
            "(and a client certificate if --tls-ca is set here)?"
        ) from None


def wrap_client(ctx: ssl.SSLContext, sock: socket.socket, host: str, peer: str) -> ssl.SSLSocket:
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TlsError(
            f"TLS handshake with {peer} failed ({exc}); does the destination use "
            "--tls-cert/--tls-key, and does its certificate match --tls-ca and the host name?"
        ) from None
