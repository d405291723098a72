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
import select
import socket
import stat as statmod
import struct
from dataclasses import dataclass

from .pidfd import take_fd

SOL_SOCKET, SOL_TCP, SOL_IP, SOL_IPV6 = 1, 6, 0, 41
SO_PEEK_OFF = 42
SO_BUF_LOCK = 72
SO_SNDBUF, SO_RCVBUF = 7, 8
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
MSG_PEEK, MSG_DONTWAIT, MSG_TRUNC, MSG_CTRUNC = 0x2, 0x40, 0x20, 0x8
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B

# -- socket options ----------------------------------------------------------------------------
#
# Every option a program sets and getsockopt reads back, by level. The capture keeps those
# that differ from a fresh socket of the same family/type/protocol (TargetSocket.options);
# the restore sets them on the rebuilt socket (set_options) in this table's order: the
# "early" ones before bind (they change what bind accepts, or can only be set before
# connect), the others once the socket is bound, connected and holds its data. Left out on
# purpose: read-only state (SO_ERROR, SO_INCOMING_CPU, IP_MTU, IPV6_MTU, TCP_INFO...),
# SO_SNDBUF/SO_RCVBUF (buffers()), unix SO_PEEK_OFF (Socket.peek_off), and what the
# kernel sets on an accepted TCP connection from its SYN and never lets a program set on
# TCP (IP_MULTICAST_TTL, IPV6_MULTICAST_IF, IPV6_MULTICAST_HOPS: they never apply to TCP).


@dataclass(frozen=True)
class Opt:
    name: str
    level: int
    opt: int
    size: int = 0  # 0: an int; else read into a buffer of this size (bytes)
    kind: str = "int"  # "int", "bytes", "str" (a name, NULs stripped), "ifindex", "linger"
    early: bool = False  # set before bind (and before connect for a rebuilt connection)
    moves: bool = False  # the kernel changes it on a live connection: not checked after restore


SOL_UDP = 17
_SOCKET = [
    Opt("SO_REUSEADDR", SOL_SOCKET, 2, early=True),
    Opt("SO_REUSEPORT", SOL_SOCKET, 15, early=True),
    Opt("SO_DEBUG", SOL_SOCKET, 1),
    Opt("SO_DONTROUTE", SOL_SOCKET, 5),
    Opt("SO_BROADCAST", SOL_SOCKET, 6),
    Opt("SO_KEEPALIVE", SOL_SOCKET, 9),
    Opt("SO_OOBINLINE", SOL_SOCKET, 10),
    Opt("SO_NO_CHECK", SOL_SOCKET, 11),
    Opt("SO_LINGER", SOL_SOCKET, 13, 8, "linger"),
    Opt("SO_PASSCRED", SOL_SOCKET, 16),
    Opt("SO_RCVLOWAT", SOL_SOCKET, 18),
    Opt("SO_RCVTIMEO", SOL_SOCKET, 20, 16, "bytes"),
    Opt("SO_SNDTIMEO", SOL_SOCKET, 21, 16, "bytes"),
    Opt("SO_TIMESTAMP", SOL_SOCKET, 29),
    Opt("SO_PASSSEC", SOL_SOCKET, 34),
    Opt("SO_TIMESTAMPNS", SOL_SOCKET, 35),
    Opt("SO_MARK", SOL_SOCKET, 36),
    Opt("SO_TIMESTAMPING", SOL_SOCKET, 37, 8, "bytes"),
    Opt("SO_RXQ_OVFL", SOL_SOCKET, 40),
    Opt("SO_WIFI_STATUS", SOL_SOCKET, 41),
    Opt("SO_SELECT_ERR_QUEUE", SOL_SOCKET, 45),
    Opt("SO_BUSY_POLL", SOL_SOCKET, 46),
    Opt("SO_MAX_PACING_RATE", SOL_SOCKET, 47, 8, "bytes"),
    Opt("SO_ZEROCOPY", SOL_SOCKET, 60),
    Opt("SO_TXTIME", SOL_SOCKET, 61, 8, "bytes"),
    Opt("SO_TIMESTAMP_NEW", SOL_SOCKET, 63),
    Opt("SO_TIMESTAMPNS_NEW", SOL_SOCKET, 64),
    Opt("SO_TIMESTAMPING_NEW", SOL_SOCKET, 65, 8, "bytes"),
    Opt("SO_PREFER_BUSY_POLL", SOL_SOCKET, 69),
    Opt("SO_BUSY_POLL_BUDGET", SOL_SOCKET, 70),
    Opt("SO_RESERVE_MEM", SOL_SOCKET, 73),
    Opt("SO_TXREHASH", SOL_SOCKET, 74),
    Opt("SO_RCVMARK", SOL_SOCKET, 75),
    Opt("SO_PASSPIDFD", SOL_SOCKET, 76),
    Opt("SO_RCVPRIORITY", SOL_SOCKET, 82),
    Opt("SO_PASSRIGHTS", SOL_SOCKET, 83),
    Opt("SO_LOCK_FILTER", SOL_SOCKET, 44),  # after the filter (restore/sockets.py)
]
_INET_SOCKET = [Opt("SO_PEEK_OFF", SOL_SOCKET, SO_PEEK_OFF)]  # after the queued data
_LAST = [Opt("SO_PRIORITY", SOL_SOCKET, 12)]  # after IP_TOS, which sets it too
# the interface options go before SO_BINDTODEVICE: once a socket is bound to a device the
# kernel refuses to point them at another one
_DEVICE = [Opt("SO_BINDTODEVICE", SOL_SOCKET, 25, 16, "str", early=True)]
# IP options apply to IPv6 sockets too (their v4-mapped traffic)
_IP = [
    Opt("IP_UNICAST_IF", SOL_IP, 50, kind="ifindex", early=True),
    Opt("IP_FREEBIND", SOL_IP, 15, early=True),
    Opt("IP_TRANSPARENT", SOL_IP, 19, early=True),
    Opt("IP_BIND_ADDRESS_NO_PORT", SOL_IP, 24, early=True),
    Opt("IP_LOCAL_PORT_RANGE", SOL_IP, 51, early=True),
    Opt("IP_TOS", SOL_IP, 1),
    Opt("IP_TTL", SOL_IP, 2),
    Opt("IP_OPTIONS", SOL_IP, 4, 40, "bytes"),
    Opt("IP_RECVOPTS", SOL_IP, 6),
    Opt("IP_RETOPTS", SOL_IP, 7),
    Opt("IP_PKTINFO", SOL_IP, 8),
    Opt("IP_MTU_DISCOVER", SOL_IP, 10),
    Opt("IP_RECVERR", SOL_IP, 11),
    Opt("IP_RECVTTL", SOL_IP, 12),
    Opt("IP_RECVTOS", SOL_IP, 13),
    Opt("IP_PASSSEC", SOL_IP, 18),
    Opt("IP_RECVORIGDSTADDR", SOL_IP, 20),
    Opt("IP_MINTTL", SOL_IP, 21),
    Opt("IP_CHECKSUM", SOL_IP, 23),
    Opt("IP_RECVFRAGSIZE", SOL_IP, 25),
    Opt("IP_RECVERR_RFC4884", SOL_IP, 26),
]
_IP_DGRAM = [
    Opt("IP_MULTICAST_IF", SOL_IP, 32, 4, "bytes", early=True),
    Opt("IP_MULTICAST_TTL", SOL_IP, 33),
    Opt("IP_MULTICAST_LOOP", SOL_IP, 34),
    Opt("IP_MULTICAST_ALL", SOL_IP, 49),
]
_EXTHDR = 1024  # socket.getsockopt's largest buffer (an extension header may be 2048)
_IPV6 = [
    Opt("IPV6_UNICAST_IF", SOL_IPV6, 76, kind="ifindex", early=True),
    Opt("IPV6_V6ONLY", SOL_IPV6, 26, early=True),
    Opt("IPV6_FREEBIND", SOL_IPV6, 78, early=True),
    Opt("IPV6_TRANSPARENT", SOL_IPV6, 75, early=True),
    Opt("IPV6_ADDR_PREFERENCES", SOL_IPV6, 72, early=True),  # chooses the source address
    Opt("IPV6_TCLASS", SOL_IPV6, 67),
    Opt("IPV6_UNICAST_HOPS", SOL_IPV6, 16),
    Opt("IPV6_2292PKTINFO", SOL_IPV6, 2),
    Opt("IPV6_2292HOPOPTS", SOL_IPV6, 3),
    Opt("IPV6_2292DSTOPTS", SOL_IPV6, 4),
    Opt("IPV6_2292RTHDR", SOL_IPV6, 5),
    Opt("IPV6_2292HOPLIMIT", SOL_IPV6, 8),
    Opt("IPV6_FLOWINFO", SOL_IPV6, 11),
    Opt("IPV6_MTU_DISCOVER", SOL_IPV6, 23),
    Opt("IPV6_RECVERR", SOL_IPV6, 25),
    Opt("IPV6_RECVERR_RFC4884", SOL_IPV6, 31),
    Opt("IPV6_FLOWINFO_SEND", SOL_IPV6, 33),
    Opt("IPV6_RECVPKTINFO", SOL_IPV6, 49),
    Opt("IPV6_RECVHOPLIMIT", SOL_IPV6, 51),
    Opt("IPV6_RECVHOPOPTS", SOL_IPV6, 53),
    Opt("IPV6_HOPOPTS", SOL_IPV6, 54, _EXTHDR, "bytes"),
    Opt("IPV6_RTHDRDSTOPTS", SOL_IPV6, 55, _EXTHDR, "bytes"),
    Opt("IPV6_RECVRTHDR", SOL_IPV6, 56),
    Opt("IPV6_RTHDR", SOL_IPV6, 57, _EXTHDR, "bytes"),
    Opt("IPV6_RECVDSTOPTS", SOL_IPV6, 58),
    Opt("IPV6_DSTOPTS", SOL_IPV6, 59, _EXTHDR, "bytes"),
    Opt("IPV6_RECVPATHMTU", SOL_IPV6, 60),
    Opt("IPV6_DONTFRAG", SOL_IPV6, 62),
    Opt("IPV6_RECVTCLASS", SOL_IPV6, 66),
    Opt("IPV6_AUTOFLOWLABEL", SOL_IPV6, 70),
    Opt("IPV6_MINHOPCOUNT", SOL_IPV6, 73),
    Opt("IPV6_RECVORIGDSTADDR", SOL_IPV6, 74),
    Opt("IPV6_RECVFRAGSIZE", SOL_IPV6, 77),
]
_IPV6_DGRAM = [
    Opt("IPV6_MULTICAST_IF", SOL_IPV6, 17, kind="ifindex", early=True),
    Opt("IPV6_MULTICAST_HOPS", SOL_IPV6, 18),
    Opt("IPV6_MULTICAST_LOOP", SOL_IPV6, 19),
    Opt("IPV6_MULTICAST_ALL", SOL_IPV6, 29),
]
_TCP = [
    Opt("TCP_FASTOPEN_CONNECT", SOL_TCP, 30, early=True),  # only before connect
    Opt("TCP_FASTOPEN", SOL_TCP, 23, early=True),  # only before connect (or listening)
    Opt("TCP_NODELAY", SOL_TCP, 1),
    Opt("TCP_MAXSEG", SOL_TCP, 2),  # not for a connection: TCP_REPAIR_OPTIONS gives its MSS
    Opt("TCP_CORK", SOL_TCP, 3),
    Opt("TCP_KEEPIDLE", SOL_TCP, 4),
    Opt("TCP_KEEPINTVL", SOL_TCP, 5),
    Opt("TCP_KEEPCNT", SOL_TCP, 6),
    Opt("TCP_SYNCNT", SOL_TCP, 7),
    Opt("TCP_LINGER2", SOL_TCP, 8),
    Opt("TCP_DEFER_ACCEPT", SOL_TCP, 9),
    Opt("TCP_WINDOW_CLAMP", SOL_TCP, 10, moves=True),
    Opt("TCP_QUICKACK", SOL_TCP, 12, moves=True),
    Opt("TCP_CONGESTION", SOL_TCP, 13, 16, "str"),
    Opt("TCP_THIN_LINEAR_TIMEOUTS", SOL_TCP, 16),
    Opt("TCP_USER_TIMEOUT", SOL_TCP, 18),
    Opt("TCP_NOTSENT_LOWAT", SOL_TCP, 25),
    Opt("TCP_SAVE_SYN", SOL_TCP, 27),
    Opt("TCP_FASTOPEN_NO_COOKIE", SOL_TCP, 34),
    Opt("TCP_INQ", SOL_TCP, 36),
    Opt("TCP_TX_DELAY", SOL_TCP, 37),
    Opt("TCP_RTO_MAX_MS", SOL_TCP, 44),
    Opt("TCP_RTO_MIN_US", SOL_TCP, 45),
    Opt("TCP_DELACK_MAX_US", SOL_TCP, 46),
]
_UDP = [
    Opt("UDP_CORK", SOL_UDP, 1),
    Opt("UDP_ENCAP", SOL_UDP, 100),
    Opt("UDP_NO_CHECK6_TX", SOL_UDP, 101),
    Opt("UDP_NO_CHECK6_RX", SOL_UDP, 102),
    Opt("UDP_SEGMENT", SOL_UDP, 103),
    Opt("UDP_GRO", SOL_UDP, 104),
]
# options that name an interface: once bound to a device (SO_BINDTODEVICE, or a connect to
# a link-local address) the kernel refuses to point them at another one, so they go first
_IFACE = frozenset({"IP_UNICAST_IF", "IP_MULTICAST_IF", "IPV6_UNICAST_IF", "IPV6_MULTICAST_IF"})
# interface indexes the kernel takes and gives in network byte order
_NET_ORDER = frozenset({"IP_UNICAST_IF", "IPV6_UNICAST_IF"})
_ALL = (
    _SOCKET + _LAST + _INET_SOCKET + _DEVICE + _IP + _IP_DGRAM + _IPV6 + _IPV6_DGRAM + _TCP + _UDP
)
SPECS = {o.name: o for o in _ALL}
OPTIONS = {o.name: (o.level, o.opt, o.size) for o in _ALL}
# options that must be set before bind (they change what bind accepts) or connect
BEFORE_BIND = tuple(o.name for o in _ALL if o.early)
# read back after a restore only where the kernel does not move them by itself
MOVING = frozenset(o.name for o in _ALL if o.moves)
TCP_ULP, TCP_AO_INFO = 31, 40
SOF_TIMESTAMPING_OPT_ID = 1 << 7
SO_GET_FILTER, SO_ATTACH_FILTER, SO_LOCK_FILTER = 26, 26, 44
IPV6_V6ONLY = 26


def option_table(family: int, type_: int, proto: int) -> list[Opt]:
    """The options a socket of this kind has, in the order the restore sets them."""
    if family == socket.AF_UNIX:
        return _SOCKET[:2] + _DEVICE + _SOCKET[2:] + _LAST
    early: list[Opt] = []
    late: list[Opt] = list(_SOCKET) + _INET_SOCKET
    parts = list(_IP)
    if type_ == socket.SOCK_DGRAM:
        parts += _IP_DGRAM
    if family == socket.AF_INET6:
        parts += _IPV6 + (_IPV6_DGRAM if type_ == socket.SOCK_DGRAM else [])
    if type_ == socket.SOCK_STREAM and proto in (0, socket.IPPROTO_TCP):
        parts += _TCP
    if type_ == socket.SOCK_DGRAM and proto in (0, socket.IPPROTO_UDP):
        parts += _UDP
    for o in parts:
        (early if o.early else late).append(o)
    # interface choices, then the device binding, then the rest of what goes before bind
    first = [o for o in early if o.name in _IFACE]
    return (
        [o for o in late if o.early] + first + _DEVICE
        + [o for o in early if o.name not in _IFACE] + [o for o in late if not o.early] + _LAST
    )  # fmt: skip


class NotRestorable(Exception):
    """A socket's state that ckpt could not set again exactly (the message says what)."""


class TargetSocket:
    """ckpt's duplicate of one of the target's sockets (closed with close())."""

    def __init__(self, pid: int, fd: int):
        dup = take_fd(pid, fd)
        try:
            self.sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        self.fd = fd
        self.family = self.sock.family
        self.type = self.sock.type & 0xF
        self.proto = self.sock.getsockopt(SOL_SOCKET, 38)  # SO_PROTOCOL

    @classmethod
    def own(cls, fd: int, label: int) -> TargetSocket:
        """A socket ckpt holds itself (a file in flight a peek installed as `fd`; ckpt
        keeps owning `fd`): a duplicate of it, named `label` in messages."""
        self = cls.__new__(cls)
        dup = os.dup(fd)
        try:
            self.sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise
        self.fd = label
        self.family = self.sock.family
        self.type = self.sock.type & 0xF
        self.proto = self.sock.getsockopt(SOL_SOCKET, 38)  # SO_PROTOCOL
        return self

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

    def options(self, connection: bool = False) -> dict[str, int | bytes]:
        """The options that differ from a fresh socket of the same family, type and
        protocol (IPV6_V6ONLY always: its default is a sysctl), in the order the restore
        sets them. connection: an established TCP connection (its TCP_MAXSEG reads the
        path's MSS, which TCP_REPAIR_OPTIONS gives back).

        They are then set on a fresh socket, in the same order, and every option is read
        back (_trial): one that reads back otherwise (the kernel would restore it wrong)
        raises NotRestorable, as do those whose state getsockopt cannot show (TCP_ULP such
        as kernel TLS, the counter of SOF_TIMESTAMPING_OPT_ID)."""
        table = option_table(self.family, self.type, self.proto)
        if connection:
            table = [o for o in table if o.name != "TCP_MAXSEG"]
        mine: dict[str, int | bytes] = {}
        out: dict[str, int | bytes] = {}
        with socket.socket(self.family, self.type, self.proto) as fresh:
            for o in table:
                try:
                    mine[o.name] = read_option(self.sock, o)
                except OSError:
                    continue
                try:
                    base = read_option(fresh, o)
                except OSError:
                    base = None
                if mine[o.name] != base or o.name == "IPV6_V6ONLY":
                    out[o.name] = mine[o.name]
        self._refuse(out)
        # an option set again may move another (IP_TOS sets SO_PRIORITY): keep that one
        # too, set after it (the table's order), and try again
        for _ in range(3):
            moved = self._trial(out, mine)
            if not moved:
                return out
            out = {o.name: mine[o.name] for o in table if o.name in out or o.name in moved}
        raise NotRestorable(f"has options that move each other ({', '.join(sorted(moved))})")

    def _trial(self, out: dict[str, int | bytes], mine: dict[str, int | bytes]) -> set[str]:
        """Set `out` on a fresh socket, in order, and read every option back. A kept one
        that reads otherwise raises NotRestorable; the names of the others that now read
        otherwise are returned. A set the kernel refuses here is left to the restore,
        whose socket is bound and connected."""
        moved: set[str] = set()
        with socket.socket(self.family, self.type, self.proto) as sock:
            done = set()
            for name, value in out.items():
                try:
                    set_options(sock, {name: value})
                except OSError:
                    continue
                done.add(name)
            for name, value in mine.items():
                if name in MOVING or (name in out and name not in done):
                    continue
                try:
                    got = read_option(sock, SPECS[name])
                except OSError:
                    continue
                if got == value:
                    continue
                if name in out:
                    raise NotRestorable(
                        f"has {name} = {show_option(value)}, which reads back as "
                        f"{show_option(got)} once set again"
                    )
                moved.add(name)
        return moved

    def _refuse(self, out: dict[str, int | bytes]) -> None:
        if self.family != socket.AF_UNIX and self.type == socket.SOCK_STREAM:
            try:
                ulp = self.sock.getsockopt(SOL_TCP, TCP_ULP, 16).split(b"\0", 1)[0]
            except OSError:
                ulp = b""
            if ulp:
                raise NotRestorable(
                    f"runs the upper-layer protocol {ulp.decode(errors='replace')} (TCP_ULP: "
                    "kernel TLS keys and state cannot be read back)"
                )
            if _has_tcp_ao(self.sock.fileno()):
                raise NotRestorable("has TCP-AO keys (TCP_AO_ADD_KEY: they cannot be read back)")
        for name in ("SO_TIMESTAMPING", "SO_TIMESTAMPING_NEW"):
            v = out.get(name)
            flags = struct.unpack_from("=I", v)[0] if isinstance(v, bytes) and len(v) >= 4 else 0
            if flags & SOF_TIMESTAMPING_OPT_ID:
                raise NotRestorable(
                    f"has {name} with SOF_TIMESTAMPING_OPT_ID (its counter of sent bytes or "
                    "packets cannot be read back)"
                )

    def memberships(self, candidates: list[tuple[int, str]]) -> list[Membership]:
        return memberships(self.sock, candidates)

    def bpf_filter(self) -> bytes:
        """The classic BPF program attached with SO_ATTACH_FILTER (struct sock_filter
        array; b"" for none); NotRestorable for an eBPF one (SO_ATTACH_BPF: the kernel
        keeps no original program to give back)."""
        count = _get_filter(self.sock.fileno(), 0)
        return _get_filter(self.sock.fileno(), count) if count else b""

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
                if not data and self._at_eof(off):
                    break
                off += len(data)
                out.append((data, _norm(self.family, addr) if addr else None))
        return out

    def passes_creds(self) -> bool:
        """Does the socket ask for its senders' credentials (SO_PASSCRED, SO_PASSPIDFD)?
        Its reads then return them, and a stream read never joins two writers' bytes."""
        for opt in (SO_PASSCRED, SO_PASSPIDFD):
            with contextlib.suppress(OSError):
                if self.sock.getsockopt(SOL_SOCKET, opt):
                    return True
        return False

    def peek_scm(self, creds: bool, limit: int = 1 << 20) -> list[Queued]:
        """Every message waiting, with the files in flight it carries (SCM_RIGHTS: each
        peek installs them as new fds of ckpt, Queued.fds — the caller closes them) and,
        with `creds`, its sender's credentials; the queue is untouched.

        Stream sockets: a read stops right after the first skb that carries fds (a peek
        too), and with SO_PASSCRED where the writer changes; each Queued is what one
        peek returned from where the previous one stopped: plain bytes, or bytes ending
        with an skb that carries fds. Sent again so, each batch of fds comes back with
        the read of the same bytes (a reader of only the plain bytes before that skb
        now gets the fds too: a peek walks on to the skb and cannot tell where it
        starts). Dgram and seqpacket: one Queued per message, boundaries kept."""
        out: list[Queued] = []
        stream = self.type == socket.SOCK_STREAM
        _room_for_fds(self.scm_count())
        try:
            with self._peek_from_start():
                off, size = 0, STREAM_PEEK if stream else 1 << 16
                while len(out) < limit:
                    self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, off)
                    try:
                        got = _recv_scm(self.sock, size)
                    except BlockingIOError:
                        break
                    if not stream and got.flags & MSG_TRUNC:  # whole datagrams only
                        _close_all(got.fds)
                        size *= 4
                        if size > 1 << 28:
                            raise OSError(errno.EMSGSIZE, "datagram too large to save")
                        continue
                    if not got.data and not got.fds and (stream or self._at_eof(off)):
                        break
                    got.source = _norm(self.family, got.source) if got.source else None
                    if not creds:
                        got.creds = None
                    out.append(got)
                    off += len(got.data)
        except BaseException:
            _close_all([fd for q in out for fd in q.fds])
            raise
        return out

    def _at_eof(self, off: int) -> bool:
        """A seqpacket socket whose peer is gone reads EOF (0 bytes) once its queue is
        read, again and again: past every queued byte (SIOCINQ counts them all) with
        POLLRDHUP, an empty read is that EOF (a zero-length record there is lost)."""
        if self.type != socket.SOCK_SEQPACKET or off < self.ioctl_int(SIOCINQ):
            return False
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return bool(dict(p.poll(0)).get(self.sock.fileno(), 0) & select.POLLRDHUP)

    def scm_count(self) -> int:
        """How many files are in flight in the queue (fdinfo `scm_fds`)."""
        from . import procfs

        try:
            raw = procfs.read_bytes(os.getpid(), "fdinfo", str(self.sock.fileno()))
            return int(procfs.parse_fdinfo(raw).extra.get("scm_fds", "0") or 0)
        except (OSError, ValueError):
            return 0

    @contextlib.contextmanager
    def _peek_from_start(self):
        old = self.sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
        self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            yield
        finally:
            self.sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)


SO_PASSCRED, SO_PASSPIDFD = 16, 76
SCM_RIGHTS, SCM_CREDENTIALS, SCM_PIDFD = 1, 2, 4
MSG_CMSG_CLOEXEC = 0x40000000
SCM_MAX_FD = 253  # the most fds one message carries (include/net/scm.h)
# room for 253 fds, credentials, a pidfd and a security label (SO_PASSSEC)
ANC_SPACE = 8192
# A stream peek's buffer: larger than any skb a unix stream send makes (half the send
# buffer, at most SKB_MAX_HEAD + 32 KiB), so an skb that carries fds is read whole.
STREAM_PEEK = 1 << 20


@dataclass
class Queued:
    """One message (or stream segment) waiting in a unix socket, as a peek returned it."""

    data: bytes
    fds: list[int]  # ckpt's own fds of the files in flight with it (SCM_RIGHTS)
    creds: tuple[int, int, int] | None  # (pid, uid, gid) when asked for
    flags: int = 0
    source: object = None


def _recv_scm(sock: socket.socket, size: int) -> Queued:
    """One MSG_PEEK recvmsg with room for every control message; the fds it installs
    (SCM_RIGHTS, and the SCM_PIDFD of SO_PASSPIDFD) are close-on-exec and ckpt's."""
    data, anc, flags, addr = sock.recvmsg(
        size, ANC_SPACE, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    creds = None
    for level, kind, raw in anc:
        if level != SOL_SOCKET:
            continue
        if kind == SCM_RIGHTS:
            fds += struct.unpack(f"={len(raw) // 4}i", raw[: len(raw) // 4 * 4])
        elif kind == SCM_CREDENTIALS and len(raw) >= 12:
            creds = struct.unpack("=iII", raw[:12])
        elif kind == SCM_PIDFD and len(raw) >= 4:
            os.close(struct.unpack("=i", raw[:4])[0])
    if flags & MSG_CTRUNC:
        _close_all(fds)
        raise OSError(errno.EMSGSIZE, "the control messages of a queued message did not fit")
    return Queued(data, fds, creds, flags, addr or None)


def _room_for_fds(n: int) -> None:
    """Let ckpt hold `n` more fds at once (every file in flight of a queue is installed
    by the peeks): its soft RLIMIT_NOFILE raised towards the hard one when needed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + n + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send_scm(
    sock: socket.socket,
    data: bytes,
    fds: list[int],
    creds: tuple[int, int, int] | None = None,
    dest: bytes | None = None,
) -> None:
    """One message (a stream: one send) carrying `fds` (SCM_RIGHTS, ckpt's own fds) and
    `creds` (SCM_CREDENTIALS: pid, uid, gid), never blocking; a stream send the kernel
    cut short is finished without them (they went with its first skb)."""
    anc = []
    if creds is not None:
        anc.append((SOL_SOCKET, SCM_CREDENTIALS, struct.pack("=iII", *creds)))
    if fds:
        anc.append((SOL_SOCKET, SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds)))
    addr = None
    if dest is not None:
        addr = os.fsdecode(dest) if dest[:1] != b"\0" else dest
    n = sock.sendmsg([data], anc, MSG_DONTWAIT, addr) if addr is not None else (
        sock.sendmsg([data], anc, MSG_DONTWAIT)
    )  # fmt: skip
    if sock.type == socket.SOCK_STREAM and n < len(data):
        rest = [(SOL_SOCKET, SCM_CREDENTIALS, anc[0][2])] if creds is not None else []
        view = memoryview(data)[n:]
        while view:
            view = view[sock.sendmsg([view], rest, MSG_DONTWAIT) :]


def read_option(sock: socket.socket, o: Opt) -> int | bytes:
    """One option as the image keeps it: an int, raw bytes, a name without its NULs, or
    (kind "ifindex") the interface's name (indexes differ between hosts), 0 for none."""
    if o.kind == "int" or o.kind == "ifindex":
        v = sock.getsockopt(o.level, o.opt)
        if o.kind == "ifindex" and o.name in _NET_ORDER:
            v = socket.ntohl(v & 0xFFFFFFFF)
        if o.kind == "ifindex" and v:
            try:
                return os.fsencode(socket.if_indextoname(v))
            except OSError as exc:
                raise NotRestorable(f"{o.name} names interface {v}, which has no name") from exc
        return v
    raw = sock.getsockopt(o.level, o.opt, o.size)
    if o.size == _EXTHDR and len(raw) == _EXTHDR:
        raise NotRestorable(f"has an {o.name} header of {_EXTHDR} bytes or more")
    return raw.split(b"\0", 1)[0] if o.kind == "str" else raw


def show_option(v: int | bytes) -> str:
    if isinstance(v, int):
        return str(v)
    if v and all(32 <= c < 127 for c in v):
        return v.decode()
    return v.hex() or "(empty)"


def _get_filter(fd: int, count: int) -> int | bytes:
    """getsockopt(SO_GET_FILTER): with count 0, how many instructions; else the program.
    Through libc: the kernel takes and gives the length in instructions, not bytes,
    which socket.getsockopt cannot express."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(max(count, 1) * 8)
    ln = ctypes.c_uint32(count)
    if libc.getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, buf if count else None, ctypes.byref(ln)):
        err = ctypes.get_errno()
        if err == errno.EACCES:
            raise NotRestorable(
                "has an eBPF socket filter (SO_ATTACH_BPF: the kernel keeps no program to "
                "read back)"
            )
        raise OSError(err, f"getsockopt SO_GET_FILTER: {os.strerror(err)}")
    if not count:
        return ln.value
    if ln.value != count:
        raise OSError(errno.EAGAIN, "the socket filter changed while it was read")
    return buf.raw[: count * 8]


def _has_tcp_ao(fd: int) -> bool:
    """TCP_AO_INFO answers for a socket with TCP-AO keys (ENOENT without; ENOPROTOOPT on
    a kernel without TCP-AO). Through libc: the kernel reads the zeroed struct
    tcp_ao_info_opt (48 bytes) it is given first."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(48)
    ln = ctypes.c_uint32(48)
    return libc.getsockopt(fd, SOL_TCP, TCP_AO_INFO, buf, ctypes.byref(ln)) == 0


# -- multicast group memberships -------------------------------------------------------------

MCAST_JOIN_GROUP, MCAST_MSFILTER = 42, 48
MCAST_EXCLUDE, MCAST_INCLUDE = 0, 1
_SS = 128  # struct sockaddr_storage
_GF_HEAD = 8 + _SS + 8  # struct group_filter up to gf_slist: interface, group, fmode, numsrc


@dataclass
class Membership:
    """One multicast group a socket joined (model.McastGroup)."""

    iface: str
    group: str
    include: bool  # MCAST_INCLUDE: only from `sources`; else from all but them
    sources: list[str]


def groups_joined(pid: int) -> list[tuple[int, str]]:
    """(interface index, group) of every multicast group joined in the network
    namespace of `pid` (/proc/PID/net/igmp and igmp6, by sockets or the kernel): where a
    socket's memberships are looked for (TargetSocket.memberships)."""
    from ..errors import CkptError
    from . import procfs

    out: list[tuple[int, str]] = []
    try:
        v4 = procfs.read_bytes(pid, "net", "igmp").decode()
    except (OSError, CkptError):
        v4 = ""
    index = 0
    for line in v4.splitlines()[1:]:
        f = line.split()
        if not f:
            continue
        if line[:1].isdigit():  # "Idx Device : Count Querier", then its groups indented
            index = int(f[0])
        elif index:  # the group's __be32 as the host prints an int
            out.append((index, socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(f[0], 16)))))
    try:
        v6 = procfs.read_bytes(pid, "net", "igmp6").decode()
    except (OSError, CkptError):
        v6 = ""
    for line in v6.splitlines():
        f = line.split()
        if len(f) >= 3 and len(f[2]) == 32:
            out.append((int(f[0]), socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[2]))))
    return out


def _storage(addr: str) -> bytes:
    """A struct sockaddr_storage holding an IPv4 or IPv6 address."""
    if ":" in addr:
        raw = struct.pack("=H6x", socket.AF_INET6) + socket.inet_pton(socket.AF_INET6, addr)
    else:
        raw = struct.pack("=H2x", socket.AF_INET) + socket.inet_pton(socket.AF_INET, addr)
    return raw.ljust(_SS, b"\0")


def _from_storage(raw: bytes) -> str:
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return socket.inet_ntop(socket.AF_INET, raw[4:8])


def _group_filter(index: int, group: str, fmode: int, sources: list[str], room: int = 0) -> bytes:
    """struct group_filter (MCAST_MSFILTER) with room for `room` sources at least."""
    n = max(room, len(sources))
    head = struct.pack("=I4x", index) + _storage(group) + struct.pack("=II", fmode, n)
    return head + b"".join(map(_storage, sources)).ljust(n * _SS, b"\0")


def _msfilter(fd: int, level: int, index: int, group: str) -> tuple[int, list[str]] | None:
    """(filter mode, sources) of the socket's membership of `group` on interface `index`;
    None if it has none. Through libc: the kernel reads which group from the buffer."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    room = 16
    while True:
        buf = ctypes.create_string_buffer(_group_filter(index, group, 0, [], room))
        ln = ctypes.c_uint32(len(buf.raw))
        if libc.getsockopt(fd, level, MCAST_MSFILTER, buf, ctypes.byref(ln)):
            err = ctypes.get_errno()
            if err in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENOPROTOOPT, errno.ENODEV):
                return None
            raise OSError(err, f"getsockopt MCAST_MSFILTER {group}: {os.strerror(err)}")
        fmode, count = struct.unpack_from("=II", buf.raw, 8 + _SS)
        if count <= room:
            raw = buf.raw
            return fmode, [_from_storage(raw[_GF_HEAD + i * _SS :]) for i in range(count)]
        room = count


def memberships(sock: socket.socket, candidates: list[tuple[int, str]]) -> list[Membership]:
    """The multicast groups this socket joined, each with its source filter, among
    `candidates` ((interface index, group): groups_joined()). No call lists one
    socket's groups; MCAST_MSFILTER answers for a group the socket joined on that
    interface (EADDRNOTAVAIL otherwise)."""
    out = []
    for index, group in sorted(set(candidates)):
        v6 = ":" in group
        if v6 and sock.family != socket.AF_INET6:
            continue
        got = _msfilter(sock.fileno(), SOL_IPV6 if v6 else SOL_IP, index, group)
        if got is None:
            continue
        try:
            name = socket.if_indextoname(index)
        except OSError as exc:
            raise NotRestorable(f"joined {group} on interface {index}, which has no name") from exc
        out.append(Membership(name, group, got[0] == MCAST_INCLUDE, got[1]))
    return out


def join_groups(sock: socket.socket, groups: list) -> None:
    """Join each group (model.McastGroup) on its interface, then set its source filter."""
    for g in groups:
        index = socket.if_nametoindex(g.iface)
        level = SOL_IPV6 if ":" in g.group else SOL_IP
        sock.setsockopt(level, MCAST_JOIN_GROUP, struct.pack("=I4x", index) + _storage(g.group))
        if g.include or g.sources:
            fmode = MCAST_INCLUDE if g.include else MCAST_EXCLUDE
            sock.setsockopt(level, MCAST_MSFILTER, _group_filter(index, g.group, fmode, g.sources))


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER: a struct sock_fprog pointing at the program (ctypes keeps it
    alive for the call)."""
    import ctypes

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("=HxxxxxxQ", len(program) // 8, ctypes.addressof(buf))
    sock.setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, fprog)


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
    """(level, optname, bytes to setsockopt) for an option as the image keeps it."""
    o = SPECS[name]
    if o.kind == "ifindex":
        index = socket.if_nametoindex(os.fsdecode(value)) if isinstance(value, bytes) else value
        if name in _NET_ORDER:
            index = socket.htonl(index)
        value = struct.unpack("=i", struct.pack("=I", index))[0]
    raw = value if isinstance(value, bytes) else struct.pack("=i", value)
    return o.level, o.opt, raw


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
    """Set options as the image keeps them, in the image's order (option_table's)."""
    for name, value in options.items():
        if name not in SPECS or name in skip or (only is not None and name not in only):
            continue
        level, opt, raw = pack_option(name, value)
        if name == "SO_LINGER" and len(raw) == 8:
            onoff, secs = struct.unpack("=ii", raw)
            if not onoff and secs:  # off, with the time it had while it was on
                sock.setsockopt(level, opt, struct.pack("=ii", 1, secs))
        sock.setsockopt(level, opt, raw)


def check_options(sock: socket.socket, options: dict, skip=()) -> str | None:
    """The first option of `options` that reads back otherwise on the restored socket
    (what the kernel moves by itself aside): "NAME is X, was Y"; None if all agree."""
    for name, value in options.items():
        if name not in SPECS or name in skip or name in MOVING:
            continue
        try:
            got = read_option(sock, SPECS[name])
        except (OSError, NotRestorable):
            continue
        if got != value:
            return f"{name} is {show_option(got)}, was {show_option(value)}"
    return None


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
