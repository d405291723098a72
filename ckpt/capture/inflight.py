"""Files in flight in a unix socket's receive queue (SCM_RIGHTS), described so that the
restore can send every message again with the same files (restore/inflight.py).

A peek with a control buffer (kernel/sockets.py TargetSocket.peek_scm) installs the files
a queued message carries as new fds of ckpt and leaves the message queued. Each distinct
open file description becomes one record of the socket's in-flight table
(Socket.inflight); a message names its files by index in it (SocketMsg.fds):

- a description a process of the dump holds (kcmp KCMP_FILE against its fds of the same
  inode): kind "peer", `peer_fd` its fd there and `peer_slot` the process's slot (the
  capture knows the PID; link_slots sets the slot once the tree is linked). The restore
  sends that restored fd, so the offset stays shared;
- anything else is made again at restore: "file" and "dir" (path, flags, offset, the
  file's identity), "chr" (null, zero, full, random, urandom), "pipe" (`obj_id` the pipe:
  its bytes and capacity when no process of the dump holds it), "memfd" (`obj_id`; its
  content when no process of the dump holds it), "eventfd" (count, semaphore), "socket"
  (`obj_id` the inode of a unix socket captured whole as a record with fd -1 of the
  process: capture/sockets.py inflight_socket, built with the process's sockets);
- every other kind is refused, naming the process, the fd and the kind; so is a socket in
  flight that itself holds files in flight, and one open file description in flight in
  two sockets (each socket's table would make its own).

The credentials a message carries (SCM_CREDENTIALS) are kept when the socket asks for
them (SO_PASSCRED, SO_PASSPIDFD): SocketMsg.creds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat as statmod
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DumpError, UnsupportedProcess
from ..kernel import abi, fdobjs, procfs
from ..kernel.process import kcmp_file
from ..kernel.sockets import TargetSocket
from ..model import Fd, MemfdState, ProcessImage, Socket, SocketMsg
from . import fd_kinds
from .vmas import file_ref

SUPPORTED = (
    "regular files, directories, pipes, memfds, eventfds, unix sockets, /dev/null-like "
    "devices, and open file descriptions the dumped processes hold"
)


@dataclass
class RunState:
    """One dump run's files in flight (on capture/sockets.py SocketCapture)."""

    # references to descriptions a process of the dump holds: (record, its PID)
    refs: list[tuple[Fd, int]] = field(default_factory=list)
    # ckpt's fds of the descriptions made again, kept until close() to find one in flight
    # in two sockets: (fd, which socket holds it)
    own: list[tuple[int, str]] = field(default_factory=list)
    # pipes and memfds in flight whose bytes or content a record holds already
    content: set[int] = field(default_factory=set)
    # unix sockets in flight (their inodes): a peer of one of them is not "outside"
    sockets: set[int] = field(default_factory=set)
    # PID → the records (fd -1) of the sockets in flight its queues hold
    records: dict[int, list[Fd]] = field(default_factory=dict)

    def take_records(self, pid: int) -> list[Fd]:
        return self.records.pop(pid, [])

    def close(self) -> None:
        own, self.own = self.own, []
        for fd, _ in own:
            with contextlib.suppress(OSError):
                os.close(fd)


def capture_queue(
    pid: int,
    ts: TargetSocket,
    s: Socket,
    *,
    scm: int,
    creds: bool,
    what: str,
    run: RunState,
    tree: frozenset[int],
    frozen: bool,
    charge: Callable[[str, int], None],
    socket_of: Callable[[int, int, int], Socket],
) -> None:
    """s.queue and s.inflight of socket `ts` (fd ts.fd of `pid`), whose fdinfo counts
    `scm` fds in flight; `creds`: keep each message's SCM_CREDENTIALS.

    charge(kind, nbytes): count content kept against the fds' data budget; socket_of(own
    fd, its flags, receiving fd): the Socket of a unix socket in flight (a record with fd
    -1 of the process). While the process runs (`frozen` False: the preflight) only the
    refusals matter: nothing is kept, and a count that moved is not an error."""
    got = ts.peek_scm(creds)
    table = _Table(pid, ts.fd, what, run, tree, charge, socket_of)
    try:
        seen = sum(len(q.fds) for q in got)
        if frozen and seen != scm:
            raise UnsupportedProcess(
                f"{what} that holds {scm} files in flight (SCM_RIGHTS), {seen} of which a peek "
                "reaches: not supported (a zero-length datagram that carries files, after "
                "another message, cannot be read without taking it)",
                pid=pid,
            )
        for q in got:
            if q.fds:
                run.sockets.update(_socket_inodes(q.fds))
        queue = []
        for q in got:
            idx = [table.add(x) for x in q.fds]
            source = q.source if ts.type != socket.SOCK_STREAM else None
            c = list(q.creds) if q.creds is not None else []
            queue.append(SocketMsg(q.data, source, fds=idx, creds=c))
        if frozen:
            s.queue, s.inflight = queue, table.records
    finally:
        for q in got:
            for x in q.fds:
                if x not in table.kept:
                    with contextlib.suppress(OSError):
                        os.close(x)


def _socket_inodes(fds: list[int]) -> set[int]:
    out = set()
    for x in fds:
        with contextlib.suppress(OSError):
            st = os.fstat(x)
            if statmod.S_ISSOCK(st.st_mode):
                out.add(st.st_ino)
    return out


class _Table:
    """The in-flight table of one socket, filled message by message."""

    def __init__(self, pid, rfd, what, run, tree, charge, socket_of):
        self.pid, self.rfd, self.what, self.run = pid, rfd, what, run
        self.pids = [pid, *sorted(tree - {pid})]
        self.charge, self.socket_of = charge, socket_of
        self.records: list[Fd] = []
        self.mine: list[tuple[int, int]] = []  # (ckpt's fd, index): one per description
        self.kept: set[int] = set()  # ckpt's fds the run keeps (RunState.own)
        self._held: dict[tuple[int, int], list[tuple[int, int]]] | None = None
        self._mapped: set[int] | None = None

    # -- what the dumped processes hold ---------------------------------------------------

    def held(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """(st_dev, st_ino) → (PID, fd) of every fd of the dumped processes."""
        if self._held is None:
            self._held = {}
            for p in self.pids:
                try:
                    fds = procfs.fds(p)
                except OSError:
                    continue
                for fd in fds:
                    try:
                        st = os.stat(procfs.fd_path(p, fd))
                    except OSError:
                        continue
                    self._held.setdefault((st.st_dev, st.st_ino), []).append((p, fd))
        return self._held

    def mapped(self) -> set[int]:
        """Inodes of the memfds the dumped processes map."""
        if self._mapped is None:
            self._mapped = set()
            for p in self.pids:
                with contextlib.suppress(OSError):
                    for m in procfs.maps(p):
                        if m.deleted and m.name.startswith(fd_kinds.MEMFD_PREFIX) and m.inode:
                            self._mapped.add(m.inode)
        return self._mapped

    # -- one file in flight ---------------------------------------------------------------

    def refuse(self, what: str) -> UnsupportedProcess:
        return UnsupportedProcess(
            f"{self.what} that holds in flight (SCM_RIGHTS) {what}: not supported (only {SUPPORTED} "
            "are sent again)",
            pid=self.pid,
        )

    def add(self, x: int) -> int:
        """The index of ckpt's fd `x` (a file in flight) in the table."""
        me = os.getpid()
        st = os.fstat(x)
        for y, i in self.mine:
            if kcmp_file(me, x, me, y):
                return i  # the same description again (sent twice)
        i = len(self.records)
        link = os.readlink(procfs.fd_path(me, x))
        info = procfs.parse_fdinfo(procfs.read_bytes(me, "fdinfo", str(x)))
        flags = info.flags & ~abi.O_CLOEXEC
        for p, fd in self.held().get((st.st_dev, st.st_ino), ()):
            if kcmp_file(me, x, p, fd):
                rec = Fd(fd=i, kind="peer", path=link, flags=flags, cloexec=False,
                         pos=info.pos, peer_fd=fd)  # fmt: skip
                self.run.refs.append((rec, p))
                return self._add(x, rec)
        for y, where in self.run.own:
            if kcmp_file(me, x, me, y):
                raise self.refuse(
                    f"{link}, which is also in flight in {where} (one open file description "
                    "in flight in two sockets)"
                )
        rec = self.describe(x, st, link, flags, info)
        self.run.own.append((x, f"fd {self.rfd} of process {self.pid}"))
        self.kept.add(x)
        return self._add(x, rec)

    def _add(self, x: int, rec: Fd) -> int:
        self.mine.append((x, rec.fd))
        self.records.append(rec)
        return rec.fd

    def describe(self, x: int, st: os.stat_result, link: str, flags: int, info) -> Fd:
        """A file in flight no process of the dump holds: what it takes to make it again."""
        i = len(self.records)
        rec = Fd(fd=i, kind="", path=link, flags=flags, cloexec=False, pos=info.pos)
        kind = fd_kinds.kind_of(link, st)
        if statmod.S_ISSOCK(st.st_mode):
            rec.kind, rec.pos, rec.obj_id = "socket", 0, st.st_ino
            rec.socket = None  # the Socket is on the process's record of it (fd -1)
            self.socket_of(x, flags, self.rfd)
            return rec
        if kind in ("pipe", "fifo"):
            return self._pipe(x, st, link, rec, kind)
        if kind == "memfd":
            return self._memfd(x, st, link, rec)
        if kind == "eventfd":
            raw = procfs.read_bytes(os.getpid(), "fdinfo", str(x))
            (count,) = fdobjs.fdinfo_lines(raw, "eventfd-count:")
            (sem,) = fdobjs.fdinfo_lines(raw, "eventfd-semaphore:")
            rec.kind, rec.pos = "eventfd", 0
            rec.count = int(count["eventfd-count"], 16)
            rec.semaphore = sem["eventfd-semaphore"] == "1"
            return rec
        if kind is not None:
            raise self.refuse(f"a {kind} ({link})")
        if procfs.pid_path(link) is not None and procfs.on_procfs(st):
            raise self.refuse(f"a /proc file ({link})")
        if statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode):
            what = "file" if statmod.S_ISREG(st.st_mode) else "directory"
            if link.endswith(fd_kinds.DELETED) or not link.startswith("/"):
                raise self.refuse(f"a deleted or unreachable {what} ({link})")
            rec.kind = "file" if what == "file" else "dir"
            rec.file = file_ref(link, st)
            return rec
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if statmod.S_ISCHR(st.st_mode) and dev in fd_kinds.SIMPLE_CHR:
            rec.kind, rec.rdev = "chr", st.st_rdev
            return rec
        if link.startswith("anon_inode:"):
            raise self.refuse(f"an {link[11:]} ({link})")
        if statmod.S_ISCHR(st.st_mode):
            raise self.refuse(f"a character device {dev[0]}:{dev[1]} ({link})")
        raise self.refuse(f"an unsupported file type ({link})")

    def _pipe(self, x: int, st, link: str, rec: Fd, kind: str) -> Fd:
        rec.kind, rec.obj_id, rec.pos = "pipe", st.st_ino, 0
        if (st.st_dev, st.st_ino) in self.held():
            return rec  # the dump holds the pipe: opened again through its restored fd
        if kind == "fifo":
            raise self.refuse(f"a FIFO that no dumped process holds ({link})")
        others = fdobjs.holders(st.st_dev, st.st_ino, link, {os.getpid(), *self.pids})
        if others:
            raise self.refuse(f"a pipe also open in process {others[0]}, outside the dump")
        if st.st_ino in self.run.content:
            return rec
        self.run.content.add(st.st_ino)
        if rec.flags & abi.O_ACCMODE != abi.O_WRONLY:
            reader = os.dup(x)
        else:  # only a writer in flight: read through a reader of ckpt's own
            reader = os.open(
                procfs.fd_path(os.getpid(), x), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        try:
            rec.pipe_size = fdobjs.pipe_size(reader)
            rec.data = fdobjs.pipe_peek(reader)
        finally:
            os.close(reader)
        if rec.data and rec.flags & abi.O_DIRECT:
            raise self.refuse(f"a packet-mode (O_DIRECT) pipe with buffered data ({link})")
        self.charge("pipe", len(rec.data))
        return rec

    def _memfd(self, x: int, st, link: str, rec: Fd) -> Fd:
        rec.kind, rec.obj_id = "memfd", st.st_ino
        if st.st_blksize > abi.PAGE_SIZE:
            raise self.refuse(f"a hugetlbfs memfd ({link})")
        held = (st.st_dev, st.st_ino) in self.held() or st.st_ino in self.mapped()
        if held or st.st_ino in self.run.content:
            return rec  # made by the dump's holder of it (or an earlier record here)
        self.run.content.add(st.st_ino)
        name = link[len(fd_kinds.MEMFD_PREFIX) : -len(fd_kinds.DELETED)]
        try:
            c = fdobjs.read_sparse(procfs.fd_path(os.getpid(), x), fd_kinds.MAX_FD_DATA)
        except OSError as exc:
            raise self.refuse(f"a memfd ({name}) ckpt cannot read: {exc.strerror}") from exc
        self.charge("memfd", sum(len(d) for _, d in c.extents))
        rec.memfd = MemfdState(name=name, size=c.size, mode=c.mode, seals=c.seals,
                               extents=c.extents)  # fmt: skip
        return rec


def link_slots(procs: list[ProcessImage], run: RunState) -> None:
    """Each "peer" record of an in-flight table names its holder by slot (the capture
    knew only its PID)."""
    slot = {p.pid: i for i, p in enumerate(procs)}
    refs, run.refs = run.refs, []
    for rec, pid in refs:
        if pid not in slot:
            raise DumpError(
                f"a file in flight is held by process {pid}, which is not in the dump",
                pid=procs[0].pid,
            )
        rec.peer_slot = slot[pid]
