"""TCP_REPAIR: read a connection's sequence numbers, queues and negotiated options
(from ckpt's duplicate of the target's socket), the option blobs a restorer sets
to rebuild it, the replay of the FINs of a closing connection, and the silent
close of the dumped ones.

Sequence numbers (as in the kernel):  send side  snd_una ≤ snd_nxt ≤ write_seq,
SIOCOUTQ = write_seq - snd_una, SIOCOUTQNSD = write_seq - snd_nxt;
receive side copied_seq ≤ rcv_nxt, SIOCINQ = rcv_nxt - copied_seq. In repair
mode TCP_QUEUE_SEQ reads write_seq / rcv_nxt of the selected queue and sets the
starting sequence of an empty one; data sent then lands in that queue as-is.

Closing states. A FIN takes one sequence number after the data: our own FIN is
counted in write_seq (and in SIOCOUTQ until the peer acks it, in SIOCOUTQNSD
until it is sent) once the application shut down its write side (FIN_WAIT1,
FIN_WAIT2, CLOSING, LAST_ACK); the peer's FIN in rcv_nxt once it arrived
(CLOSE_WAIT, CLOSING, LAST_ACK; SIOCINQ leaves it out). TCP_REPAIR can only make
an ESTABLISHED connection, so ckpt keeps the sequences without the FINs (the
connection as it was before the first FIN, with the state it reached) and plays
the FINs again once the connection is rebuilt (replay_fins), as CRIU's soccr
does: our FIN by shutdown(SHUT_WR), the peer's FIN, when the peer is not
rebuilt with us, by a segment ckpt sends to our socket in the peer's name
(inject), acknowledged like the original. TIME_WAIT has no socket an fd holds
(the kernel moves the connection to a timewait socket and the fd's socket is
CLOSE).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from .sockets import (
    MSG_DONTWAIT,
    MSG_PEEK,
    SIOCINQ,
    SIOCOUTQ,
    SIOCOUTQNSD,
    SO_PEEK_OFF,
    SOL_SOCKET,
    SOL_TCP,
    TargetSocket,
)

TCP_INFO, TCP_MAXSEG = 11, 2
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE = 1, 4, 5, 7
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING = 8, 9, 11
# our FIN is in the send sequence: the application shut down its write side
OWN_FIN = frozenset({TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSING, TCP_LAST_ACK})
# the peer's FIN is in the receive sequence: read() returns EOF after the data
PEER_FIN = frozenset({TCP_CLOSE_WAIT, TCP_CLOSING, TCP_LAST_ACK})
# the connection states ckpt rebuilds
STATES = frozenset({TCP_ESTABLISHED}) | OWN_FIN | PEER_FIN


@dataclass
class TcpInfo:
    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    unacked: int  # listener: connections in the accept queue
    sacked: int  # listener: backlog
    segs_out: int = 0  # segments sent and received: 0 for a socket never connected
    segs_in: int = 0  # (or disconnected since: connect(AF_UNSPEC) clears them)
    delivered: int = 0  # > 0 once a handshake completed (its SYN counts)
    snd_mss: int = 0  # the MSS it sends with (mss_cache)
    retrying: int = 0  # retransmissions, probes or backoff under way (a timeout's left)


def tcp_info(ts: TargetSocket) -> TcpInfo:
    raw = ts.raw_opt(SOL_TCP, TCP_INFO, 232).ljust(232, b"\0")  # (older kernels: shorter)
    state, _ca, retr, probes, backoff, options, wscale = struct.unpack_from("=7B", raw)
    unacked, sacked = struct.unpack_from("=II", raw, 24)
    segs_out, segs_in = struct.unpack_from("=II", raw, 136)
    (delivered,) = struct.unpack_from("=I", raw, 192)
    (snd_mss,) = struct.unpack_from("=I", raw, 16)
    return TcpInfo(state, options, wscale & 0xF, wscale >> 4, unacked, sacked, segs_out, segs_in,
                   delivered, snd_mss, retr | probes | backoff)  # fmt: skip


@dataclass
class RepairState:
    """Everything TCP_REPAIR needs to rebuild one connection; the sequences leave the
    FINs out (see the module's docstring), `state` says which ones to replay."""

    snd_seq: int  # write_seq (end of the send queue's data)
    rcv_seq: int  # rcv_nxt (end of the receive queue's data)
    outq: bytes  # send queue: sent-but-unacked data, then unsent data
    unsent: int  # bytes at the end of outq never sent
    inq: bytes  # receive queue (not read by the application yet)
    mss: int
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: list[int]  # snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
    state: int = TCP_ESTABLISHED  # TCP_INFO's tcpi_state

    @property
    def snd_una(self) -> int:
        return (self.snd_seq - len(self.outq)) & 0xFFFFFFFF

    @property
    def copied_seq(self) -> int:
        return (self.rcv_seq - len(self.inq)) & 0xFFFFFFFF


def _set(ts: TargetSocket, opt: int, value: int) -> None:
    ts.sock.setsockopt(SOL_TCP, opt, struct.pack("=i", value))


SO_REUSEADDR = 2


def repair_on(ts: TargetSocket) -> int:
    """Enter repair mode; returns the socket's SO_REUSEADDR, which repair mode
    overwrites (the kernel sets sk_reuse to SK_FORCE_REUSE, and to SK_NO_REUSE when
    repair is switched off): give it to repair_off()."""
    reuse = ts.int_opt(socket.SOL_SOCKET, SO_REUSEADDR)
    _set(ts, TCP_REPAIR, TCP_REPAIR_ON)
    return reuse


def repair_off(ts: TargetSocket, reuse: int) -> None:
    """Leave repair mode without the window probe a plain TCP_REPAIR_OFF sends, and
    put SO_REUSEADDR back as it was (a restart of a server whose connections ckpt read
    would otherwise fail to bind: "Address already in use")."""
    _set(ts, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    _set(ts, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    ts.set_int_opt(socket.SOL_SOCKET, SO_REUSEADDR, reuse)


def read_state(ts: TargetSocket, info: TcpInfo) -> RepairState:
    """Read a connection in repair mode (the caller turned it on), FINs left out."""
    own_fin = int(info.state in OWN_FIN)
    peer_fin = int(info.state in PEER_FIN)
    # a FIN not acked yet counts in SIOCOUTQ, one not sent yet in SIOCOUTQNSD: no data
    outq_len = max(ts.ioctl_int(SIOCOUTQ) - own_fin, 0)
    unsent = max(ts.ioctl_int(SIOCOUTQNSD) - own_fin, 0)
    inq_len = ts.ioctl_int(SIOCINQ)  # the kernel leaves the peer's FIN out already
    mss = ts.int_opt(SOL_TCP, TCP_MAXSEG)
    stamp = ts.int_opt(SOL_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
    window = list(struct.unpack("=5I", ts.raw_opt(SOL_TCP, TCP_REPAIR_WINDOW, 20)))
    _set(ts, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcv_seq = (ts.int_opt(SOL_TCP, TCP_QUEUE_SEQ) - peer_fin) & 0xFFFFFFFF
    inq = peek_exact(ts, inq_len, "receive")
    _set(ts, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    snd_seq = (ts.int_opt(SOL_TCP, TCP_QUEUE_SEQ) - own_fin) & 0xFFFFFFFF
    outq = peek_exact(ts, outq_len, "send")
    _set(ts, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    # the window we advertised starts at rcv_wup, which may count the peer's FIN: the
    # kernel takes no rcv_wup beyond rcv_nxt, so move it back and keep the right edge
    ahead = (window[4] - rcv_seq) & 0xFFFFFFFF
    if 0 < ahead < 1 << 31:
        window[4] = rcv_seq
        window[3] = (window[3] + ahead) & 0xFFFFFFFF
    return RepairState(
        snd_seq=snd_seq, rcv_seq=rcv_seq, outq=outq, unsent=unsent, inq=inq, mss=mss,
        options=info.options, snd_wscale=info.snd_wscale, rcv_wscale=info.rcv_wscale,
        timestamp=stamp, window=window, state=info.state,
    )  # fmt: skip


def peek_exact(ts: TargetSocket, length: int, which: str) -> bytes:
    if not length:
        return b""
    # a peek starts at, and moves, the SO_PEEK_OFF the application set (TCP has one since
    # Linux 6.9): read from the start, then put the application's offset back
    try:
        off = ts.peek_offset()
    except OSError:
        off = -1
    if off > 0:
        ts.set_int_opt(SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        data = ts.sock.recv(length + 1, MSG_PEEK | MSG_DONTWAIT)
    finally:
        if off >= 0:
            ts.set_int_opt(SOL_SOCKET, SO_PEEK_OFF, off)
    if len(data) != length:
        raise OSError(0, f"the {which} queue holds {len(data)} bytes, expected {length}")
    return data


# -- blobs the restorer passes to setsockopt --------------------------------------------------


def repair_options_blob(st: RepairState) -> bytes:
    opts = [(TCPOPT_MSS, st.mss)]
    if st.options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if st.options & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)))
    if st.options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(struct.pack("=II", code, val) for code, val in opts)


def window_blob(st: RepairState) -> bytes:
    return struct.pack("=5I", *st.window)


def int_blob(value: int) -> bytes:
    return struct.pack("=i", value if value < 1 << 31 else value - (1 << 32))


# -- the dumped connections' silent close ------------------------------------------------------
#
# ckpt keeps its duplicate of every dumped established socket until the dump is over
# (capture/sockets.py SocketCapture, closed by the orchestrator after the kill).
# Killing the target then does not close them (ckpt still holds a reference),
# so no FIN or RST leaves. On release, if the target is gone, each socket is put
# in repair mode and closed: a socket in repair mode closes silently. If the
# target is still running (--leave-running, snapshots, a failed dump), the
# duplicates are just dropped and the target's connections go on.


class HeldSockets:
    """One dump run's held duplicates, each with a pidfd of its process."""

    def __init__(self) -> None:
        self.items: list[tuple[int, TargetSocket]] = []  # (pidfd, socket)

    def add(self, pid: int, ts: TargetSocket) -> None:
        from .pidfd import pidfd_open

        self.items.append((pidfd_open(pid), ts))

    def release(self) -> None:
        items, self.items = self.items, []
        for pidfd, ts in items:
            try:
                readable, _, _ = select.select([pidfd], [], [], 0)
                if readable:  # the target exited: close without a word to the peer
                    with contextlib.suppress(OSError):
                        repair_on(ts)
            finally:
                ts.close()
                os.close(pidfd)


def rebuild(sock, local: tuple, remote: tuple, conn, before_bind, outside: bool = False) -> None:
    """Turn a fresh TCP socket (ckpt's copy of the restorer's) into the dumped
    connection `conn` (a model TcpConn), as it was before its FINs; it stays in
    repair mode until resume(), and replay_fins() gives it its FINs.

    before_bind(sock): options that must be set before bind (SO_REUSEADDR…).
    outside: the other end is not rebuilt with this one (--tcp-established). In
    FIN_WAIT2 our FIN is then queued here as already sent, so that nothing leaves
    (the network lock would drop it, and the kernel would count it unsent): the
    peer's acknowledgement comes from replay_fins.
    """
    from .sockets import grow_sndbuf

    def seti(opt: int, value: int) -> None:
        sock.setsockopt(SOL_TCP, opt, int_blob(value))

    seti(TCP_REPAIR, TCP_REPAIR_ON)
    before_bind(sock)
    seti(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    seti(TCP_QUEUE_SEQ, (conn.rcv_seq - len(conn.inq)) & 0xFFFFFFFF)
    seti(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    seti(TCP_QUEUE_SEQ, (conn.snd_seq - len(conn.outq)) & 0xFFFFFFFF)
    sock.bind(local)
    sock.connect(remote)
    st = RepairState(
        snd_seq=conn.snd_seq, rcv_seq=conn.rcv_seq, outq=conn.outq, unsent=conn.unsent,
        inq=conn.inq, mss=conn.mss, options=conn.options, snd_wscale=conn.snd_wscale,
        rcv_wscale=conn.rcv_wscale, timestamp=conn.timestamp, window=conn.window,
    )  # fmt: skip
    sock.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, repair_options_blob(st))
    if conn.options & TCPI_OPT_TIMESTAMPS:
        seti(TCP_TIMESTAMP, conn.timestamp)
    sent = len(conn.outq) - conn.unsent
    if conn.inq:
        seti(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        _queue(sock, conn.inq)
    if sent:
        grow_sndbuf(sock, len(conn.outq))
        seti(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        _queue(sock, conn.outq[:sent])
    sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, window_blob(st))  # established only
    sync_mss(sock, sock.getsockname(), remote, conn)  # (bound to [::]: its real address)
    if outside and conn.state == TCP_FIN_WAIT2:
        seti(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.shutdown(socket.SHUT_WR)
    seti(TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


MSS_WAIT = 0.2  # seconds for the ACK sync_mss sends to reach the socket (on this host: at once)


def sync_mss(sock, local: tuple, remote: tuple, conn) -> None:
    """Have the kernel compute the rebuilt connection's MSS as the original's.

    The kernel computes a connection's MSS (mss_cache: what TCP_MAXSEG and tcpi_snd_mss
    read, the size of every segment it sends) when it connects, from the clamp it
    has then, and again only when an ACK opens the peer's window beyond the largest
    it has seen (tcp_ack_update_window → tcp_sync_mss: the path's MSS, at most the
    clamp, at most half that window). A repair-mode connect comes before
    TCP_REPAIR_OPTIONS gives the clamp back, so the MSS was the 536-byte default's
    (524 with timestamps, on loopback where the original had ~65483) until the window
    grew past the restored largest, which a connection that had already reached its
    largest window never does. So, in repair mode: no window seen yet, then an ACK in
    the peer's name (inject: ack = snd_una, no data, the largest window the peer had
    offered) makes the kernel compute it from the clamp, the path and that window,
    as it had for the original; then the window goes back exactly as dumped.

    An ACK that does not arrive (an image whose network lock does not let ckpt's
    segments in) leaves the default MSS, as before; the window is put back either way.
    """
    _wl1, _snd_wnd, max_window, rcv_wnd, rcv_wup = conn.window
    shift = conn.snd_wscale if conn.options & TCPI_OPT_WSCALE else 0
    field = min(max_window >> shift, 0xFFFF)
    if not field:
        return
    none_seen = ((conn.rcv_seq - 1) & 0xFFFFFFFF, 0, 0, rcv_wnd, rcv_wup)
    sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *none_seen))
    try:
        snd_una = (conn.snd_seq - len(conn.outq)) & 0xFFFFFFFF
        inject(local, remote, conn.rcv_seq, snd_una, ACK, field)
        end = time.monotonic() + MSS_WAIT
        while not struct.unpack("=5I", sock.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))[2]:
            if time.monotonic() > end:
                break
            time.sleep(0.001)
    except OSError:
        pass  # (no raw socket here: the default MSS, as before)
    finally:
        sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", *conn.window))


def resume(sock, conn, reuse: int) -> None:
    """Leave repair mode (once both ends of a loopback pair are rebuilt: the window
    probe this sends would be answered with a reset by a missing peer), put back the
    SO_REUSEADDR that leaving repair mode clears, then queue the part of the send
    queue that had never been sent, as an ordinary send."""
    from .sockets import grow_sndbuf

    sock.setsockopt(SOL_TCP, TCP_REPAIR, int_blob(TCP_REPAIR_OFF))
    sock.setsockopt(socket.SOL_SOCKET, SO_REUSEADDR, int_blob(reuse))
    if conn.unsent:
        grow_sndbuf(sock, len(conn.outq))
        _queue(sock, conn.outq[len(conn.outq) - conn.unsent :])


# -- closing connections: the FINs played again ------------------------------------------------

FIN_TIMEOUT = 5.0  # seconds for a replayed FIN to reach a socket on this host
INJECT_MARK = 0x636B7074  # SO_MARK of the segments ckpt sends in a peer's name ("ckpt")


@dataclass
class Closing:
    """One rebuilt connection out of repair mode (resume() done), for replay_fins."""

    sock: socket.socket  # ckpt's copy of the restorer's socket
    conn: object  # the model's TcpConn
    local: tuple
    remote: tuple
    partner: Closing | None = None  # the other end, when this restore rebuilt it too


def replay_fins(items: list[Closing]) -> None:
    """Give each rebuilt connection back the FINs its sequences left out.

    Both ends rebuilt here (a loopback connection inside the dump): each end's FIN
    is sent again by shutdown(SHUT_WR), as the application sent it, and the other end
    receives and acknowledges it over loopback as it did the first time. The FINs
    that came first go first (a LAST_ACK end sent its FIN after it received the
    other's), and a CLOSING end's before its peer's (it sent its FIN before the
    other's arrived). Whenever the other end had received the FIN at the dump, ckpt
    waits until it has it again, so the restored process reads EOF where it did.

    The other end outside (--tcp-established): our FIN by shutdown(SHUT_WR) (a peer
    that had it takes the copy as a duplicate and acknowledges it again); the peer's
    FIN, and its acknowledgement of ours in FIN_WAIT2, by segments sent in its name
    (inject), which the real peer never sees."""
    inside = [c for c in items if c.partner is not None]
    first = [c for c in inside if c.conn.state == TCP_CLOSING]
    first += [c for c in inside if c.conn.state in (TCP_FIN_WAIT1, TCP_FIN_WAIT2)]
    second = [c for c in inside if c.conn.state == TCP_LAST_ACK]
    for phase in (first, second):
        for c in phase:
            c.sock.shutdown(socket.SHUT_WR)
        for c in phase:
            p = c.partner
            if p is not None and p.conn.state in PEER_FIN:
                _wait(lambda p=p: peer_fin_in(p.sock), "the FIN of the other end", p)
    for c in items:
        if c.partner is None and c.conn.state != TCP_ESTABLISHED:
            _replay_outside(c)


def _replay_outside(c: Closing) -> None:
    conn, state = c.conn, c.conn.state
    snd_una = (conn.snd_seq - len(conn.outq)) & 0xFFFFFFFF
    if state in (TCP_CLOSE_WAIT, TCP_LAST_ACK):  # the peer's FIN came first
        inject(c.local, c.remote, conn.rcv_seq, snd_una, FIN | ACK, _peer_window(conn))
        _wait(lambda: peer_fin_in(c.sock), "the peer's FIN, sent again in its name,", c)
    if state in OWN_FIN and state_of(c.sock) in (TCP_ESTABLISHED, TCP_CLOSE_WAIT):
        c.sock.shutdown(socket.SHUT_WR)  # (in FIN_WAIT2 rebuild() queued it already)
    if state == TCP_CLOSING:  # the peer's FIN, not acknowledging ours
        inject(c.local, c.remote, conn.rcv_seq, snd_una, FIN | ACK, _peer_window(conn))
        _wait(lambda: peer_fin_in(c.sock), "the peer's FIN, sent again in its name,", c)
    elif state == TCP_FIN_WAIT2:  # the peer had acknowledged our FIN
        ack = (conn.snd_seq + 1) & 0xFFFFFFFF
        inject(c.local, c.remote, conn.rcv_seq, ack, ACK, _peer_window(conn))
        _wait(lambda: state_of(c.sock) == TCP_FIN_WAIT2, "the acknowledgement of our FIN", c)


def peer_fin_in(sock: socket.socket) -> bool:
    """Has the peer's FIN arrived (RCV_SHUTDOWN: read() gives EOF after the data)?"""
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    return bool(p.poll(0))


def state_of(sock: socket.socket) -> int:
    return sock.getsockopt(SOL_TCP, TCP_INFO, 8)[0]


def _wait(done, what: str, c: Closing) -> None:
    end = time.monotonic() + FIN_TIMEOUT
    while not done():
        if time.monotonic() > end:
            raise OSError(
                0, f"{what} did not reach {_where(c.local)} from {_where(c.remote)} in "
                f"{FIN_TIMEOUT:g} s (state {state_of(c.sock)})",
            )  # fmt: skip
        time.sleep(0.001)


def _where(a) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def _peer_window(conn) -> int:
    """The window field the peer last sent, as our side scaled it (snd_wnd)."""
    shift = conn.snd_wscale if conn.options & TCPI_OPT_WSCALE else 0
    return min(conn.window[1] >> shift, 0xFFFF)


FIN, ACK = 0x01, 0x10


def inject(local: tuple, remote: tuple, seq: int, ack: int, flags: int, window: int) -> None:
    """Send one TCP segment without data from `remote` to our socket at `local`, through
    a raw socket marked INJECT_MARK (the network lock lets marked segments through to
    the restored socket: kernel/netlock.py). No timestamp option: the kernel checks
    PAWS only on segments that carry one."""
    src, dst = _ip(remote[0]), _ip(local[0])
    tcp = struct.pack("!HHIIBBHHH", int(remote[1]), int(local[1]), seq, ack, 5 << 4, flags,
                      window, 0, 0)  # fmt: skip
    if dst.version == 4:
        pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    else:
        pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(tcp), socket.IPPROTO_TCP)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if dst.version == 4:
        # IP_HDRINCL: the kernel fills in the checksum, the total length and the id
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0)
        family, dest = socket.AF_INET, (str(dst), 0)
        packet = ip + src.packed + dst.packed + tcp
    else:
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64)
        scope = int(local[3]) if len(local) > 3 else 0
        family, dest = socket.AF_INET6, (str(dst), 0, 0, scope)
        packet = ip + src.packed + dst.packed + tcp
    # IPPROTO_RAW: the header is ours (IP_HDRINCL, implied for IPv6 too)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INJECT_MARK)
        raw.sendto(packet, dest)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as it travels: an IPv4-mapped IPv6 one (a dual-stack socket's IPv4
    connection) as IPv4."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _queue(sock, data: bytes) -> None:
    """Send into the selected repair queue; the kernel wants modest linear chunks."""
    view = memoryview(data)
    chunk = 1 << 16
    while view:
        try:
            n = sock.send(view[:chunk], MSG_DONTWAIT)
        except OSError:
            if chunk <= 1024:
                raise
            chunk //= 2
            continue
        view = view[n:]
