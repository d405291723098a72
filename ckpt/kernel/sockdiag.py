"""sock_diag netlink (NETLINK_SOCK_DIAG): what the kernel knows about a socket
that its owner cannot tell us through the socket itself.

UNIX_DIAG gives a unix socket's peer (by inode), the connections waiting in a
listener's accept queue (by inode, in queue order), queue lengths, shutdown
state and the inode of its bound file. INET_DIAG finds a TCP socket by its
4-tuple (to learn whether the other end of a loopback connection is ours).
Everything is plain `socket` module I/O on a netlink socket.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300

# unix_diag_req.udiag_show bits and the attributes they add
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS = 0x1, 0x2, 0x4, 0x8
UDIAG_SHOW_RQLEN, UDIAG_SHOW_MEMINFO, UDIAG_SHOW_UID = 0x10, 0x20, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_MEMINFO, UNIX_DIAG_SHUTDOWN, UNIX_DIAG_UID = 4, 5, 6, 7
SHOW_ALL = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
NO_COOKIE = 0xFFFFFFFF

# socket states as the kernel reports them (TCP_* names, used by unix sockets too)
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV",
}  # fmt: skip
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_CLOSE, TCP_LISTEN = 1, 2, 7, 10


@dataclass
class UnixDiag:
    ino: int
    type: int  # SOCK_STREAM / SOCK_DGRAM / SOCK_SEQPACKET
    state: int  # TCP_ESTABLISHED, TCP_LISTEN, TCP_CLOSE (unconnected)
    name: bytes | None = None  # bound name: a path, or b"\0..." for an abstract name
    vfs: tuple[int, int] | None = None  # (inode, dev) of the bound socket file
    peer: int = 0  # peer socket inode; 0 = none (or the peer is closed)
    icons: list[int] = field(default_factory=list)  # listener: pending connections, in order
    rqueue: int = 0  # listener: connections waiting; else bytes (dgram: first message)
    wqueue: int = 0  # listener: backlog; else bytes not yet read by the peer
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2


class SockDiagError(OSError):
    pass


def _request(payload: bytes, flags: int) -> list[bytes]:
    """Send one SOCK_DIAG_BY_FAMILY request; the payloads of all answer messages."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:  # fmt: skip
        seq = 1
        hdr = struct.pack("=IHHII", 16 + len(payload), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
        nl.sendto(hdr + payload, (0, 0))
        out: list[bytes] = []
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _fl, s, _pid = struct.unpack_from("=IHHII", data, off)
                if ln < 16 or off + ln > len(data):
                    raise SockDiagError(errno.EPROTO, "malformed sock_diag answer")
                body = data[off + 16 : off + ln]
                off += (ln + 3) & ~3
                if s != seq:
                    continue
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", body)
                    if err == 0:
                        return out
                    raise SockDiagError(-err, f"sock_diag: {os.strerror(-err)}")
                out.append(body)
                if not flags & NLM_F_DUMP:
                    return out


def _attrs(body: bytes, off: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= len(body):
        ln, typ = struct.unpack_from("=HH", body, off)
        if ln < 4:
            break
        out[typ & 0x3FFF] = body[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def _parse_unix(body: bytes) -> UnixDiag:
    _fam, typ, state, _pad, ino = struct.unpack_from("=BBBBI", body)
    a = _attrs(body, 16)
    d = UnixDiag(ino=ino, type=typ, state=state)
    if UNIX_DIAG_NAME in a:
        name = a[UNIX_DIAG_NAME]
        # a path comes with its terminating NUL; an abstract name is all bytes
        d.name = name if name[:1] == b"\0" else name.split(b"\0", 1)[0]
    if UNIX_DIAG_VFS in a:
        d.vfs = struct.unpack("=II", a[UNIX_DIAG_VFS][:8])
    if UNIX_DIAG_PEER in a:
        (d.peer,) = struct.unpack("=I", a[UNIX_DIAG_PEER][:4])
    if UNIX_DIAG_ICONS in a:
        raw = a[UNIX_DIAG_ICONS]
        d.icons = list(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    if UNIX_DIAG_RQLEN in a:
        d.rqueue, d.wqueue = struct.unpack("=II", a[UNIX_DIAG_RQLEN][:8])
    if UNIX_DIAG_SHUTDOWN in a:
        d.shutdown = a[UNIX_DIAG_SHUTDOWN][0]
    return d


def unix_socket(ino: int, show: int = SHOW_ALL) -> UnixDiag | None:
    """One unix socket by inode (None if there is no such socket any more)."""
    req = struct.pack("=BBHIII2I", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, show,
                      NO_COOKIE, NO_COOKIE)  # fmt: skip
    try:
        msgs = _request(req, NLM_F_REQUEST)
    except SockDiagError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return _parse_unix(msgs[0]) if msgs else None


def unix_sockets(show: int = SHOW_ALL, states: int = 0xFFFFFFFF) -> dict[int, UnixDiag]:
    """Every unix socket of this network namespace (whose state bit is in `states`), by
    inode."""
    req = struct.pack("=BBHIII2I", socket.AF_UNIX, 0, 0, states, 0, show, 0, 0)
    return {d.ino: d for d in map(_parse_unix, _request(req, NLM_F_REQUEST | NLM_F_DUMP))}


def _inet_id(family: int, src: tuple, dst: tuple, ifindex: int = 0) -> bytes:
    def addr(host: str) -> bytes:
        raw = socket.inet_pton(family, host)
        return raw.ljust(16, b"\0")

    return (
        struct.pack("!HH", src[1], dst[1])
        + addr(src[0])
        + addr(dst[0])
        + struct.pack("=I2I", ifindex, NO_COOKIE, NO_COOKIE)
    )


def tcp_socket_inode(family: int, local: tuple, remote: tuple, ifindex: int = 0) -> int | None:
    """Inode of the TCP socket with this exact 4-tuple (from its own point of view).

    ifindex: the interface a link-local connection is bound to (its scope id): the
    kernel finds a socket bound to an interface only when asked with it.
    0 = it exists but no process holds it (waiting in an accept queue, or
    orphaned); None = no such socket.
    """
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    req += _inet_id(family, local, remote, ifindex)
    try:
        msgs = _request(req, NLM_F_REQUEST)
    except SockDiagError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    if not msgs:
        return None
    # inet_diag_msg: family state timer retrans, sockid (48), expires rqueue wqueue uid inode
    (ino,) = struct.unpack_from("=I", msgs[0], 4 + 48 + 16)
    return ino


INET_DIAG_SHUTDOWN, INET_DIAG_MD5SIG = 8, 18
INET_DIAG_INFO_EXT = 1 << (2 - 1)  # idiag_ext bit of INET_DIAG_INFO
_INET_MSG = 4 + 48 + 20  # struct inet_diag_msg, before its attributes


def tcp_md5_inodes() -> set[int]:
    """Inodes of the TCP sockets (both families, every state) that hold TCP_MD5SIG keys.
    The kernel shows them to CAP_NET_ADMIN only, in INET_DIAG_MD5SIG, along with
    TCP_INFO (asked for with its extension bit)."""
    out: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, INET_DIAG_INFO_EXT, 0, 0xFFFFFFFF)
        for body in _request(req + bytes(48), NLM_F_REQUEST | NLM_F_DUMP):
            if INET_DIAG_MD5SIG in _attrs(body, _INET_MSG):
                out.add(struct.unpack_from("=I", body, 4 + 48 + 16)[0])
    return out


def inet_shutdowns(family: int, protocol: int) -> dict[int, int]:
    """inode → shutdown bits (RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2) of every socket of this
    family and protocol (UDP: those bound to a port) that has any."""
    req = struct.pack("=BBBBI", family, protocol, 0, 0, 0xFFFFFFFF) + bytes(48)
    out: dict[int, int] = {}
    for body in _request(req, NLM_F_REQUEST | NLM_F_DUMP):
        (ino,) = struct.unpack_from("=I", body, 4 + 48 + 16)
        bits = _attrs(body, _INET_MSG).get(INET_DIAG_SHUTDOWN, b"\0")[:1]
        if bits and bits[0]:
            out[ino] = bits[0]
    return out


TCP_SYN_RECV = 3


@dataclass
class InetDiag:
    """One TCP socket (or handshake in progress) from an INET_DIAG dump."""

    family: int
    state: int  # TCP_LISTEN, TCP_SYN_RECV (a request socket: handshake not finished)…
    local: tuple[str, int]
    remote: tuple[str, int]
    rqueue: int  # listener: connections waiting to be accepted; else bytes unread
    wqueue: int  # listener: backlog
    ino: int  # 0 for a request socket or one no process holds
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2 (INET_DIAG_SHUTDOWN)


def tcp_connections() -> dict[tuple[str, int, str, int], int]:
    """(local address, port, remote address, port) → inode of every TCP socket that is
    not listening, in both families (v4-mapped addresses as IPv4): where to find a
    socket bound to an interface we do not know (SO_BINDTODEVICE, inherited from its
    listener), which the lookup by 4-tuple finds only when asked with its interface."""
    out: dict[tuple[str, int, str, int], int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for d in tcp_sockets(family, 0xFFFFFFFF & ~(1 << TCP_LISTEN)):
            out[(_plain(d.local[0]), d.local[1], _plain(d.remote[0]), d.remote[1])] = d.ino
    return out


def tcp_key(local: tuple, remote: tuple) -> tuple[str, int, str, int]:
    """A connection's key in tcp_connections()."""
    return (_plain(local[0]), int(local[1]), _plain(remote[0]), int(remote[1]))


def _plain(host: str) -> str:
    """An address as it travels: a v4-mapped IPv6 one as IPv4."""
    a = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)


def _addr_of(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[: 4 if family == socket.AF_INET else 16])


def tcp_sockets(family: int, states: int) -> list[InetDiag]:
    """Every TCP socket of this network namespace in `family` whose state bit (1 << state)
    is in `states`. TCPF_SYN_RECV also gives the request sockets of handshakes not
    finished yet (the kernel's NEW_SYN_RECV, reported as SYN_RECV)."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + bytes(48)
    out = []
    for body in _request(req, NLM_F_REQUEST | NLM_F_DUMP):
        fam, state = body[0], body[1]
        sport, dport = struct.unpack_from("!HH", body, 4)
        src, dst = body[8:24], body[24:40]
        rq, wq, _uid, ino = struct.unpack_from("=IIII", body, 4 + 48 + 4)
        shut = _attrs(body, _INET_MSG).get(INET_DIAG_SHUTDOWN, b"\0")[:1] or b"\0"
        local, remote = (_addr_of(fam, src), sport), (_addr_of(fam, dst), dport)
        out.append(InetDiag(fam, state, local, remote, rq, wq, ino, shut[0]))
    return out


TCP_BOUND_INACTIVE = 13  # a bound socket that neither listens nor is connected (6.7+)


def tcp_bound_inactive() -> dict[int, InetDiag] | None:
    """inode → what the kernel still holds of every TCP socket (both families) that is
    bound to a port but neither listens nor is connected: bound and never connected,
    or closed while its port stays held (bound explicitly, or accepted through a
    listener: SOCK_BINDPORT_LOCK; a port the socket got from connect() is released
    when the connection closes, and such a socket is not listed). Its remote is the
    last peer's. None: this kernel lists no such sockets (before 6.7)."""
    if not _bound_inactive_listed():
        return None
    out: dict[int, InetDiag] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for d in tcp_sockets(family, 1 << TCP_BOUND_INACTIVE):
            out[d.ino] = d
    return out


@functools.cache
def _bound_inactive_listed() -> bool:
    """Does this kernel's INET_DIAG list bound, inactive TCP sockets? (Tried on one.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        ino = os.fstat(s.fileno()).st_ino
        try:
            return any(d.ino == ino for d in tcp_sockets(socket.AF_INET, 1 << TCP_BOUND_INACTIVE))
        except OSError:
            return False
