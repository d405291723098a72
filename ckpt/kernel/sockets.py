"""Sockets seen from ckpt's side: a pidfd_getfd duplicate of the target's socket
(same socket, so options and queues read here are the target's), queue peeking
that leaves the queues untouched, socket options, addresses, socket files.

Everything that reads a target socket works on such a duplicate while the
target is frozen; nothing here consumes data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat as statmod
import struct

from .pidfd import pidfd_getfd, pidfd_open

SOL_SOCKET, SOL_TCP, SOL_IP, SOL_IPV6 = 1, 6, 0, 41
SO_PEEK_OFF = 42
SO_BUF_LOCK = 72
SO_SNDBUF, SO_RCVBUF = 7, 8
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
MSG_PEEK, MSG_DONTWAIT, MSG_TRUNC, MSG_CTRUNC = 0x2, 0x40, 0x20, 0x8
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B

# Options compared with a fresh socket of the same kind; only differences are kept.
# (level, optname, name, size); size 0 = int.
_COMMON = [
    (SOL_SOCKET, 2, "SO_REUSEADDR", 0), (SOL_SOCKET, 15, "SO_REUSEPORT", 0),
    (SOL_SOCKET, 9, "SO_KEEPALIVE", 0), (SOL_SOCKET, 6, "SO_BROADCAST", 0),
    (SOL_SOCKET, 12, "SO_PRIORITY", 0), (SOL_SOCKET, 18, "SO_RCVLOWAT", 0),
    (SOL_SOCKET, 16, "SO_PASSCRED", 0), (SOL_SOCKET, 10, "SO_OOBINLINE", 0),
    (SOL_SOCKET, 36, "SO_MARK", 0), (SOL_SOCKET, 29, "SO_TIMESTAMP", 0),
    (SOL_SOCKET, 35, "SO_TIMESTAMPNS", 0), (SOL_SOCKET, 13, "SO_LINGER", 8),
    (SOL_SOCKET, 20, "SO_RCVTIMEO", 16), (SOL_SOCKET, 21, "SO_SNDTIMEO", 16),
    (SOL_SOCKET, 34, "SO_PASSSEC", 0),
]  # fmt: skip
_INET = [(SOL_IP, 1, "IP_TOS", 0), (SOL_IP, 15, "IP_FREEBIND", 0)]
_INET6 = [(SOL_IPV6, 26, "IPV6_V6ONLY", 0), (SOL_IPV6, 67, "IPV6_TCLASS", 0)]
_TCP = [
    (SOL_TCP, 1, "TCP_NODELAY", 0), (SOL_TCP, 3, "TCP_CORK", 0),
    (SOL_TCP, 4, "TCP_KEEPIDLE", 0), (SOL_TCP, 5, "TCP_KEEPINTVL", 0),
    (SOL_TCP, 6, "TCP_KEEPCNT", 0), (SOL_TCP, 8, "TCP_LINGER2", 0),
    (SOL_TCP, 9, "TCP_DEFER_ACCEPT", 0), (SOL_TCP, 10, "TCP_WINDOW_CLAMP", 0),
    (SOL_TCP, 18, "TCP_USER_TIMEOUT", 0), (SOL_TCP, 23, "TCP_FASTOPEN", 0),
    (SOL_TCP, 25, "TCP_NOTSENT_LOWAT", 0), (SOL_TCP, 13, "TCP_CONGESTION", 16),
]  # fmt: skip
OPTIONS = {name: (level, opt, size) for level, opt, name, size in _COMMON + _INET + _INET6 + _TCP}
# options that must be set before bind() (they change what bind accepts)
BEFORE_BIND = ("SO_REUSEADDR", "SO_REUSEPORT", "IPV6_V6ONLY", "IP_FREEBIND")


class TargetSocket:
    """ckpt's duplicate of one of the target's sockets (closed with close())."""

    def __init__(self, pid: int, fd: int):
        pidfd = pidfd_open(pid)
        try:
            dup = pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        try:
            self.sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        self.fd = fd
        self.family = self.sock.family
        self.type = self.sock.type & 0xF
        self.proto = self.sock.getsockopt(SOL_SOCKET, 38)  # SO_PROTOCOL

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def int_opt(self, level: int, opt: int) -> int:
        return self.sock.getsockopt(level, opt)

    def set_int_opt(self, level: int, opt: int, value: int) -> None:
        self.sock.setsockopt(level, opt, value)

    def raw_opt(self, level: int, opt: int, size: int) -> bytes:
        return self.sock.getsockopt(level, opt, size)

    def ioctl_int(self, request: int) -> int:
        import fcntl

        buf = fcntl.ioctl(self.sock.fileno(), request, b"\0" * 4)
        return struct.unpack("=i", buf)[0]

    def sockname(self):
        return _norm(self.family, self.sock.getsockname())

    def peername(self):
        try:
            return _norm(self.family, self.sock.getpeername())
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return None
            raise

    def options(self) -> dict[str, int | bytes]:
        """The options that differ from a fresh socket of the same family/type/protocol."""
        table = _COMMON
        if self.family == socket.AF_INET:
            table = table + _INET
        elif self.family == socket.AF_INET6:
            table = table + _INET6
        if self.family in (socket.AF_INET, socket.AF_INET6) and self.type == socket.SOCK_STREAM:
            table = table + _TCP
        out: dict[str, int | bytes] = {}
        with socket.socket(self.family, self.type, self.proto) as fresh:
            for level, opt, name, size in table:
                try:
                    mine = _get(self.sock, level, opt, size)
                    base = _get(fresh, level, opt, size)
                except OSError:
                    continue
                if mine != base:
                    out[name] = mine
        return out

    def buffers(self) -> tuple[int, int, int]:
        """(sndbuf, rcvbuf, SO_BUF_LOCK bits): sizes as getsockopt reports them (doubled)."""
        try:
            lock = self.sock.getsockopt(SOL_SOCKET, SO_BUF_LOCK)
        except OSError:
            lock = 0
        return (
            self.sock.getsockopt(SOL_SOCKET, SO_SNDBUF),
            self.sock.getsockopt(SOL_SOCKET, SO_RCVBUF),
            lock,
        )

    # -- queues (the target is frozen; peeking never consumes) ----------------------------

    def peek_offset(self) -> int:
        return self.sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF)

    def peek_stream(self, limit: int = 1 << 30) -> bytes:
        """Every byte waiting in the receive queue (SO_PEEK_OFF walks it), queue untouched."""
        chunks = []
        with self._peek_from_start():
            total = 0
            while total < limit:
                try:
                    data = self.sock.recv(1 << 18, MSG_PEEK | MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    break
                chunks.append(data)
                total += len(data)
        return b"".join(chunks)

    def peek_messages(self, limit: int = 1 << 20) -> list[tuple[bytes, object]]:
        """Every datagram waiting, with its source address, message boundaries kept."""
        out: list[tuple[bytes, object]] = []
        with self._peek_from_start():
            size = 1 << 16
            off = 0
            while len(out) < limit:
                try:
                    data, _anc, flags, addr = self.sock.recvmsg(size, 0, MSG_PEEK | MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if flags & MSG_TRUNC:  # the peek moved by the truncated size only: go back
                    self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, off)
                    size *= 4
                    if size > 1 << 28:
                        raise OSError(errno.EMSGSIZE, "datagram too large to save")
                    continue
                off += len(data)
                out.append((data, _norm(self.family, addr) if addr else None))
        return out

    @contextlib.contextmanager
    def _peek_from_start(self):
        old = self.sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
        self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            yield
        finally:
            self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)


def _get(sock: socket.socket, level: int, opt: int, size: int) -> int | bytes:
    if size:
        raw = sock.getsockopt(level, opt, size)
        return raw.rstrip(b"\0") if opt == 13 and level == SOL_TCP else raw
    return sock.getsockopt(level, opt)


def _norm(family: int, addr):
    """Addresses as plain data: unix → bytes (b"" unnamed, b"\\0..." abstract);
    inet → [host, port] (+ [flowinfo, scope_id] for IPv6)."""
    if family == socket.AF_UNIX:
        if isinstance(addr, str):
            return os.fsencode(addr)
        return bytes(addr)
    return list(addr)


def pack_sockaddr(family: int, addr) -> bytes:
    """struct sockaddr_* bytes for an address as _norm() returns it."""
    if family == socket.AF_UNIX:
        name = bytes(addr)
        return struct.pack("=H", socket.AF_UNIX) + name + (b"" if name[:1] == b"\0" else b"\0")
    if family == socket.AF_INET:
        host, port = addr[0], addr[1]
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
            socket.inet_pton(socket.AF_INET, host) + b"\0" * 8  # fmt: skip
    host, port = addr[0], addr[1]
    flowinfo = addr[2] if len(addr) > 2 else 0
    scope = addr[3] if len(addr) > 3 else 0
    return (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", port, flowinfo)
        + socket.inet_pton(socket.AF_INET6, host)
        + struct.pack("=I", scope)
    )


def pack_option(name: str, value: int | bytes) -> tuple[int, int, bytes]:
    level, opt, _size = OPTIONS[name]
    raw = value if isinstance(value, bytes) else struct.pack("=i", value)
    return level, opt, raw


# -- socket files ---------------------------------------------------------------------------


def socket_file(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def stale_socket_file(path: str, live_inodes: set[tuple[int, int]]) -> bool:
    """True if `path` is a socket file no live socket is bound to (the restore removes
    it, as its owner: restore/sockets.py), False if nothing is there.

    Raises FileExistsError when it is something else, or a socket still in use
    (`live_inodes`: (inode, dev) of bound files of live sockets, from sock_diag).
    """
    st = socket_file(path)
    if st is None:
        return False
    if not statmod.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
    if (st.st_ino, st.st_dev) in live_inodes or (st.st_ino, _kdev(st.st_dev)) in live_inodes:
        raise FileExistsError(errno.EADDRINUSE, f"{path} is bound by a live socket")
    return True


def _kdev(dev: int) -> int:
    """A userspace dev_t as the kernel's internal (major << 20 | minor) encoding."""
    return (os.major(dev) << 20) | os.minor(dev)


# -- a restorer's socket, from ckpt's side (a pidfd_getfd copy) -------------------------------

SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def adopt(fd: int) -> socket.socket:
    """A socket object owning fd (ckpt's copy of a restorer's socket)."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise


def set_options(sock: socket.socket, options: dict, only=None, skip=()) -> None:
    for name, value in options.items():
        if name not in OPTIONS or name in skip or (only is not None and name not in only):
            continue
        level, opt, raw = pack_option(name, value)
        sock.setsockopt(level, opt, raw)


def set_buffers(sock: socket.socket, sndbuf: int, rcvbuf: int, lock: int) -> None:
    """Sizes as getsockopt reported them (the kernel doubles what is set), and the
    user-lock bits (a lock pins the size; unlocked, TCP autotunes it again)."""
    if sndbuf:
        sock.setsockopt(SOL_SOCKET, SO_SNDBUFFORCE, sndbuf // 2)
    if rcvbuf:
        sock.setsockopt(SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf // 2)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_SOCKET, SO_BUF_LOCK, lock)


def grow_sndbuf(sock: socket.socket, need: int) -> None:
    cur = sock.getsockopt(SOL_SOCKET, SO_SNDBUF)
    if cur < 2 * need + 65536:
        sock.setsockopt(SOL_SOCKET, SO_SNDBUFFORCE, need + 65536)


def send_all(sock: socket.socket, data: bytes, dest: bytes | None = None) -> None:
    """Queue data without ever blocking (BlockingIOError if it does not fit)."""
    view = memoryview(data)
    while True:
        if dest is not None:
            n = sock.sendto(view, MSG_DONTWAIT, os.fsdecode(dest) if dest[:1] != b"\0" else dest)
        else:
            n = sock.send(view, MSG_DONTWAIT)
        if sock.type != socket.SOCK_STREAM or n >= len(view):
            return
        view = view[n:]


def send_message(sock: socket.socket, data: bytes, dest: bytes | None = None) -> None:
    """One datagram (boundaries kept), never blocking."""
    if dest is not None:
        sock.sendto(data, MSG_DONTWAIT, os.fsdecode(dest) if dest[:1] != b"\0" else dest)
    else:
        sock.send(data, MSG_DONTWAIT)


def inet_tuple(addr) -> tuple:
    return tuple(addr)


def live_bound_files() -> set[tuple[int, int]]:
    """(inode, dev) of the socket files live unix sockets are bound to."""
    from .sockdiag import UDIAG_SHOW_VFS, unix_sockets

    return {d.vfs for d in unix_sockets(UDIAG_SHOW_VFS).values() if d.vfs}
