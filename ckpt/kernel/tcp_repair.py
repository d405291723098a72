"""TCP_REPAIR: read an established connection's sequence numbers, queues and
negotiated options (from ckpt's duplicate of the target's socket), the option
blobs a restorer sets to rebuild it, and the silent close of the dumped ones.

Sequence numbers (as in the kernel):  send side  snd_una ≤ snd_nxt ≤ write_seq,
SIOCOUTQ = write_seq - snd_una, SIOCOUTQNSD = write_seq - snd_nxt;
receive side copied_seq ≤ rcv_nxt, SIOCINQ = rcv_nxt - copied_seq. In repair
mode TCP_QUEUE_SEQ reads write_seq / rcv_nxt of the selected queue and sets the
starting sequence of an empty one; data sent then lands in that queue as-is.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from dataclasses import dataclass

from .sockets import MSG_DONTWAIT, MSG_PEEK, SIOCINQ, SIOCOUTQ, SIOCOUTQNSD, SOL_TCP, TargetSocket

TCP_INFO, TCP_MAXSEG = 11, 2
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4


@dataclass
class TcpInfo:
    state: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    unacked: int  # listener: connections in the accept queue
    sacked: int  # listener: backlog


def tcp_info(ts: TargetSocket) -> TcpInfo:
    raw = ts.raw_opt(SOL_TCP, TCP_INFO, 104)
    state, _ca, _retr, _probes, _backoff, options, wscale = struct.unpack_from("=7B", raw)
    unacked, sacked = struct.unpack_from("=II", raw, 24)
    return TcpInfo(state, options, wscale & 0xF, wscale >> 4, unacked, sacked)


@dataclass
class RepairState:
    """Everything TCP_REPAIR needs to rebuild one established connection."""

    snd_seq: int  # write_seq (end of the send queue)
    rcv_seq: int  # rcv_nxt (end of the receive queue)
    outq: bytes  # send queue: sent-but-unacked data, then unsent data
    unsent: int  # bytes at the end of outq never sent
    inq: bytes  # receive queue (not read by the application yet)
    mss: int
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: list[int]  # snd_wl1 snd_wnd max_window rcv_wnd rcv_wup

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
    """Read a connection in repair mode (the caller turned it on)."""
    outq_len = ts.ioctl_int(SIOCOUTQ)
    unsent = ts.ioctl_int(SIOCOUTQNSD)
    inq_len = ts.ioctl_int(SIOCINQ)
    mss = ts.int_opt(SOL_TCP, TCP_MAXSEG)
    stamp = ts.int_opt(SOL_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
    window = list(struct.unpack("=5I", ts.raw_opt(SOL_TCP, TCP_REPAIR_WINDOW, 20)))
    _set(ts, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcv_seq = ts.int_opt(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    inq = _peek_exact(ts, inq_len, "receive")
    _set(ts, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    snd_seq = ts.int_opt(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    outq = _peek_exact(ts, outq_len, "send")
    _set(ts, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
    return RepairState(
        snd_seq=snd_seq, rcv_seq=rcv_seq, outq=outq, unsent=unsent, inq=inq, mss=mss,
        options=info.options, snd_wscale=info.snd_wscale, rcv_wscale=info.rcv_wscale,
        timestamp=stamp, window=window,
    )  # fmt: skip


def _peek_exact(ts: TargetSocket, length: int, which: str) -> bytes:
    if not length:
        return b""
    data = ts.sock.recv(length + 1, MSG_PEEK | MSG_DONTWAIT)
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


def rebuild(sock, local: tuple, remote: tuple, conn, before_bind) -> None:
    """Turn a fresh TCP socket (ckpt's copy of the restorer's) into the dumped
    established connection `conn` (a model TcpConn); it stays in repair mode
    until resume().

    before_bind(sock): options that must be set before bind (SO_REUSEADDR…).
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
    sock.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, window_blob(st))
    seti(TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


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
