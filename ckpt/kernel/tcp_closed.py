"""A TCP socket in state CLOSE that had a connection, built again by the kernel itself.

What its process observes of such a socket (the kernel's tcp_done, after a reset, a
timeout, both FINs acknowledged, or a refused connect; measured on 6.18):

- state CLOSE, shutdown SHUTDOWN_MASK: recv gives the data still unread, then the
  pending error once (ECONNRESET, EPIPE for a reset after the peer's FIN,
  ECONNREFUSED for a refused connect, ETIMEDOUT…), then 0; after the peer's FIN
  (SOCK_DONE) recv gives 0 at once and the error stays for SO_ERROR;
- getsockname its old address and port, getpeername ENOTCONN;
- its port is released (bind() on it succeeds again, another socket may take the
  port) unless it was bound explicitly or accepted through a listener
  (SOCK_BINDPORT_LOCK);
- connect(): EISCONN once connected; a connect that failed without a second
  connect() (SS_CONNECTING) gives the error and makes the socket reusable;
  listen(): EINVAL; send(): the error, else EPIPE.

A socket merely bound to that address shows none of this. So the restore builds a
real connection from the address to a helper of ckpt's on that same local address
and has the kernel close it again: the helper accepts it, sends the unread data,
its FIN if the peer's FIN had arrived, and resets it (SO_LINGER 0): the socket
goes to CLOSE with the data queued and ECONNRESET, or EPIPE after the FIN. A
refused connect is a non-blocking connect to a port the helper holds without
listening (ECONNREFUSED, SS_CONNECTING). An error the process had read already
is read once more (SO_ERROR clears it). A socket whose port was released gets
it from connect() itself (IP_LOCAL_PORT_RANGE narrowed to that port: no
bind lock), and the kernel releases it again at the close. A socket whose
process had disconnected it since (connect(AF_UNSPEC), or a failed blocking
connect: state CLOSE, shutdown cleared, the port released but still named) is
built the same way and disconnected again.

What cannot be built again is refused at the dump (`unsupported`): a pending error no
reset or refused connect gives (ETIMEDOUT, EHOSTUNREACH…: the kernel sets them only
after retransmitting to the real peer), ECONNRESET after the peer's FIN.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import time

from . import procfs
from .sockets import SIOCINQ, SO_RCVBUFFORCE, SOL_SOCKET, SOL_TCP
from .tcp_repair import (
    ACK,
    INJECT_MARK,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_INFO,
    TCP_MAXSEG,
    TCP_NO_QUEUE,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR_OPTIONS,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    TCP_SEND_QUEUE,
    TCPI_OPT_TIMESTAMPS,
    TCPOPT_MSS,
    inject,
    peer_fin_in,
    state_of,
)

SOL_IP = 0
IP_BIND_ADDRESS_NO_PORT, IP_LOCAL_PORT_RANGE = 24, 51
IPV6_V6ONLY = 26
TCP_REPAIR, TCP_REPAIR_ON, TCP_REPAIR_OFF_NO_WP = 19, 1, -1
BUILD_TIMEOUT = 5.0  # seconds for each step of the loopback connection

# the errors each way of closing gives (the reset after the peer's FIN: EPIPE)
_BY_RESET = {0, errno.ECONNRESET, errno.EPIPE}
_BY_REFUSAL = {0, errno.ECONNREFUSED}


def unsupported(handshake: bool, error: int, fin: bool, disconnected: bool) -> str | None:
    """Why such a socket cannot be built again exactly (None: it can)."""
    if disconnected:  # any way of closing that leaves the error
        ok = _BY_RESET | _BY_REFUSAL
    elif handshake:
        ok = _BY_RESET
    else:
        ok = _BY_REFUSAL
    if error not in ok:
        name = errno.errorcode.get(error, str(error))
        return (
            f"its pending error {name} ({os.strerror(error)}) is one only the real peer's "
            "network gives (ckpt rebuilds a reset, a refused connect, or none)"
        )
    if error == errno.ECONNRESET and fin and handshake and not disconnected:
        return "it was reset after the peer's FIN and its own (ECONNRESET after EOF)"
    return None


def build(
    sock: socket.socket, local: tuple, c, *, v6only: int, port_range: int, no_port: int,
    user_mss: int,
) -> None:  # fmt: skip
    """Turn `sock` (ckpt's copy of the restorer's fresh TCP socket, non-blocking) into
    the closed socket `c` (a model TcpClosed) named `local`.

    v6only: its IPV6_V6ONLY (an IPv6 socket; set before it gets a port); port_range,
    no_port: its IP_LOCAL_PORT_RANGE and IP_BIND_ADDRESS_NO_PORT, which the build
    uses and puts back; user_mss: its TCP_MAXSEG, if the process set one (the MSS of
    a refused connect comes from it)."""
    host, port = local[0], int(local[1])
    scope = int(local[3]) if len(local) > 3 else 0
    v6 = sock.family == socket.AF_INET6
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = v6 and isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None
    if addr.is_unspecified:  # (disconnected: its address was reset; any local one does)
        addr = ipaddress.ip_address("::1" if v6 and v6only else "127.0.0.1")
        mapped = v6 and not v6only
    there = str(addr.ipv4_mapped if mapped else addr)  # where the helper is
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, v6only)
    if user_mss:
        sock.setsockopt(SOL_TCP, TCP_MAXSEG, user_mss)
    handshake = c.handshake
    if c.disconnected:  # any way of closing that leaves its error (and its MSS)
        handshake = c.error != errno.ECONNREFUSED
    with socket.socket(socket.AF_INET6 if v6 and not mapped else socket.AF_INET) as helper:
        helper.bind((there, 0, 0, scope) if v6 and not mapped else (there, 0))
        if handshake:
            helper.listen(1)
        # (not listening: the kernel answers the SYN with a reset)
        hport = helper.getsockname()[1]
        target = (
            (("::ffff:" + there) if mapped else there, hport, 0, scope) if v6 else (there, hport)
        )
        _take_address(sock, c, (host, port, scope), target, v6, v6only)
        if handshake and c.inq:  # room for the unread data at once
            sock.setsockopt(SOL_SOCKET, SO_RCVBUFFORCE, 2 * len(c.inq) + (1 << 16))
        rc = sock.connect_ex(target)
        if rc not in (0, errno.EINPROGRESS):
            raise OSError(rc, f"connect to ckpt's helper at {there}:{hport}: {os.strerror(rc)}")
        if handshake:
            _reset(sock, helper, target, c)
        else:
            _wait(lambda: state_of(sock) == TCP_CLOSE, "the refused connect to close")
    got = sock.getsockname()[1]
    if got != port:
        raise OSError(0, f"it came back on port {got}, not {port}")
    if not c.error:
        sock.getsockopt(SOL_SOCKET, socket.SO_ERROR)  # the process had read it: read again
    if not c.port_held:
        sock.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", port_range))
        sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, no_port)
    if c.disconnected:
        _disconnect(sock)


def _take_address(sock, c, name: tuple, target, v6: bool, v6only: int) -> None:
    """The socket's local name, with the port lock the original had: a held port by
    bind() (in repair mode, whose forced reuse shares a port with the listener an
    accepted socket came through), a released one from connect() (IP_LOCAL_PORT_RANGE:
    that port only), an address the route would not choose by an address-only bind."""
    host, port, scope = name
    a = ipaddress.ip_address(host.split("%", 1)[0])
    plain6 = isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is None
    if c.port_held:
        where = (host, port, 0, scope) if v6 else (host, port)
        if v6 and not v6only and not a.is_unspecified and plain6:
            where = ("::", port, 0, 0)  # (binding a plain IPv6 address sets IPV6_V6ONLY)
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        try:
            sock.bind(where)
        finally:
            sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        return
    sock.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", port | port << 16))
    if a.is_unspecified:
        return
    if not c.disconnected and _route_source(sock.family, target) == a:
        return  # the original's address came from the route too
    sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((host, 0, 0, scope) if v6 else (host, 0))
    if v6 and not v6only:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, 0)  # (no port yet: allowed)


def _route_source(family: int, target) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return ipaddress.ip_address(probe.getsockname()[0].split("%", 1)[0])
    except OSError:
        return None


def _reset(sock: socket.socket, helper: socket.socket, target, c) -> None:
    """The helper accepts, sends the unread data (and its FIN), and resets."""
    helper.settimeout(BUILD_TIMEOUT)
    peer, _ = helper.accept()
    with peer:
        _wait(lambda: state_of(sock) == TCP_ESTABLISHED, "the connection to be established")
        rc = sock.connect_ex(target)  # a connect() that completes: SS_CONNECTED (EISCONN)
        if rc:
            raise OSError(rc, f"connect once established: {os.strerror(rc)}")
        _close_from(sock, peer, c)


def _close_from(sock: socket.socket, peer: socket.socket, c) -> None:
    """`peer`, the other end of `sock`'s connection, sends the unread data, the MSS is
    set, `peer` sends its FIN if the original had the peer's, and resets the connection:
    the kernel closes `sock` with ECONNRESET (EPIPE after the FIN)."""
    if c.inq:
        peer.settimeout(BUILD_TIMEOUT)
        peer.sendall(c.inq)
        _wait(lambda: _inq(sock) >= len(c.inq), f"the {len(c.inq)} unread bytes to arrive")
    if c.mss:
        _set_mss(sock, peer.getsockname(), c.mss)
    if c.fin or c.error == errno.EPIPE:
        peer.shutdown(socket.SHUT_WR)
        _wait(lambda: peer_fin_in(sock), "the FIN to arrive")
    peer.setsockopt(SOL_SOCKET, socket.SO_LINGER, struct.pack("=ii", 1, 0))
    peer.close()
    _wait(lambda: state_of(sock) == TCP_CLOSE, "the reset to close it")


# -- a port connect() cannot give: the socket comes from accept() -----------------------


def connect_gives(port: int) -> bool:
    """Can connect() give a socket this port: in net.ipv4.ip_local_port_range and not in
    ip_local_reserved_ports? (The port of an accepted socket is its listener's, as a
    rule one connect() never gives: such a closed socket comes from accept() instead,
    whose sockets hold no port lock either: build_accepted.)"""
    try:
        with open(procfs.system("sys", "net", "ipv4", "ip_local_port_range")) as f:
            lo, hi = map(int, f.read().split())
        with open(procfs.system("sys", "net", "ipv4", "ip_local_reserved_ports")) as f:
            reserved = f.read().strip()
    except (OSError, ValueError):
        return True
    if not lo <= port <= hi:
        return False
    for part in filter(None, reserved.split(",")):
        a, _, b = part.partition("-")
        if int(a) <= port <= int(b or a):
            return False
    return True


def listen_for(sock: socket.socket, local: tuple, v6only: int) -> None:
    """Make `sock` (ckpt's copy of a temporary socket of the restorer's) listen on the
    port of `local`, on every address (so that its children hold no address lock, as an
    accepted socket of a server listening on every address), SO_REUSEADDR for the
    port's TIME_WAITs; the restorer then accepts the closed socket from it."""
    sock.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_V6ONLY, v6only)
        sock.bind(("::", int(local[1]), 0, 0))
    else:
        sock.bind(("0.0.0.0", int(local[1])))
    sock.listen(1)


def dial(local: tuple, listener: socket.socket) -> socket.socket:
    """ckpt's helper connected to `local` (`listener`, listen_for's), once `listener`
    has the connection to give (its accept never waits)."""
    host = local[0].split("%", 1)[0]
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        helper, target = socket.socket(socket.AF_INET), (str(addr.ipv4_mapped), int(local[1]))
    elif isinstance(addr, ipaddress.IPv6Address):
        scope = int(local[3]) if len(local) > 3 else 0
        helper, target = socket.socket(socket.AF_INET6), (host, int(local[1]), 0, scope)
    else:
        helper, target = socket.socket(socket.AF_INET), (host, int(local[1]))
    try:
        # marked: the dump's network lock holds the SYNs to the port (capture/backlog.py)
        # and lets marked segments in
        helper.setsockopt(SOL_SOCKET, socket.SO_MARK, INJECT_MARK)
        helper.settimeout(BUILD_TIMEOUT)
        helper.connect(target)
        p = select.poll()
        p.register(listener, select.POLLIN)
        _wait(lambda: bool(p.poll(0)), "the connection to be accepted")
    except OSError:
        helper.close()
        raise
    return helper


def build_accepted(sock: socket.socket, helper: socket.socket, c, *, reuse: int) -> None:
    """Close `sock` (ckpt's copy of what the restorer accepted from listen_for's listener,
    `helper` its other end) as build() closes a connected one; SO_REUSEADDR as dumped
    (the listener's was inherited)."""
    with helper:
        _wait(lambda: state_of(sock) == TCP_ESTABLISHED, "the accepted connection")
        _close_from(sock, helper, c)
    if not c.error:
        sock.getsockopt(SOL_SOCKET, socket.SO_ERROR)  # the process had read it: read again
    sock.setsockopt(SOL_SOCKET, socket.SO_REUSEADDR, reuse)


def _set_mss(sock: socket.socket, peer: tuple, mss: int) -> None:
    """The MSS the original kept (mss_cache: TCP_MAXSEG and tcpi_snd_mss read it on a
    closed socket), as tcp_repair.sync_mss gives a rebuilt connection its own: in repair
    mode the clamp that makes it (TCP_REPAIR_OPTIONS), no window seen yet, then an ACK in
    the helper's name opening the largest window there is (so that no later segment
    opens a larger one and has the kernel compute it again)."""
    opts = struct.unpack_from("=B", sock.getsockopt(SOL_TCP, TCP_INFO, 8), 5)[0]
    header = 12 if opts & TCPI_OPT_TIMESTAMPS else 0  # the timestamp option's bytes
    sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv_nxt = sock.getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        snd_nxt = sock.getsockopt(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, struct.pack("=II", TCPOPT_MSS, mss + header))
        w = struct.unpack("=5I", sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
        none_seen = ((rcv_nxt - 1) & 0xFFFFFFFF, 0, 0, w[3], w[4])
        sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *none_seen))
        local = sock.getsockname()
        inject(local, peer, rcv_nxt, snd_nxt, ACK, 0xFFFF)
        end = time.monotonic() + BUILD_TIMEOUT
        while not struct.unpack("=5I", sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))[2]:
            if time.monotonic() > end:
                sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *w))
                raise OSError(0, f"waited {BUILD_TIMEOUT:g} s for the ACK that sets the MSS")
            time.sleep(0.001)
        # (the window stays the largest: no later segment has the MSS computed again)
    finally:
        sock.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)


def _inq(sock: socket.socket) -> int:
    import fcntl

    return struct.unpack("=i", fcntl.ioctl(sock.fileno(), SIOCINQ, b"\0" * 4))[0]


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): what its process did (or a failed blocking connect)."""
    import ctypes  # (here: ctypes costs the restore ~10 ms to import)

    libc = ctypes.CDLL(None, use_errno=True)
    unspec = ctypes.create_string_buffer(16)  # sa_family 0
    if libc.connect(sock.fileno(), unspec, 16):
        e = ctypes.get_errno()
        raise OSError(e, f"connect(AF_UNSPEC): {os.strerror(e)}")


def _wait(done, what: str) -> None:
    end = time.monotonic() + BUILD_TIMEOUT
    while not done():
        if time.monotonic() > end:
            raise OSError(0, f"waited {BUILD_TIMEOUT:g} s for {what}")
        select.select([], [], [], 0.001)


def pending_error(sock: socket.socket) -> bool:
    """Has the socket an error its process has not read (POLLERR; the error queue,
    with SO_TIMESTAMPING's reports, shows there too)?"""
    p = select.poll()
    p.register(sock, select.POLLERR)
    return any(ev & select.POLLERR for _, ev in p.poll(0))  # (POLLHUP comes unasked)


def read_error(sock: socket.socket, unread: int, peek_off: int) -> tuple[int, bool]:
    """(the pending error, whether the peer's FIN came before it): read on ckpt's
    duplicate, which takes the error from the process too (the kernel has no other way
    to show it). A peek past the unread data (SO_PEEK_OFF) reaches the FIN — or, with
    none, the error, which recv gives (and clears) before SO_ERROR could."""
    fin = False
    with contextlib.ExitStack() as stack:
        if unread:
            sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, unread)
            stack.callback(sock.setsockopt, SOL_SOCKET, SO_PEEK_OFF, peek_off)
        try:
            got = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            got = None
        except OSError as exc:
            return exc.errno or 0, False
    if got == b"":
        fin = True
    elif got:
        raise OSError(0, "the peek did not reach the end of the unread data")
    error = sock.getsockopt(SOL_SOCKET, socket.SO_ERROR)
    return error, fin


SO_PEEK_OFF = 42
