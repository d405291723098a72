"""Addresses, connecting (with retries while the receiver starts), listening (gate.py accepts)."""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from ..errors import UsageError
from .errors import ConnectFailed

LISTEN_BACKLOG = 64  # connections the kernel queues while gate.py hands others to threads


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, listen: bool = False) -> Address:
    """HOST:PORT, [IPv6]:PORT, or (to listen) :PORT for every address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if not listen:
            raise UsageError(f"{text!r} names no host")
        host = "::" if socket.has_dualstack_ipv6() else "0.0.0.0"
    return Address(host, int(port))


def connect(addr: Address, timeout: float) -> socket.socket:
    """Connect, retrying refused connections until `timeout` (the receiver may be starting)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            return socket.create_connection((addr.host, addr.port), timeout=max(0.5, left))
        except socket.gaierror as exc:
            raise ConnectFailed(f"cannot resolve {addr.host}: {exc.strerror}") from None
        except OSError as exc:
            last = exc
            retry = exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
            if not retry or time.monotonic() + 0.2 >= deadline:
                break
            time.sleep(0.2)
    why = last.strerror if last is not None and last.strerror else str(last)
    raise ConnectFailed(
        f"cannot connect to {addr} ({why}); is `ckpt receive --listen` running there?"
    )


def listen(addr: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr.host, addr.port))
        s.listen(LISTEN_BACKLOG)
    except OSError as exc:
        raise ConnectFailed(f"cannot listen on {addr}: {exc.strerror or exc}") from None
    return s
