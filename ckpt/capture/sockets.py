"""Socket fds → model Sockets (called by capture/fds.py for every socket fd).

Works on a duplicate of the target's socket (pidfd_getfd) while the target is
frozen, plus sock_diag for what the socket itself cannot tell (unix peers and
accept queues). Queued data is peeked, never consumed. Anything that cannot be
rebuilt is refused before the target is harmed, naming the fd, its type and,
for connections, both ends.

A process-wide view (which socket inodes belong to the process) is built once
per frozen capture and reused for the following fds: it is keyed by the
target's scheduler statistics, which do not change while it stays stopped.

Process trees: a peer held by another process of the dumped tree is not
"outside". Each process is captured on its own (its Sockets name their peers by
inode); `link_tree_sockets` then runs on all captured images (from
capture/tree.py link_shared, still frozen) and gives every group of sockets that
spans processes to its first process in slot order, which restores the whole
group and parks the others' ends for them (see restore/sockets.py).
"""

from __future__ import annotations

import os
import select
import socket
import time
from dataclasses import dataclass, field

from ..errors import DumpError, UnsupportedProcess
from ..kernel import netlock, procfs, sockdiag, tcp_closed, tcp_repair
from ..kernel import sockets as ks
from ..kernel.sockets import NotRestorable, TargetSocket, socket_file
from ..model import Fd, McastGroup, ProcessImage, Socket, SocketMsg, TcpClosed, TcpConn

UNIX_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}  # fmt: skip
FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6",
            socket.AF_NETLINK: "netlink", socket.AF_PACKET: "packet"}  # fmt: skip
SOCK_TYPES = {socket.SOCK_RAW: "raw", socket.SOCK_SEQPACKET: "seqpacket",
              socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram"}  # fmt: skip
INET = (socket.AF_INET, socket.AF_INET6)
CONSISTENT_TRIES = 20
# Why the other families are refused (the refusal says it: issue 14).
WHY_NOT = {
    socket.AF_NETLINK: "the kernel side of a netlink conversation — group subscriptions, "
    "requests in flight, queued notifications — cannot be read back",
    socket.AF_PACKET: "its bound interface, ring buffers and fanout group cannot be read back "
    "and re-created exactly",
}


@dataclass
class _ProcessSockets:
    key: tuple
    fds: dict[int, int]  # socket inode → fd
    frozen: bool  # ptrace-stopped: queues may be peeked and TCP put in repair mode
    captured: dict[int, Socket] = field(default_factory=dict)
    held: dict[int, TargetSocket] = field(default_factory=dict)  # established TCP dups
    tree: frozenset[int] = frozenset()  # the other processes dumped with this one
    _all_unix: dict[int, sockdiag.UnixDiag] | None = None
    _mates: dict[int, int] | None = None
    _udp_shutdown: dict[int, int] | None = None
    _groups: list[tuple[int, str]] | None = None
    _tcp: dict[tuple[str, int, str, int], int] | None = None
    _md5: set[int] | None = None
    _bound_inactive: dict[int, sockdiag.InetDiag] | None = None
    _bound_listed: bool = True

    def tcp_bound_inactive(self) -> dict[int, sockdiag.InetDiag] | None:
        """TCP sockets bound to a port they hold, neither listening nor connected
        (sock_diag, once per view); None: this kernel does not list them (before 6.7)."""
        if self._bound_inactive is None and self._bound_listed:
            self._bound_inactive = sockdiag.tcp_bound_inactive()
            self._bound_listed = self._bound_inactive is not None
        return self._bound_inactive

    def tcp_md5(self) -> set[int]:
        """Inodes of the TCP sockets holding TCP_MD5SIG keys (sock_diag, once per view)."""
        if self._md5 is None:
            self._md5 = sockdiag.tcp_md5_inodes()
        return self._md5

    def tcp_connections(self) -> dict[tuple[str, int, str, int], int]:
        """Every TCP connection of the network namespace (sock_diag, once per view)."""
        if self._tcp is None:
            self._tcp = sockdiag.tcp_connections()
        return self._tcp

    def groups(self, pid: int) -> list[tuple[int, str]]:
        """The multicast groups joined in the process's network namespace (once per view)."""
        if self._groups is None:
            self._groups = ks.groups_joined(pid)
        return self._groups

    def udp_shutdown(self, ino: int) -> int:
        """The shutdown bits of a UDP socket bound to a port (sock_diag, once per view)."""
        if self._udp_shutdown is None:
            self._udp_shutdown = {}
            for family in (socket.AF_INET, socket.AF_INET6):
                self._udp_shutdown.update(sockdiag.inet_shutdowns(family, socket.IPPROTO_UDP))
        return self._udp_shutdown.get(ino, 0)

    def all_unix(self) -> dict[int, sockdiag.UnixDiag]:
        if self._all_unix is None:
            self._all_unix = sockdiag.unix_sockets()
        return self._all_unix

    def ours(self, ino: int) -> bool:
        """Is socket `ino` held by this process or another process of the dumped tree (or
        in flight in a queue of theirs: capture/inflight.py)?"""
        return ino in self.fds or ino in self.mates() or ino in self.flying

    flying: frozenset[int] | set[int] = frozenset()  # sockets in flight (RunState.sockets)

    def mates(self) -> dict[int, int]:
        """socket inode → PID, for the sockets the other tree members hold."""
        if self._mates is None:
            self._mates = {}
            for p in sorted(self.tree):
                for ino in _socket_fds(p):
                    self._mates.setdefault(ino, p)
            for ino in self.fds:
                self._mates.pop(ino, None)
        return self._mates

    @property
    def outside(self) -> str:
        return "outside the process tree" if self.mates_possible else "outside the process"

    @property
    def mates_possible(self) -> bool:
        return bool(self.tree)


class OutsidePeer(UnsupportedProcess):
    """A unix socket connected to one outside the dump: as fd 0-2 (journald's stdout
    stream, a collector) it is an external endpoint (capture/fds.py), else refused."""


class SocketCapture:
    """One dump run's socket state, owned by the orchestrator (api/freeze.py) and
    passed to every capture of the run.

    - the network lock: connections to outside peers (kernel/netlock.py), taken
      over by the caller (kept for the restore, or removed);
    - the established TCP duplicates of every captured process, by inode: tree
      linking makes the two ends of a connection between members agree, and they
      stay open until close() so killing the target sends no FIN or RST
      (kernel/tcp_repair.py HeldSockets);
    - the per-process view of socket inodes (valid while the process stays stopped).
    """

    def __init__(self, *, consume_errors: bool = False) -> None:
        # the process is killed after the dump: a pending socket error, which the kernel
        # shows only by handing it over (SO_ERROR), may be read (kernel/tcp_closed.py)
        self.consume_errors = consume_errors
        self.lock: netlock.NetLock | None = None
        self.unlocked = 0  # connections to outside peers dumped without a lock (no nft)
        self._marked_in: set[str] = set()  # lock tables that let ckpt's injected FINs in
        self.tcp: dict[int, TargetSocket] = {}
        self.held = tcp_repair.HeldSockets()
        self._views: dict[int, _ProcessSockets] = {}
        from .inflight import RunState

        self.inflight = RunState()  # files in flight in unix sockets (SCM_RIGHTS)

    def take_net_lock(self) -> tuple[netlock.NetLock | None, int]:
        """This run's lock (None if no connection needed one) and the number of
        outside connections dumped without a lock (no nft); the caller owns the lock
        from now on: it keeps it for the restore or removes it."""
        got = (self.lock if self.lock is not None and self.lock.created else None), self.unlocked
        self.lock, self.unlocked = None, 0
        return got

    def lock_connection(self, local, remote, injected: bool = False) -> None:
        """injected: the restore sends segments to this connection in the peer's name
        (a closing connection's FIN: kernel/tcp_repair.py inject); the lock lets them in."""
        if not netlock.available():
            self.unlocked += 1
            return
        if self.lock is None:
            self.lock = netlock.NetLock()
        self.lock.add(tuple(local[:2]), tuple(remote[:2]))
        if injected:
            self.let_marked_in()

    def let_marked_in(self) -> None:
        """The lock lets in what the restore itself sends, marked (tcp_repair.INJECT_MARK):
        segments in an outside peer's name, and the connections to a held listener's
        port that make a closed accepted socket again (kernel/tcp_closed.py dial)."""
        if self.lock is not None and self.lock.name not in self._marked_in:
            self.lock.let_marked_in(tcp_repair.INJECT_MARK)
            self._marked_in.add(self.lock.name)

    def view(self, pid: int) -> _ProcessSockets:
        key = (procfs.read_bytes(pid, "schedstat"), procfs.read_bytes(pid, "stat").split(b")")[0])
        ctx = self._views.get(pid)
        if ctx is not None and ctx.key == key:
            return ctx
        ctx = _ProcessSockets(key, _socket_fds(pid), procfs.status(pid).get("State", "")[:1] == "t")
        self._views.clear()
        self._views[pid] = ctx
        return ctx

    def close(self) -> None:
        """Drop the run's socket state: a lock nobody took is removed, and the held
        TCP duplicates are closed (silently where their process is gone)."""
        lock, _ = self.take_net_lock()
        if lock is not None:
            lock.remove()
        self.tcp.clear()
        self._views.clear()
        self.held.release()
        self.inflight.close()


def _socket_fds(pid: int) -> dict[int, int]:
    """socket inode → fd of process pid."""
    out: dict[int, int] = {}
    try:
        fds = procfs.fds(pid)
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(procfs.fd_path(pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            out.setdefault(int(link[8:-1]), fd)
    return out


def capture_socket(
    pid: int,
    fd: int,
    st: os.stat_result,
    *,
    flags: int,
    cloexec: bool,
    run: SocketCapture,
    fdinfo: dict[str, str] | None = None,
    tcp_established: bool = False,
    tree: frozenset[int] = frozenset(),
    charge=None,
) -> Fd:
    """The Fd (kind "socket") for socket fd `fd` of the frozen process `pid`.

    tree: the other processes dumped with this one (their sockets are not "outside").
    charge(kind, nbytes): counts content of files in flight against the process's fd
    data budget (capture/fd_kinds.py FdScan.charge)."""
    ctx = run.view(pid)
    ctx.tree = frozenset(tree) - {pid}
    ctx.flying = run.inflight.sockets
    ino = st.st_ino
    try:
        ts = TargetSocket(pid, fd)
    except OSError as exc:
        raise DumpError(f"cannot inspect socket fd {fd} of {pid}: {exc.strerror}", pid=pid) from exc
    keep = False
    try:
        if ts.family == socket.AF_UNIX:
            sock = _unix(pid, ctx, ts, ino, fdinfo or {}, run=run, charge=charge)
        elif ts.family in INET and (ts.type, ts.proto) == (socket.SOCK_STREAM, socket.IPPROTO_TCP):
            sock = _tcp(pid, run, ctx, ts, ino, tcp_established)
        elif ts.family in INET and (ts.type, ts.proto) == (socket.SOCK_DGRAM, socket.IPPROTO_UDP):
            sock = _udp(pid, ctx, ts, ino)
        else:
            kind = FAMILIES.get(ts.family, f"family {ts.family}")
            why = WHY_NOT.get(ts.family, "ckpt has no way to read this family's state back")
            if ts.family in INET:  # raw, SCTP, MPTCP, UDP-Lite… (not TCP's or UDP's state)
                kind += f" {SOCK_TYPES.get(ts.type, f'type {ts.type}')} (protocol {ts.proto})"
                why = "of the IP sockets only TCP and UDP state is read back"
            article = "an" if kind[:1] in "aeiouAEIOU" else "a"
            raise UnsupportedProcess(
                f"fd {fd} is {article} {kind} socket (type {ts.type}, socket:[{ino}]): "
                f"not supported ({why})",
                pid=pid,
            )
        _settings(pid, ctx, ts, sock)
        keep = sock.tcp is not None  # (a refused one is closed: the dump fails)
        sock.sndbuf, sock.rcvbuf, sock.buf_lock = ts.buffers()
        if ts.family == socket.AF_UNIX:
            sock.peek_off = ts.peek_offset()
    except OSError as exc:
        raise DumpError(f"cannot read socket fd {fd} of {pid}: {exc}", pid=pid) from exc
    finally:
        if not keep:
            ts.close()
    ctx.captured[ino] = sock
    if keep:
        ctx.held[ino] = ts
        run.tcp[ino] = ts
        run.held.add(pid, ts)
    return Fd(fd=fd, kind="socket", path=f"socket:[{ino}]", flags=flags, cloexec=cloexec,
              pos=0, socket=sock)  # fmt: skip


# -- unix -------------------------------------------------------------------------------------


def _name(n: bytes | None) -> str:
    if not n:
        return "unnamed"
    if n[:1] == b"\0":
        return "@" + n[1:].decode(errors="replace")
    return n.decode(errors="replace")


def _unix(
    pid: int,
    ctx: _ProcessSockets,
    ts: TargetSocket,
    ino: int,
    fdinfo,
    *,
    run: SocketCapture | None = None,
    charge=None,
    what: str = "",
) -> Socket:
    """what: how refusals name the socket (default "fd N is a unix TYPE socket")."""
    fd = ts.fd
    tname = UNIX_TYPES.get(ts.type, str(ts.type))
    what = what or f"fd {fd} is a unix {tname} socket"
    d = sockdiag.unix_socket(ino)
    if d is None:
        raise DumpError(f"socket fd {fd} of {pid} vanished", pid=pid)
    scm = int(fdinfo.get("scm_fds", "0") or 0)
    if scm and run is None:  # a socket in flight (capture/inflight.py)
        raise UnsupportedProcess(
            f"{what} that itself holds {scm} files in flight: not supported (files in "
            "flight inside files in flight)",
            pid=pid,
        )
    s = Socket(ino=ino, family=socket.AF_UNIX, type=ts.type, protocol=ts.proto, state="unbound")
    s.local = d.name or None
    s.shutdown = d.shutdown
    if d.state == sockdiag.TCP_LISTEN:
        s.state, s.backlog = "listen", d.wqueue
        for client in d.icons:
            if not ctx.ours(client) and ctx.frozen:  # running: the dump drains it first
                raise UnsupportedProcess(
                    f"{what} listening on {_name(s.local)} with a connection from "
                    f"{ctx.outside} (socket:[{client}]) waiting to be accepted: not supported",
                    pid=pid,
                )
        s.pending = list(d.icons)
    elif d.peer or (ts.type != socket.SOCK_DGRAM and d.state == sockdiag.TCP_ESTABLISHED):
        s.state = "connected"
        _unix_peer(pid, ctx, ts, s, d, what)
    elif s.local:
        s.state = "bound"
    if s.local and s.local[:1] != b"\0" and not s.accepted and s.state != "pending":
        _name_file(pid, s, d)
    # (a stream or seqpacket socket never connected has no queue: recv says EINVAL)
    unconnected = ts.type != socket.SOCK_DGRAM and s.state in ("bound", "unbound")
    creds = (
        run is not None and s.state != "listen" and not unconnected and ctx.frozen
        and ts.passes_creds()
    )  # fmt: skip
    if s.state != "listen" and not unconnected and (scm or creds):
        # files in flight, or credentials the process reads: message by message (while
        # the process runs, the preflight, only to refuse what is in flight now; not when
        # the application peeks with SO_PEEK_OFF itself: its offset must not move then)
        if ctx.frozen or ts.peek_offset() < 0:
            _queue_scm(pid, ctx, run, ts, s, scm, creds, what, charge)
    elif s.state != "listen" and ctx.frozen and not unconnected:
        if ts.type == socket.SOCK_STREAM:
            data = ts.peek_stream()
            s.queue = [SocketMsg(data)] if data else []
        else:
            s.queue = [SocketMsg(m, src or None) for m, src in ts.peek_messages()]
    return s


def _queue_scm(pid, ctx, run, ts, s: Socket, scm: int, creds: bool, what: str, charge) -> None:
    def charge_fd(kind: str, nbytes: int) -> None:
        if charge is not None:
            charge(ts.fd, kind, nbytes)

    from .inflight import capture_queue

    def socket_of(own: int, flags: int, rfd: int) -> Socket:
        return inflight_socket(pid, run, ctx, own, flags, rfd)

    capture_queue(
        pid, ts, s, scm=scm, creds=creds, what=what, run=run.inflight,
        tree=frozenset({pid, *ctx.tree}), frozen=ctx.frozen, charge=charge_fd,
        socket_of=socket_of,
    )  # fmt: skip


def inflight_socket(
    pid: int, run: SocketCapture, ctx: _ProcessSockets, own: int, flags: int, rfd: int
) -> Socket:
    """A unix socket in flight in a queue of socket fd `rfd` of `pid` (ckpt's fd `own`,
    from a peek), captured like the process's own and kept as a record with fd -1 of the
    process (run.inflight.records): the restore builds it with the process's sockets, at a
    spare fd, and sends it. Refusals name the socket that holds it."""
    ts = TargetSocket.own(own, rfd)
    try:
        tname = UNIX_TYPES.get(ts.type, str(ts.type))
        if ts.family != socket.AF_UNIX:
            kind = FAMILIES.get(ts.family, f"family {ts.family}")
            raise UnsupportedProcess(
                f"fd {rfd} holds in flight (SCM_RIGHTS) a {kind} socket: not supported (only "
                "unix sockets are sent again)",
                pid=pid,
            )
        ino = os.fstat(own).st_ino
        me = os.getpid()
        fdinfo = procfs.parse_fdinfo(procfs.read_bytes(me, "fdinfo", str(own))).extra
        what = f"fd {rfd} holds in flight (SCM_RIGHTS) a unix {tname} socket (socket:[{ino}])"
        try:
            sock = _unix(pid, ctx, ts, ino, fdinfo, what=what)
        except OutsidePeer as exc:  # only fds 0-2 themselves may lead outside
            raise UnsupportedProcess(str(exc), pid=pid) from None
        _settings(pid, ctx, ts, sock)
        sock.sndbuf, sock.rcvbuf, sock.buf_lock = ts.buffers()
        sock.peek_off = ts.peek_offset()
    except OSError as exc:
        raise DumpError(f"cannot read a socket in flight in fd {rfd} of {pid}: {exc}",
                        pid=pid) from exc  # fmt: skip
    finally:
        ts.close()
    ctx.captured[ino] = sock
    rec = Fd(fd=-1, kind="socket", path=f"socket:[{ino}]", flags=flags, cloexec=False, pos=0,
             socket=sock, obj_id=ino)  # fmt: skip
    run.inflight.records.setdefault(pid, []).append(rec)
    return sock


def _unix_peer(pid, ctx, ts, s: Socket, d: sockdiag.UnixDiag, what: str) -> None:
    remote = ts.peername()
    s.remote = remote or None
    if d.peer and ctx.ours(d.peer):
        s.peer_ino = d.peer
        if ts.type != socket.SOCK_DGRAM and s.local:
            # the accept()ed end carries its listener's name
            for ino, other in ctx.all_unix().items():
                if other.state == sockdiag.TCP_LISTEN and other.name == s.local and ctx.ours(ino):
                    s.accepted, s.listener_ino = True, ino
                    break
        return
    if d.peer:
        if ts.type == socket.SOCK_DGRAM and remote:
            return  # connected to a named socket elsewhere (e.g. /dev/log): reconnect by name
        raise OutsidePeer(
            f"{what} connected to a socket {ctx.outside} (socket:[{d.peer}], "
            f"{_name(remote)}): not supported (only fds 0-2 may lead outside the dump: "
            "they are reconnected at restore)",
            pid=pid,
        )
    # stream/seqpacket, no peer socket: waiting in a listener's queue, or the peer closed
    for ino, other in sockdiag.unix_sockets().items():
        if other.state == sockdiag.TCP_LISTEN and s.ino in other.icons:
            if not ctx.ours(ino):
                raise UnsupportedProcess(
                    f"{what} waiting to be accepted by a listener {ctx.outside} "
                    f"({_name(other.name)}, socket:[{ino}]): not supported",
                    pid=pid,
                )
            if d.wqueue:
                raise UnsupportedProcess(
                    f"{what} with {d.wqueue} bytes sent to a connection its listener "
                    f"({_name(other.name)}) has not accepted yet: not supported",
                    pid=pid,
                )
            s.state, s.listener_ino = "pending", ino
            return
    s.peer_closed = True


def _name_file(pid: int, s: Socket, d: sockdiag.UnixDiag) -> None:
    path = os.fsdecode(s.local)
    if not path.startswith("/"):
        path = os.path.join(procfs.readlink(pid, "cwd"), path)
    st = socket_file(path)
    if st is None or d.vfs is None or st.st_ino != d.vfs[0]:
        s.name_deleted = True
        return
    s.name_file = [st.st_mode & 0o7777, st.st_uid, st.st_gid]


# -- TCP / UDP -------------------------------------------------------------------------------


def _addr(a) -> str:
    if not a:
        return "?"
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp(
    pid: int,
    run: SocketCapture,
    ctx: _ProcessSockets,
    ts: TargetSocket,
    ino: int,
    allow_external: bool,
) -> Socket:
    fd = ts.fd
    fam = FAMILIES[ts.family]
    info = tcp_repair.tcp_info(ts)
    s = Socket(ino=ino, family=ts.family, type=ts.type, protocol=ts.proto, state="unbound")
    s.local = ts.sockname()
    if info.state == sockdiag.TCP_CLOSE:
        return _tcp_close(pid, run, ctx, ts, s, info)
    if info.state == sockdiag.TCP_LISTEN:
        s.state, s.backlog = "listen", info.sacked
        if info.unacked and ctx.frozen:  # running (preflight): the dump drains it first
            raise UnsupportedProcess(
                f"fd {fd} is a listening TCP/{fam} socket on {_addr(s.local)} with "
                f"{info.unacked} connection(s) waiting to be accepted: not supported "
                "(try again when the process has accepted them)",
                pid=pid,
            )
        return s
    s.remote = ts.peername()
    if info.state not in tcp_repair.STATES:
        state = sockdiag.TCP_STATES.get(info.state, str(info.state))
        raise UnsupportedProcess(
            f"fd {fd} is a TCP/{fam} socket in state {state} ({_addr(s.local)} -> "
            f"{_addr(s.remote)}): only listening, bound, established and closing (FIN_WAIT1, "
            "FIN_WAIT2, CLOSE_WAIT, CLOSING, LAST_ACK) TCP sockets are supported",
            pid=pid,
        )
    s.state = "established"  # a closing connection too: TcpConn.state says which
    peer = sockdiag.tcp_socket_inode(
        ts.family, tuple(s.remote[:2]), tuple(s.local[:2]), _scope(s.local)
    )
    if peer is None:  # or one bound to an interface (SO_BINDTODEVICE)
        peer = ctx.tcp_connections().get(sockdiag.tcp_key(s.remote, s.local))
    if peer and ctx.ours(peer):
        s.peer_ino = peer
    elif not allow_external:
        what = "an established" if info.state == sockdiag.TCP_ESTABLISHED else (
            f"a closing ({sockdiag.TCP_STATES[info.state]})"
        )  # fmt: skip
        raise UnsupportedProcess(
            f"fd {fd} is {what} TCP/{fam} connection {_addr(s.local)} -> "
            f"{_addr(s.remote)} whose peer is {ctx.outside}: dump with "
            "--tcp-established to checkpoint it (the peer must not send until the restore)",
            pid=pid,
        )
    if not ctx.frozen:
        return s  # a check while it runs (migration's preflight): no repair mode now
    if not s.peer_ino:  # an outside peer: nothing may arrive after the state is read
        # but the segments the restore sends in the peer's name (its ACK that sets the
        # MSS: tcp_repair.sync_mss; a closing connection's FIN)
        run.lock_connection(s.local, s.remote, injected=True)
    s.tcp = _read_tcp(ts, info)
    if info.state not in tcp_repair.PEER_FIN and _rdhup(ts):
        # shutdown(SHUT_RD), which sends nothing and moves no state: recv gives 0 (after
        # the data), and in FIN_WAIT data arriving resets the connection (only a FIN
        # from the peer sets it otherwise, and CLOSE_WAIT, CLOSING, LAST_ACK have one)
        s.shutdown = 1
    partner = ctx.captured.get(s.peer_ino) if s.peer_ino else None
    if partner is not None and partner.tcp is not None:
        _make_consistent(pid, ts, s, ctx.held[partner.ino], partner)
    return s  # a partner in another tree member: link_tree_sockets makes them agree


def _rdhup(ts: TargetSocket) -> int:
    """The read side shut down (RCV_SHUTDOWN: poll's POLLRDHUP), 1 or 0."""
    p = select.poll()
    p.register(ts.fileno(), select.POLLRDHUP)
    return 1 if dict(p.poll(0)).get(ts.fileno(), 0) & select.POLLRDHUP else 0


def _tcp_close(pid: int, run: SocketCapture, ctx: _ProcessSockets, ts: TargetSocket, s: Socket,
               info) -> Socket:  # fmt: skip
    """A TCP socket in state CLOSE: never connected ("bound", "unbound"), or closed after a
    connection or a refused connect ("closed": what its process still observes of it,
    which the restore has the kernel make again: kernel/tcp_closed.py).

    Told apart without touching it: segments counted (tcp_done left them; a
    disconnect clears them), whether it still holds its port (sock_diag lists bound
    inactive sockets: bound explicitly or accepted; one that got its port from
    connect() gave it back at the close but still names it), a pending error (POLLERR)."""
    fd, fam = ts.fd, FAMILIES[ts.family]
    held = ctx.tcp_bound_inactive()
    history = bool(info.segs_in or info.segs_out)
    pending = tcp_closed.pending_error(ts.sock)
    where = f"fd {fd} is a TCP/{fam} socket ({_addr(s.local)}, state CLOSE)"
    if held is None:
        if history or pending:
            raise UnsupportedProcess(
                f"{where} that had a connection: not supported on this kernel (it does not "
                "show whether the socket still holds its port: sock_diag lists bound inactive "
                "sockets since Linux 6.7)",
                pid=pid,
            )
        s.state = "bound" if _bound(s.local) else "unbound"
        s.shutdown = _rdhup(ts)
        return s
    d = held.get(s.ino)
    released = bool(s.local[1]) and d is None  # a port given back, still named
    if not history and not released and not pending:
        s.state = "bound" if _bound(s.local) else "unbound"
        s.shutdown = d.shutdown if d is not None else _rdhup(ts)  # (ENOTCONN, bits set)
        return s
    if not s.local[1]:
        raise UnsupportedProcess(f"{where} with a pending error and no port: not supported",
                                 pid=pid)  # fmt: skip
    c = TcpClosed(handshake=info.delivered > 0, port_held=d is not None, disconnected=not history,
                  mss=info.snd_mss)  # fmt: skip
    s.state, s.closed = "closed", c
    s.shutdown = d.shutdown if d is not None else (_rdhup(ts) | (3 if history else 0))
    how = "after a refused connect" if history and not c.handshake else "after a connection"
    where = f"fd {fd} is a TCP/{fam} socket closed {how} ({_addr(s.local)}, state CLOSE)"
    if pending and not run.consume_errors:
        raise UnsupportedProcess(
            f"{where} with an error the process has not read yet, which a dump that leaves "
            "the process running (a snapshot, --leave-running) cannot read without taking it "
            "from the process (SO_ERROR is the kernel's only way to show it): not supported "
            "(a dump that ends the process takes it along)",
            pid=pid,
        )
    if pending and (info.retrying if c.handshake else history and not info.segs_in):
        # (what a timeout or an ICMP error leaves, unlike a reset: refused before the
        # error is read, so that the process keeps it)
        raise UnsupportedProcess(
            f"{where} by a timeout or a network error ("
            + ("it was retransmitting" if c.handshake else "no reset answered its connect")
            + "), with the error pending: not supported (only the real peer's network gives "
            "such an error; ckpt rebuilds a reset, a refused connect, or none)",
            pid=pid,
        )
    if not ctx.frozen:
        return s  # (preflight: the freeze reads the rest)
    if history:
        c.inq = tcp_repair.peek_exact(ts, ts.ioctl_int(ks.SIOCINQ), "receive")
    if pending:
        try:
            c.error, c.fin = tcp_closed.read_error(ts.sock, len(c.inq), ts.peek_offset())
        except OSError as exc:
            raise UnsupportedProcess(
                f"{where} with an error pending behind {len(c.inq)} unread bytes: not "
                f"supported on this kernel (no SO_PEEK_OFF for TCP: {exc.strerror or exc})",
                pid=pid,
            ) from exc
    why = tcp_closed.unsupported(c.handshake, c.error, c.fin, c.disconnected)
    if why:
        raise UnsupportedProcess(f"{where}, and {why}: not supported", pid=pid)
    return s


def _read_tcp(ts: TargetSocket, info) -> TcpConn:
    reuse = tcp_repair.repair_on(ts)
    try:
        r = tcp_repair.read_state(ts, info)
    finally:
        tcp_repair.repair_off(ts, reuse)
    return TcpConn(
        snd_seq=r.snd_seq, rcv_seq=r.rcv_seq, outq=r.outq, unsent=r.unsent, inq=r.inq,
        mss=r.mss, options=r.options, snd_wscale=r.snd_wscale, rcv_wscale=r.rcv_wscale,
        timestamp=r.timestamp, window=r.window, state=r.state,
    )  # fmt: skip


def _before(a: int, b: int) -> bool:
    """a ≤ b in 32-bit sequence space."""
    return ((b - a) & 0xFFFFFFFF) < 1 << 31


def _consistent(a: TcpConn, b: TcpConn) -> bool:
    """Nothing acknowledged that the other end does not hold, nothing received that
    the other end had not sent (the sequences leave the FINs out), and no FIN
    received that the other end had not sent.

    The bound is the sender's snd_nxt, not the end of its queue: the kernel goes on
    sending for a frozen process when a window update comes in (the answer to a
    zero-window probe), even between two of ckpt's reads of one socket, so a read
    that still counts data as unsent can meet a peer read that has received it.
    Restored so, the sender sends from snd_una, below the receiver's rcv_nxt: the
    receiver drops those segments as old and acknowledges its rcv_nxt, an ACK of
    data the sender never sent, which the sender ignores; neither moves again."""

    def one_way(snd: TcpConn, rcv: TcpConn) -> bool:
        una = (snd.snd_seq - len(snd.outq)) & 0xFFFFFFFF
        if rcv.state in tcp_repair.PEER_FIN:  # the FIN comes after all the data
            return snd.state in tcp_repair.OWN_FIN and rcv.rcv_seq == snd.snd_seq
        nxt = (snd.snd_seq - snd.unsent) & 0xFFFFFFFF
        return _before(una, rcv.rcv_seq) and _before(rcv.rcv_seq, nxt)

    return one_way(a, b) and one_way(b, a)


def _make_consistent(pid, ts: TargetSocket, s: Socket, pts: TargetSocket, partner: Socket) -> None:
    """Both ends of a loopback connection are ours: their two captures must agree
    (_consistent). The processes are frozen, so the kernel settles within a
    delayed-ACK or persist-probe time; re-read until then."""
    for _ in range(CONSISTENT_TRIES):
        if _consistent(s.tcp, partner.tcp):
            return
        time.sleep(0.05)
        partner.tcp = _read_tcp(pts, tcp_repair.tcp_info(pts))
        s.tcp = _read_tcp(ts, tcp_repair.tcp_info(ts))
    raise DumpError(
        f"the two ends of TCP connection {_addr(s.local)} <-> {_addr(s.remote)} (fd {ts.fd}) "
        "kept changing while the process was frozen",
        pid=pid,
    )


def _udp(pid: int, ctx: _ProcessSockets, ts: TargetSocket, ino: int) -> Socket:
    s = Socket(ino=ino, family=ts.family, type=ts.type, protocol=ts.proto, state="unbound")
    s.local = ts.sockname()
    s.remote = ts.peername()
    if s.remote:
        s.state = "connected"
    elif _bound(s.local):
        s.state = "bound"
    s.shutdown = ctx.udp_shutdown(ino) if s.local[1] else _poll_shutdown(ts)
    return s  # queued datagrams are not kept (UDP may drop them anyway)


def _bound(local) -> bool:
    """Bound to a port, or to an address only (IP_BIND_ADDRESS_NO_PORT: port 0)."""
    return bool(local[1]) or local[0] not in ("0.0.0.0", "::")


def _scope(addr) -> int:
    """The scope id of an IPv6 address (a link-local one's interface), else 0."""
    return int(addr[3]) if addr is not None and len(addr) > 3 else 0


def _poll_shutdown(ts: TargetSocket) -> int:
    """A socket no table lists (UDP without a port): what poll tells of its shutdown
    state (POLLRDHUP: the read side; POLLHUP: both). A write side shut alone does not
    show (docs/ARCHITECTURE.md "Sockets")."""
    p = select.poll()
    p.register(ts.fileno(), select.POLLIN | select.POLLRDHUP)
    ev = dict(p.poll(0)).get(ts.fileno(), 0)
    return 3 if ev & select.POLLHUP else (1 if ev & select.POLLRDHUP else 0)


def _settings(pid: int, ctx: _ProcessSockets, ts: TargetSocket, s: Socket) -> None:
    """What a socket is set to besides its names and data: its options, classic BPF
    filter and (UDP) multicast groups. What ckpt could not set again exactly
    (kernel/sockets.py NotRestorable, TCP_MD5SIG keys) is refused here, naming the fd."""
    try:
        s.options = ts.options(connection=s.state in ("established", "closed"))
        if s.closed is not None:  # TCP_MAXSEG reads a closed one's own MSS (closed.mss)
            user_mss = ts.int_opt(socket.IPPROTO_TCP, tcp_repair.TCP_MAXSEG)  # unless set
            if user_mss != s.closed.mss:
                s.options["TCP_MAXSEG"] = user_mss
        s.filter = ts.bpf_filter()
        if ts.family != socket.AF_UNIX and ts.type == socket.SOCK_DGRAM:
            s.mcast = [
                McastGroup(g.iface, g.group, g.include, g.sources)
                for g in ts.memberships(ctx.groups(pid))
            ]
        tcp = ts.family != socket.AF_UNIX and ts.type == socket.SOCK_STREAM
        if tcp and s.state in ("listen", "established") and s.ino in ctx.tcp_md5():
            raise NotRestorable("has TCP_MD5SIG keys (they cannot be read back)")
    except NotRestorable as exc:
        if ts.family == socket.AF_UNIX:
            what = f"unix {UNIX_TYPES.get(ts.type, ts.type)} socket ({_name(s.local)})"
        else:
            proto = "TCP" if ts.type == socket.SOCK_STREAM else "UDP"
            where = _addr(s.local) + (f" -> {_addr(s.remote)}" if s.remote else "")
            what = f"{proto}/{FAMILIES[ts.family]} socket ({where})"
        msg = f"fd {ts.fd} is a {what} that {exc}: not supported"
        raise UnsupportedProcess(msg, pid=pid) from exc


# -- process trees ---------------------------------------------------------------------------


def link_tree_sockets(procs: list[ProcessImage], run: SocketCapture) -> None:
    """Groups of sockets that span processes of the tree go to their first process.

    A group is what must be rebuilt together: the two ends of a connection, a
    listener with the connections accepted through it or waiting in its queue, a
    unix dgram socket with the named sockets it is connected to or holds messages
    from. The first process (in slot order) holding a socket of a group restores
    the whole group (restore/sockets.py): every socket of it that a later process
    holds is copied into the first one's image as a record with fd -1 (peer_slot,
    peer_fd: the process and fd that take it; flags, cloexec: its description),
    and the holder's own record becomes kind "socket_end" (obj_id: the inode,
    peer_slot: the creator), taken with pidfd_getfd once the creator parked it.

    Both ends of a TCP connection between two members are made to agree here, as
    capture_socket does for the two ends inside one process.
    """
    from .inflight import link_slots

    link_slots(procs, run.inflight)  # in-flight tables name holders by slot
    try:
        _link(procs, run.tcp)
    finally:
        run.tcp.clear()


def _unix_key(name: bytes, cwd: str) -> bytes:
    if name[:1] == b"\0":
        return name
    path = os.fsdecode(name)
    return os.fsencode(path if path.startswith("/") else os.path.join(cwd, path))


def _link(procs: list[ProcessImage], tcp: dict[int, TargetSocket]) -> None:
    from ..model import flying_socket as flying  # a socket in flight (capture/inflight.py)

    where: dict[int, tuple[int, int]] = {}  # inode → (slot, index in that image's fds)
    named: dict[bytes, int] = {}  # unix name (absolute) → inode of the socket bound to it
    for slot, p in enumerate(procs):
        for i, f in enumerate(p.fds):
            if f.kind != "socket" or f.socket is None or (f.fd < 0 and not flying(f)):
                continue
            where[f.socket.ino] = (slot, i)
            s = f.socket
            if s.family == socket.AF_UNIX and s.local and not s.accepted:
                named.setdefault(_unix_key(s.local, p.cwd), s.ino)
    if len({slot for slot, _ in where.values()}) < 2:
        return
    up = {ino: ino for ino in where}

    def find(x: int) -> int:
        while up[x] != x:
            up[x] = up[up[x]]
            x = up[x]
        return x

    def rec(ino: int) -> tuple[ProcessImage, Fd]:
        slot, i = where[ino]
        return procs[slot], procs[slot].fds[i]

    for ino in where:
        p, f = rec(ino)
        s = f.socket
        for other in (s.peer_ino, s.listener_ino, *s.pending):
            if not other:
                continue
            if other not in where:
                raise DumpError(
                    f"fd {f.fd} of process {p.pid} (socket:[{ino}]) is connected to "
                    f"socket:[{other}], which no dumped process holds any more",
                    pid=procs[0].pid,
                )
            up[find(other)] = find(ino)
        if s.family == socket.AF_UNIX and s.type == socket.SOCK_DGRAM:
            names = [m.source for m in s.queue if m.source] + ([s.remote] if s.remote else [])
            for n in names:
                other = named.get(_unix_key(n, p.cwd))
                if other is not None:
                    up[find(other)] = find(ino)
    groups: dict[int, list[int]] = {}
    gone: list[tuple[int, Fd]] = []
    for ino in where:
        groups.setdefault(find(ino), []).append(ino)
    for inos in groups.values():
        slots = {where[ino][0] for ino in inos}
        if len(slots) < 2:
            continue
        _agree_tcp(procs, [rec(ino)[1] for ino in inos], where, tcp)
        creator = min(slots)
        for ino in sorted(inos, key=lambda x: where[x]):
            slot, i = where[ino]
            if slot != creator and flying(procs[slot].fds[i]):  # nobody takes it: it moves
                procs[creator].fds.append(procs[slot].fds[i])
                gone.append((slot, procs[slot].fds[i]))
            elif slot != creator:
                _hand_over(procs, creator, slot, i)
    for slot, f in gone:  # (after: `where` holds indexes)
        procs[slot].fds = [x for x in procs[slot].fds if x is not f]


def _agree_tcp(procs, recs: list[Fd], where, tcp: dict[int, TargetSocket]) -> None:
    """The two ends of a loopback TCP connection held by two members: as _make_consistent."""
    by_ino = {f.socket.ino: f for f in recs}
    for f in recs:
        s = f.socket
        p = by_ino.get(s.peer_ino)
        if s.tcp is None or p is None or p.socket.tcp is None or s.ino > p.socket.ino:
            continue
        if where[s.ino][0] == where[p.socket.ino][0]:
            continue  # one process: capture_socket did it
        ts, pts = tcp.get(s.ino), tcp.get(p.socket.ino)
        if ts is None or pts is None:
            raise DumpError(
                f"TCP connection {_addr(s.local)} <-> {_addr(s.remote)}: a capture of one "
                "end is missing",
                pid=procs[0].pid,
            )
        _make_consistent(procs[where[s.ino][0]].pid, ts, s, pts, p.socket)


def _hand_over(procs: list[ProcessImage], creator: int, slot: int, i: int) -> None:
    """Move socket record i of process `slot` into process `creator`'s image."""
    p, f = procs[slot], procs[slot].fds[i]
    s = f.socket
    if s.family == socket.AF_UNIX and procs[creator].cwd != p.cwd:
        for n in (s.local, s.remote):
            if n and n[:1] not in (b"\0", b"/"):
                raise UnsupportedProcess(
                    f"fd {f.fd} of process {p.pid} is a unix socket named by the relative path "
                    f"{_name(n)} and connected to process {procs[creator].pid}, whose current "
                    "directory differs: not supported",
                    pid=procs[0].pid,
                )
    ghost = Fd(fd=-1, kind="socket", path=f.path, flags=f.flags, cloexec=f.cloexec, pos=0,
               socket=s, obj_id=s.ino, peer_slot=slot, peer_fd=f.fd)  # fmt: skip
    procs[creator].fds.append(ghost)
    p.fds[i] = Fd(fd=f.fd, kind="socket_end", path=f.path, flags=f.flags, cloexec=f.cloexec,
                  pos=0, obj_id=s.ino, peer_slot=creator)  # fmt: skip
