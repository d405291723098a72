"""Re-create the dumped sockets inside the restorer (called once, from restore/fds.py,
for the first socket fd; it builds every socket of the process, since the two
ends of a connection are made together).

What depends on the calling process — socket()/socketpair() (the creator's
credentials), bind of unix paths (relative to the cwd), connect/accept of unix
sockets (the peer credentials) — is injected into the restorer. Options, queued
data and the TCP_REPAIR work go through ckpt's pidfd_getfd copy of the
restorer's socket: the same kernel object, with no scratch-area size limit.

Process trees (see capture/sockets.py link_tree_sockets): a group of sockets
that spans processes is rebuilt entirely by its first process. The sockets of
the group that later processes hold come as records with fd -1 ("handed over":
peer_slot/peer_fd name who takes them); they are built like the process's own
at a spare fd number, left in `parked` under (inode, PARKED), and each later
process takes its own with pidfd_getfd (kind "socket_end", restore_socket_end).
So both ends of a TCP connection between two processes exist, here, before
either leaves repair mode. The creator's credentials are what the kernel
records for connect/accept (SO_PEERCRED of a rebuilt connection names the
creator, as for every connection ckpt rebuilds).

Order: listening, bound and unbound sockets; unix connections (socketpair, or
connect + accept through the restored listener so that names come back);
dgram connects; connections still waiting in an accept queue, in queue order;
established TCP connections in repair mode (both ends of a loopback pair are
rebuilt before either leaves repair mode); then queued unix data, sent from the
peer's end, shutdown states, options, peek offsets and O_NONBLOCK.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
import struct

from ..errors import RestoreError
from ..kernel import abi, procfs, syscalls, tcp_closed, tcp_repair
from ..kernel import sockets as ks
from ..kernel.fsident import as_fs_user
from ..kernel.remote import RemoteError
from ..model import Fd, Socket
from . import hostfs
from .unixnames import PrivateNames

PARKED = -2  # key (inode, PARKED) in the tree's `parked` registry (pipes use (inode, mode))
SOCK_INODE_MODE = 0o777  # a socket's own inode (fstat of the fd), as socket() makes it


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


class RebuiltConnections:
    """Made before a restore that kills what it built if it fails: from then on until
    close(), ckpt keeps a duplicate of every TCP connection the restore rebuilds.
    silence(), before the kill: each goes back into repair mode, so that its last close
    sends no FIN or RST (ckpt's duplicate, closed last, keeps it open through the kill).
    Without it, the killed process's close sends a FIN that the network lock drops; the
    socket lingers in FIN-WAIT-1 for minutes on the connection's address, and a retried
    restore cannot bind it ("Address already in use"). close() drops the duplicates
    either way (a restored process's close must close its connection)."""

    def __init__(self) -> None:
        global _collecting
        self.held: list[socket.socket] = []
        self.outer, _collecting = _collecting, self

    def silence(self) -> None:
        on = tcp_repair.int_blob(tcp_repair.TCP_REPAIR_ON)
        for s in self.held:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_TCP, tcp_repair.TCP_REPAIR, on)

    def close(self) -> None:
        global _collecting
        if _collecting is self:
            _collecting = self.outer
        held, self.held = self.held, []
        for s in held:
            s.close()


_collecting: RebuiltConnections | None = None


def _name(n) -> str:
    if not n:
        return "unnamed"
    if isinstance(n, list):
        return f"[{n[0]}]:{n[1]}" if ":" in n[0] else f"{n[0]}:{n[1]}"
    return "@" + n[1:].decode(errors="replace") if n[:1] == b"\0" else os.fsdecode(n)


@contextlib.contextmanager
def _as_restore_error():
    """ckpt's own OSError while restoring the sockets as one RestoreError line; an
    injected call's failure (RemoteError) goes up as it is."""
    try:
        yield
    except RemoteError:
        raise
    except OSError as exc:
        raise RestoreError(f"cannot restore the sockets: {exc}") from exc


class _Sockets:
    def __init__(self, ctx):
        self.ctx = ctx
        self.inj = ctx.inj
        self.proc = ctx.proc
        own = [f for f in self.proc.fds if f.kind == "socket" and f.socket and f.fd >= 0]
        # handed over by later tree members: built here at a spare fd, then parked
        handed = [
            dataclasses.replace(f)
            for f in self.proc.fds
            if f.kind == "socket" and f.socket and f.fd < 0 and f.peer_slot >= 0
        ]
        self.handed = {f.socket.ino for f in handed}
        # unix sockets only messages in flight hold (capture/inflight.py): built here at a
        # spare fd too, then left for restore/inflight.py, which sends them
        from ..model import flying_socket
        from .inflight import serving

        flying = [dataclasses.replace(f) for f in self.proc.fds if flying_socket(f)]
        self.flying = {f.socket.ino for f in flying}
        self.fds = own + handed + flying
        self.by_ino: dict[int, Fd] = {f.socket.ino: f for f in self.fds}
        self.made: set[int] = set()  # inodes created and placed
        self.copies: dict[int, socket.socket] = {}
        self._live: set | None = None
        self.cwd_set = False
        self.v6only_moved: set[int] = set()  # IPV6_V6ONLY turned on by the bind (bind_address)
        self.paired: set[int] = set()  # unix dgram socketpairs
        self.private = PrivateNames(self.inj)  # deleted names (restore/unixnames.py)
        # queues that carry files in flight: their data, and everything after it, wait
        # until every fd of the tree exists (restore/inflight.py flush)
        self.inflight = serving(self.inj.tracee.pid)  # restore/rebuild.py state_files
        self.deferred = self.inflight is not None and any(f.socket.inflight for f in self.fds)
        self.files: dict[int, list[int]] = {}  # socket inode → ckpt's fds of its inflight
        self.closed_ends: dict[int, socket.socket] = {}  # a pair's closed end, until flush
        self.gone_senders: set[int] = set()  # sockets whose messages' senders are gone

    # -- helpers ---------------------------------------------------------------------------

    def copy(self, f: Fd) -> socket.socket:
        s = self.copies.get(f.fd)
        if s is None:
            s = self.copies[f.fd] = ks.adopt(self.ctx.copy(f.fd))
        return s

    def close(self) -> None:
        for s in [*self.copies.values(), *self.closed_ends.values()]:
            s.close()
        self.copies.clear()
        self.closed_ends.clear()
        self.private.close()  # the socket files of deleted names go with it

    def place(self, tmp: int, f: Fd) -> None:
        """Put a fresh socket at its fd number (out of the way first: a socketpair's
        second fd may be the first one's number). A socket handed over by another
        tree member stays where it is (tmp is a spare number, above the image's fds)."""
        from .fds import _place

        if f.socket.ino in self.handed or f.socket.ino in self.flying:
            f.fd = tmp
        else:
            _place(self.inj, tmp, f.fd, f.cloexec)
        self.made.add(f.socket.ino)

    def new(self, s: Socket) -> int:
        t = s.type | abi.SOCK_NONBLOCK | abi.SOCK_CLOEXEC
        return self.ctx.spare_fd(syscalls.socket(self.inj, s.family, t, s.protocol))

    def pair(self, a: Fd, b: Fd) -> None:
        inj = self.inj
        inj.reset_data()
        buf = inj.alloc(8)
        syscalls.socketpair(
            inj,
            socket.AF_UNIX,
            a.socket.type | abi.SOCK_NONBLOCK | abi.SOCK_CLOEXEC,
            0,
            buf,
        )
        ta, tb = struct.unpack("<ii", inj.read(buf, 8))
        ta, tb = self.ctx.spare_fd(ta), self.ctx.spare_fd(tb)
        self.place(ta, a)
        self.place(tb, b)

    def sockaddr(self, family: int, addr) -> tuple[int, int]:
        raw = ks.pack_sockaddr(family, addr)
        return self.inj.put(raw), len(raw)

    def chdir_for(self, name: bytes) -> None:
        """Relative unix paths were relative to the process's cwd (set again later)."""
        if name[:1] not in (b"/", b"\0") and not self.cwd_set:
            hostfs.chdir_resolved(self.inj, self.proc.cwd)
            self.cwd_set = True

    def path_of(self, name: bytes) -> str:
        p = os.fsdecode(name)
        return p if p.startswith("/") else os.path.join(self.proc.cwd, p)

    def file_owner(self, s: Socket) -> tuple[int, int, list[int] | None]:
        """Who creates and removes the socket's file: its owner as dumped, else the
        process (a deleted name, an image from before name_file)."""
        uid, gid, groups = hostfs.process_fs_identity(self.proc)
        if s.name_file and not s.name_deleted:
            _, fuid, fgid = s.name_file
            return fuid, fgid, (groups if (fuid, fgid) == (uid, gid) else [fgid])
        return uid, gid, groups

    def bind_unix(self, f: Fd) -> None:
        """bind, and for a path name: the file made by the restorer as its owner, born
        with its mode (fchmod of the socket and umask 0 before bind: nothing is done by
        name afterwards); a stale file removed as the owner too, so a name swapped for a
        symlink never makes root act on its target. A deleted name: _bind_deleted."""
        s = f.socket
        name = s.local
        on_disk = name[:1] != b"\0"
        if on_disk and s.name_deleted:  # bound where nobody can reach it, as it was
            self._bind_deleted(f)
            return
        stale = False
        if on_disk:
            if self._live is None:
                self._live = ks.live_bound_files()
            try:
                stale = ks.stale_socket_file(self.path_of(name), self._live)
            except FileExistsError as exc:
                raise RestoreError(
                    f"cannot bind unix socket fd {f.fd} to {_name(name)}: {exc.strerror}"
                ) from exc
        self.chdir_for(name)
        inj = self.inj
        inj.reset_data()
        addr, ln = self.sockaddr(socket.AF_UNIX, name)
        if not on_disk:
            self._bind(f, addr, ln)
            return
        mode = s.name_file[0] if s.name_file and not s.name_deleted else None
        old_mask = None
        if mode is not None:
            old_mask = syscalls.umask(inj, 0)
            syscalls.fchmod(inj, f.fd, mode)
        uid, gid, groups = self.file_owner(s)
        try:
            with hostfs.fs_identity(inj, uid, gid, groups):
                try:
                    if stale:
                        hostfs.unlink_as_owner(inj, name)
                    self._bind(f, addr, ln, f" as uid {uid}")
                except RemoteError as exc:
                    raise RestoreError(
                        f"cannot re-create the file of unix socket fd {f.fd} ({_name(name)}) "
                        f"as uid {uid}: {exc.strerror}"
                    ) from exc
        finally:
            if old_mask is not None:
                syscalls.umask(inj, old_mask)
                syscalls.fchmod(inj, f.fd, SOCK_INODE_MODE)

    def _bind_deleted(self, f: Fd) -> None:
        """A name whose file was deleted: bound in ckpt's private directory (made the
        restorer's root for the call: restore/unixnames.py), so that getsockname gives
        the very name and no path appears on the host."""
        name = f.socket.local
        self.inj.reset_data()
        addr, ln = self.sockaddr(socket.AF_UNIX, name)
        try:
            with self.private.inside(name):
                syscalls.bind(self.inj, f.fd, addr, ln)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot bind unix socket fd {f.fd} to {_name(name)} (a deleted name, bound "
                f"in ckpt's private directory): {exc.strerror}"
            ) from exc

    def _bind(self, f: Fd, addr: int, ln: int, who: str = "") -> None:
        try:
            syscalls.bind(self.inj, f.fd, addr, ln)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot bind unix socket fd {f.fd} to {_name(f.socket.local)}{who}: {exc.strerror}"
            ) from exc

    def connect_unix(self, f: Fd, name: bytes, to: Socket | None = None) -> None:
        """connect, by a path as the process itself (its fsuid, fsgid and groups): a
        name swapped for a link to a socket the process could not reach fails. `to`:
        the socket of the image bound to `name`, if known (one whose name was deleted
        is reached in ckpt's private directory)."""
        if _deleted(to, name):
            self.inj.reset_data()
            addr, ln = self.sockaddr(socket.AF_UNIX, name)
            try:
                with self.private.inside(name):
                    syscalls.connect(self.inj, f.fd, addr, ln)
            except RemoteError as exc:
                raise RestoreError(
                    f"cannot reconnect unix socket fd {f.fd} to {_name(name)} (a deleted "
                    f"name): {exc.strerror}"
                ) from exc
            return
        self.chdir_for(name)
        inj = self.inj
        inj.reset_data()
        addr, ln = self.sockaddr(socket.AF_UNIX, name)
        ident = hostfs.process_fs_identity(self.proc) if name[:1] != b"\0" else None
        try:
            with contextlib.ExitStack() as stack:
                if ident is not None:
                    stack.enter_context(hostfs.fs_identity(inj, *ident))
                syscalls.connect(inj, f.fd, addr, ln)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot reconnect unix socket fd {f.fd} to {_name(name)}: {exc.strerror}"
            ) from exc

    # -- the passes ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            with _as_restore_error():
                self.tcp_closed(held=False)  # (ports taken and given back before any bind)
                self.simple()
                self.tcp_closed(held=True)  # (after the listener whose port it shares)
                self.unix_connections()
                self.pending()
                established = self.tcp_established()
                for f in established:
                    reuse = int(f.socket.options.get("SO_REUSEADDR", 0) or 0)
                    tcp_repair.resume(self.copy(f), f.socket.tcp, reuse)
                self.tcp_closing(established)
                if self.deferred:  # sent with their files once every fd exists
                    self.inflight.defer(self)
                else:
                    self.unix_data()
                    self.finish()
        finally:
            if not self.deferred:
                self.close()
        for f in self.fds:
            if f.socket.ino in self.flying:
                if self.inflight is None:
                    raise RestoreError(f"socket:[{f.socket.ino}] in flight: nothing sends it")
                self.inflight.socket_made(f.socket.ino, self.inj, self.inj.tracee.pid, f.fd)
                continue
            if f.socket.ino not in self.handed:
                self.ctx.done.add(f.fd)
                continue
            if self.ctx.parked is None:
                raise RestoreError(f"socket:[{f.socket.ino}] belongs to another process of a tree")
            self.ctx.parked[(f.socket.ino, PARKED)] = (self.inj.tracee.pid, f.fd)

    def simple(self) -> None:
        """Sockets that need no partner: listening, bound, unbound, UDP, unix dgram."""
        for f in self.fds:
            s = f.socket
            if s.family == socket.AF_UNIX:
                if s.state in ("pending",) or (
                    s.state == "connected" and s.type != socket.SOCK_DGRAM
                ):
                    continue
                if s.state == "connected" and self._dgram_pair(f):
                    continue
                self.place(self.new(s), f)
                if s.local:
                    self.bind_unix(f)
                if s.state == "listen":
                    syscalls.listen(self.inj, f.fd, s.backlog)
                continue
            if s.state in ("established", "closed"):
                continue
            self.place(self.new(s), f)
            c = self.copy(f)
            ks.set_options(c, s.options, only=ks.BEFORE_BIND)
            if s.state in ("bound", "listen", "connected") and s.local:
                self.bind_inet(f, c)
            if s.state == "listen":
                c.listen(s.backlog)
            elif s.state == "connected" and s.remote:
                c.connect(tuple(s.remote))
                if c.getsockname()[:2] != tuple(s.local[:2]):  # (bind_address: from connect)
                    raise RestoreError(
                        f"fd {f.fd}: connected to {_name(s.remote)}, its address came back "
                        f"as {_name(list(c.getsockname()))}, not {_name(s.local)}"
                    )

    def bind_inet(self, f: Fd, c: socket.socket) -> None:
        """bind as the socket was bound, around two things an explicit bind changes: an
        address-only bind (port 0, IP_BIND_ADDRESS_NO_PORT) must take no port, and an IPv6
        socket that got its address from connect() (or from a dual-stack listener) keeps
        IPV6_V6ONLY off, which binding an IPv6 address turns on (bind_address)."""
        s = f.socket
        no_port = not s.local[1]
        if no_port:
            c.setsockopt(ks.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        addr = self.bind_address(f)
        try:
            c.bind(addr)
        except OSError as exc:
            raise RestoreError(
                f"cannot bind fd {f.fd} to {_name(s.local)}: {exc.strerror}"
            ) from exc
        if no_port:
            c.setsockopt(ks.SOL_IP, IP_BIND_ADDRESS_NO_PORT, int(s.options.get(_NO_PORT, 0)))
            if s.family == socket.AF_INET6 and not s.options.get("IPV6_V6ONLY", 0):
                c.setsockopt(ks.SOL_IPV6, ks.IPV6_V6ONLY, 0)  # still unbound: allowed

    def bind_address(self, f: Fd) -> tuple:
        """Where to bind an IPv6 socket with IPV6_V6ONLY off whose address is a plain
        IPv6 one (neither unspecified nor v4-mapped) and that is connected: the kernel
        gave it that address at connect() (or its listener on [::] did), and only there
        does it stay dual-stack. Bound to [::] on its port, it gets the address from
        connect again when the route gives the same source (asked here of a UDP socket
        bound and marked like it); else it is bound to the address and IPV6_V6ONLY reads
        on (docs/ARCHITECTURE.md "Sockets")."""
        s = f.socket
        local = tuple(s.local)
        if (
            s.family != socket.AF_INET6
            or not s.remote
            or not local[1]
            or s.options.get("IPV6_V6ONLY", 0)
            or not _plain_v6(local[0])
        ):
            return local
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                ks.set_options(probe, s.options, only=_ROUTE_CHOICE)
                probe.connect(tuple(s.remote))
                src = probe.getsockname()[0]
        except OSError:
            src = None
        if src is None or ipaddress.ip_address(src) != ipaddress.ip_address(local[0]):
            self.v6only_moved.add(s.ino)
            return local
        return ("::", local[1], 0, 0)

    def _dgram_pair(self, f: Fd) -> bool:
        """Two unnamed dgram sockets connected to each other: a socketpair."""
        s = f.socket
        p = self.by_ino.get(s.peer_ino)
        if p is None or p.socket.peer_ino != s.ino or s.local or p.socket.local:
            return False
        if s.ino not in self.made:
            self.pair(f, p)
        self.paired |= {s.ino, p.socket.ino}
        return True

    def unix_connections(self) -> None:
        for f in self.fds:
            s = f.socket
            if s.family != socket.AF_UNIX or s.state != "connected":
                continue
            if s.type == socket.SOCK_DGRAM:
                if s.ino in self.paired:
                    continue
                target = self.by_ino.get(s.peer_ino)
                name = target.socket.local if target is not None else s.remote
                if name:
                    self.connect_unix(f, name, target.socket if target is not None else None)
                continue
            if s.ino in self.made:
                continue
            p = self.by_ino.get(s.peer_ino)
            if p is None:  # the peer had closed: a pair whose other end goes after the data
                self.pair_with_closed(f)
                continue
            if p.socket.accepted and not s.accepted:
                f, p = p, f  # f: the accepted end
            listener = self.by_ino.get(f.socket.listener_ino) if f.socket.accepted else None
            if listener is None:
                self.pair(f, p)
                continue
            self.place(self.new(p.socket), p)
            if p.socket.local:
                self.bind_unix(p)
            self.connect_unix(p, listener.socket.local, listener.socket)
            tmp = self.ctx.spare_fd(syscalls.accept4(self.inj, listener.fd, 0, 0, abi.SOCK_CLOEXEC))
            self.place(tmp, f)

    def pair_with_closed(self, f: Fd) -> None:
        inj = self.inj
        inj.reset_data()
        buf = inj.alloc(8)
        syscalls.socketpair(
            inj,
            socket.AF_UNIX,
            f.socket.type | abi.SOCK_NONBLOCK | abi.SOCK_CLOEXEC,
            0,
            buf,
        )
        ta, tb = struct.unpack("<ii", inj.read(buf, 8))
        ta, tb = self.ctx.spare_fd(ta), self.ctx.spare_fd(tb)
        self.place(ta, f)
        other = self.ctx.copy(tb)
        syscalls.close(inj, tb)
        if self.deferred:  # its data waits with the rest (flush), and so does the EOF
            self.closed_ends[f.socket.ino] = ks.adopt(other)
            return
        with ks.adopt(other) as o:
            self.send_queue(f, o)
        # dropping ckpt's copy closes the last reference: f sees EOF after its data

    def flush(self, files: dict[int, list[int]]) -> None:
        """restore/inflight.py, once every fd of the tree exists: the queues (each message
        with its files in flight: `files`, ckpt's fds by socket inode, in the order of its
        in-flight table), then what follows them in run()."""
        self.files = files
        try:
            with _as_restore_error():
                for f in self.fds:
                    end = self.closed_ends.pop(f.socket.ino, None)
                    if end is not None:
                        with end:  # its close: the EOF after the data
                            self.send_queue(f, end)
                self.unix_data()
                self.finish()
        finally:
            self.close()

    def pending(self) -> None:
        """Connections not yet accepted, re-made in the listener's queue order."""
        for f in self.fds:
            s = f.socket
            if s.family != socket.AF_UNIX or s.state != "listen":
                continue
            for ino in s.pending:
                c = self.by_ino.get(ino)
                if c is None:
                    continue
                self.place(self.new(c.socket), c)
                if c.socket.local:
                    self.bind_unix(c)
                self.connect_unix(c, s.local, s)

    def tcp_established(self) -> list[Fd]:
        out = []
        for f in self.fds:
            s = f.socket
            if s.family == socket.AF_UNIX or s.state != "established" or s.tcp is None:
                continue
            self.place(self.new(s), f)
            c = self.copy(f)
            try:
                tcp_repair.rebuild(
                    c, self.bind_address(f), tuple(s.remote), s.tcp,
                    # not SO_REUSEADDR: repair mode's forced reuse lets the connection take
                    # its listener's port; tcp_repair.resume() sets it after repair mode
                    lambda sock, s=s: ks.set_options(
                        sock, s.options, only=ks.BEFORE_BIND, skip=("SO_REUSEADDR",)
                    ),
                    outside=not s.peer_ino,
                )  # fmt: skip
                if c.getsockname()[:2] != tuple(s.local[:2]):  # (bind_address: from connect)
                    raise OSError(0, f"its address came back as {_name(list(c.getsockname()))}")
                if s.shutdown & 1:  # shutdown(SHUT_RD) (in repair mode: nothing is sent)
                    c.shutdown(socket.SHUT_RD)
            except OSError as exc:
                raise RestoreError(
                    f"cannot rebuild TCP connection fd {f.fd} ({_name(s.local)} -> "
                    f"{_name(s.remote)}): {exc.strerror or exc}"
                ) from exc
            finally:
                if _collecting is not None:  # silenced if the restore fails
                    _collecting.held.append(c.dup())
            out.append(f)
        return out

    def tcp_closed(self, held: bool) -> None:
        """TCP sockets in state CLOSE after a connection (state "closed"), made so by the
        kernel again (kernel/tcp_closed.py): a connection over their local address to a
        helper of ckpt's, reset by it (or a connect it refuses). held: those that keep
        their port (bound explicitly); the others first, before anything else takes a
        port (an accepted one's port is its listener's, made after)."""
        for f in self.fds:
            s = f.socket
            if s.state != "closed" or s.closed is None or s.closed.port_held != held:
                continue
            c = s.closed
            opt = s.options.get
            try:
                accepted = c.handshake and not held and not c.disconnected
                if accepted and not tcp_closed.connect_gives(int(s.local[1])):
                    sock = self._accept_closed(f)
                else:
                    self.place(self.new(s), f)
                    sock = self.copy(f)
                    tcp_closed.build(
                        sock, tuple(s.local), c, v6only=int(opt("IPV6_V6ONLY", 0) or 0),
                        port_range=int(opt("IP_LOCAL_PORT_RANGE", 0) or 0),
                        no_port=int(opt(_NO_PORT, 0) or 0),
                        user_mss=int(opt("TCP_MAXSEG", 0) or 0),
                    )  # fmt: skip
                # the options that go before bind (finish sets the others), buffers as dumped
                ks.set_options(sock, s.options, only=ks.BEFORE_BIND, skip=("IPV6_V6ONLY",))
                ks.set_buffers(sock, s.sndbuf, s.rcvbuf, s.buf_lock)
            except OSError as exc:
                if isinstance(exc, RemoteError):
                    raise
                raise RestoreError(
                    f"cannot rebuild the closed TCP socket fd {f.fd} ({_name(s.local)}): "
                    f"{exc.strerror or exc}"
                ) from exc

    def _accept_closed(self, f: Fd) -> socket.socket:
        """A closed socket on a port connect() does not give (an accepted one's, its
        listener's): accepted by the restorer from a listener of its own on that port (a
        clone holds no port lock), then closed by ckpt's helper at the other end."""
        s = f.socket
        inj = self.inj
        lfd = self.new(s)
        try:
            with ks.adopt(self.ctx.copy(lfd)) as lst:
                v6only = int(s.options.get("IPV6_V6ONLY", 0) or 0)
                tcp_closed.listen_for(lst, tuple(s.local), v6only)
                helper = tcp_closed.dial(tuple(s.local), lst)
                try:
                    tmp = self.ctx.spare_fd(syscalls.accept4(inj, lfd, 0, 0, abi.SOCK_CLOEXEC))
                except BaseException:
                    helper.close()
                    raise
        finally:
            syscalls.close(inj, lfd)
        self.place(tmp, f)
        sock = self.copy(f)
        reuse = int(s.options.get("SO_REUSEADDR", 0) or 0)
        tcp_closed.build_accepted(sock, helper, s.closed, reuse=reuse)
        return sock

    def tcp_closing(self, established: list[Fd]) -> None:
        """The FINs the closing connections' sequences leave out, played again now that
        every connection is out of repair mode (kernel/tcp_repair.py replay_fins): both
        ends of a loopback pair are rebuilt here, together."""
        if all(f.socket.tcp.state == tcp_repair.TCP_ESTABLISHED for f in established):
            return
        items = {
            f.socket.ino: tcp_repair.Closing(
                self.copy(f), f.socket.tcp, tuple(f.socket.local), tuple(f.socket.remote)
            )
            for f in established
        }
        for f in established:
            if not f.socket.peer_ino:
                continue
            items[f.socket.ino].partner = items.get(f.socket.peer_ino)
            if items[f.socket.ino].partner is None:
                raise RestoreError(
                    f"TCP connection fd {f.fd} ({_name(f.socket.local)} -> "
                    f"{_name(f.socket.remote)}): its other end, socket:[{f.socket.peer_ino}], "
                    "is not in the image"
                )
        try:
            tcp_repair.replay_fins(list(items.values()))
        except OSError as exc:
            raise RestoreError(
                f"cannot close the TCP connections as they were: {exc.strerror or exc}"
            ) from exc

    def send_queue(self, f: Fd, sender: socket.socket, dest: bytes | None = None) -> None:
        s = f.socket
        try:
            for m in s.queue:
                try:
                    self._send(s, sender, m, dest)
                except BlockingIOError:
                    ks.grow_sndbuf(sender, sum(len(x.data) for x in s.queue))
                    self._send(s, sender, m, dest)
        except OSError as exc:
            raise RestoreError(
                f"cannot put the {sum(len(m.data) for m in s.queue)} queued bytes back into "
                f"socket fd {f.fd}: {exc.strerror or exc}"
            ) from exc

    def _send(self, s: Socket, sender: socket.socket, m, dest) -> None:
        """Message `m` (model.SocketMsg), with its files in flight and credentials."""
        creds = self.creds(s, m) if m.creds else None
        if m.fds or creds is not None:
            table = self.files.get(s.ino, [])
            if len(table) < len(s.inflight):
                raise RestoreError(f"socket:[{s.ino}]: its files in flight were not made")
            if m.fds and s.type == socket.SOCK_STREAM:  # the segment in one skb, as it was
                ks.grow_sndbuf(sender, len(m.data))
            ks.send_scm(sender, m.data, [table[i] for i in m.fds], creds, dest)
        elif s.type == socket.SOCK_STREAM:
            ks.send_all(sender, m.data, dest)
        else:
            ks.send_message(sender, m.data, dest)

    def creds(self, s: Socket, m) -> tuple[int, int, int]:
        """The SCM_CREDENTIALS to send `m` with: its sender's restored PID (a member or
        zombie of the image), its PID if that process still runs, else ckpt's (the kernel
        takes only a live one; said once per socket), and its uid and gid."""
        pid, uid, gid = m.creds
        now = (getattr(self.ctx, "pids", None) or {}).get(pid)
        if now is None and pid > 0 and os.path.exists(procfs.path(pid)):
            now = pid
        if now is None:
            import sys

            now = os.getpid()
            if s.ino not in self.gone_senders:
                self.gone_senders.add(s.ino)
                sys.stderr.write(
                    f"ckpt: process {self.proc.pid}: socket:[{s.ino}]: a queued message came "
                    f"from process {pid}, gone now: it carries ckpt's PID (uid {uid}, gid "
                    f"{gid} as they were)\n"
                )
        return now, uid, gid

    def unix_data(self) -> None:
        """Each socket's unread data, sent again from the end that sent it."""
        for f in self.fds:
            s = f.socket
            if s.family != socket.AF_UNIX or not s.queue or s.peer_closed:
                continue
            if s.type != socket.SOCK_DGRAM:
                p = self.by_ino.get(s.peer_ino)
                if p is None:
                    raise RestoreError(f"socket fd {f.fd} has queued data but no peer to send it")
                self.send_queue(f, self.copy(p))
                continue
            self.dgram_queue(f)

    def dgram_queue(self, f: Fd) -> None:
        s = f.socket
        peer = self.by_ino.get(s.peer_ino)
        named = {
            x.socket.local: x
            for x in self.fds
            if x.socket.family == socket.AF_UNIX and x.socket.local
        }
        for m in s.queue:
            one = Socket(ino=s.ino, family=s.family, type=s.type, protocol=0, state="", queue=[m])
            rec = Fd(
                fd=f.fd,
                kind="socket",
                path=f.path,
                flags=f.flags,
                cloexec=f.cloexec,
                pos=0,
                socket=one,
            )
            src = named.get(m.source) if m.source else None
            if (
                peer is not None
                and peer.socket.peer_ino == s.ino
                and (m.source is None or m.source == peer.socket.local)
            ):
                self.send_queue(rec, self.copy(peer))
            elif not s.local:
                raise RestoreError(
                    f"unix dgram socket fd {f.fd} is unnamed but holds a message from "
                    f"{_name(m.source)} that is not its peer"
                )
            elif src is not None:
                with self.as_process(s.local, s):
                    self.send_queue(rec, self.copy(src), self.dest(s.local, s))
            else:  # sender unnamed or outside the process: from an unnamed socket
                with (
                    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tmp,
                    self.as_process(s.local, s),
                ):
                    self.send_queue(rec, tmp, self.dest(s.local, s))

    def dest(self, name: bytes, to: Socket | None = None) -> bytes:
        """A unix name as ckpt (another cwd) must address it: a relative one through the
        restorer's cwd (the process's: a user who cannot reach it by its absolute path
        reaches it from there), an absolute one as it is; a deleted one (`to`, the
        socket bound to it) in ckpt's private directory."""
        if _deleted(to, name):
            return self.private.host_path(name)
        if name[:1] in (b"\0", b"/"):
            return name
        via = os.fsencode(procfs.path(self.inj.tracee.pid, "cwd") + "/") + name
        return via if self.cwd_set and len(via) < 108 else os.fsencode(self.path_of(name))

    def as_process(self, name: bytes, to: Socket | None = None):
        """ckpt's own sends to a unix path, as the restored process's filesystem user
        (this thread only: kernel/fsident.py): the name is resolved and checked as that
        user, so a name swapped for a link to another socket reaches only what it could.
        (A deleted name is reached in ckpt's private directory, as ckpt.)"""
        if name[:1] == b"\0" or _deleted(to, name):
            return contextlib.nullcontext()
        return as_fs_user(*hostfs.process_fs_identity(self.proc))

    def finish(self) -> None:
        inj = self.inj
        for f in self.fds:
            s = f.socket
            c = self.copy(f)
            self.settings(f, c)
            if s.family == socket.AF_UNIX:  # no autotuning: the sizes as they were
                ks.set_buffers(c, s.sndbuf, s.rcvbuf, s.buf_lock)
            else:  # TCP/UDP autotune unless the application pinned a size
                ks.set_buffers(
                    c,
                    s.sndbuf if s.buf_lock & ks.SOCK_SNDBUF_LOCK else 0,
                    s.rcvbuf if s.buf_lock & ks.SOCK_RCVBUF_LOCK else 0,
                    s.buf_lock,
                )
            if s.family == socket.AF_UNIX:
                if s.shutdown and not s.peer_closed:
                    with contextlib.suppress(OSError):
                        c.shutdown(
                            {1: socket.SHUT_RD, 2: socket.SHUT_WR}.get(s.shutdown, socket.SHUT_RDWR)
                        )
                if s.peek_off >= 0:
                    c.setsockopt(ks.SOL_SOCKET, ks.SO_PEEK_OFF, s.peek_off)
            elif s.shutdown and (s.type == socket.SOCK_DGRAM or _unconnected_tcp(s)):
                # an unconnected UDP socket answers ENOTCONN, with its bits set all the same
                with contextlib.suppress(OSError):
                    c.shutdown(
                        {1: socket.SHUT_RD, 2: socket.SHUT_WR}.get(s.shutdown, socket.SHUT_RDWR)
                    )
            syscalls.fcntl(inj, f.fd, abi.F_SETFL, f.flags & ~3)  # O_NONBLOCK as it was

    def settings(self, f: Fd, c: socket.socket) -> None:
        """The socket's BPF filter, multicast groups, then its options (SO_LOCK_FILTER
        among them: after the filter), those set before bind aside; then every option and
        group is read back: one the kernel took otherwise fails the restore rather than
        leave it silently wrong."""
        s = f.socket
        early = ks.BEFORE_BIND if s.family != socket.AF_UNIX else ()
        try:
            if s.filter:
                ks.attach_filter(c, s.filter)
            ks.join_groups(c, s.mcast)
            ks.set_options(c, s.options, skip=early)
        except OSError as exc:
            raise RestoreError(
                f"cannot set the options of socket fd {f.fd} ({_name(s.local)}): "
                f"{exc.strerror or exc}"
            ) from exc
        moved = ("IPV6_V6ONLY",) if s.ino in self.v6only_moved else ()
        wrong = ks.check_options(c, s.options, skip=moved) or _check_groups(c, s)
        if wrong:
            raise RestoreError(f"socket fd {f.fd} ({_name(s.local)}): {wrong} after the restore")


IP_BIND_ADDRESS_NO_PORT, _NO_PORT = 24, "IP_BIND_ADDRESS_NO_PORT"
# what chooses the source address of a connection besides its destination
_ROUTE_CHOICE = ("SO_BINDTODEVICE", "SO_MARK", "IPV6_ADDR_PREFERENCES", "IPV6_UNICAST_IF")


def _check_groups(c: socket.socket, s: Socket) -> str | None:
    """The first multicast group the rebuilt socket does not hold as the image says."""
    if not s.mcast:
        return None
    where = [(socket.if_nametoindex(g.iface), g.group) for g in s.mcast]
    have = {(g.iface, g.group): g for g in ks.memberships(c, where)}
    for g in s.mcast:
        got = have.get((g.iface, g.group))
        if got is None or (got.include, sorted(got.sources)) != (g.include, sorted(g.sources)):
            return f"multicast group {g.group} on {g.iface} is not joined as it was"
    return None


def _unconnected_tcp(s: Socket) -> bool:
    """A TCP socket without a connection whose shutdown bits its process set (shutdown()
    answered ENOTCONN and set them all the same); a closed one has them all already,
    unless disconnected since (and shutdown() would move a failed connect's state)."""
    if s.type != socket.SOCK_STREAM or s.family == socket.AF_UNIX:
        return False
    return s.state in ("bound", "unbound") or (s.closed is not None and s.closed.disconnected)


def _plain_v6(host: str) -> bool:
    a = ipaddress.ip_address(host.split("%", 1)[0])
    return isinstance(a, ipaddress.IPv6Address) and not a.is_unspecified and not a.ipv4_mapped


def _deleted(to: Socket | None, name: bytes) -> bool:
    """Is `name` the deleted name of the image's socket `to` (reached privately)?"""
    return to is not None and to.name_deleted and to.local == name and name[:1] != b"\0"


def restore_sockets(ctx, first: Fd) -> None:
    """restore/fds.py's entry for kind "socket": every socket of the process at once."""
    _Sockets(ctx).run()


def restore_socket_end(ctx, fd: Fd) -> None:
    """restore/fds.py's entry for kind "socket_end": this process's socket of a group
    an earlier tree member rebuilt (with its data, options and flags) and parked."""
    from .fds import _take

    got = (ctx.parked or {}).get((fd.obj_id, PARKED))
    if got is None:
        raise RestoreError(
            f"fd {fd.fd}: the process that rebuilt socket:[{fd.obj_id}] did not leave it"
        )
    _take(ctx, fd, *got)
