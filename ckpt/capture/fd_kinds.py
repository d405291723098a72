"""Capture of fds that are kernel objects: pipes, FIFOs, eventfd, timerfd, signalfd,
epoll, inotify and memfd (capture/fds.py dispatches here).

Nothing here changes the target: pipe data is duplicated with tee(), memfd
content is read through ckpt's own open file description, everything else
comes from fdinfo. Checks that need every fd (both ends of a pipe, epoll
registrations, memfds only mappings hold) run in `finish()`.
"""

from __future__ import annotations

import os
import stat as statmod

from ..errors import NoSuchProcess, UnsupportedProcess
from ..kernel import abi, fdobjs, procfs
from ..kernel.pidfd import PIDFD_THREAD, pidfd_getfd, pidfd_open
from ..model import EpollEntry, Fd, InotifyWatch, MemfdState, PidfdState, TimerfdState

# The image state is one msgpack document (capped at 256 MiB when read): memfd
# content and pipe data together may take at most this much of it.
MAX_FD_DATA = 64 << 20


ANON_KINDS = {
    "anon_inode:[eventfd]": "eventfd",
    "anon_inode:[timerfd]": "timerfd",
    "anon_inode:[signalfd]": "signalfd",
    "anon_inode:[eventpoll]": "epoll",
    "anon_inode:inotify": "inotify",
    "anon_inode:[pidfd]": "pidfd",
}
MEMFD_PREFIX, DELETED = "/memfd:", " (deleted)"


def kind_of(target: str, st: os.stat_result) -> str | None:
    """The fd kind this module captures, or None."""
    if statmod.S_ISFIFO(st.st_mode):
        return "pipe" if target.startswith("pipe:[") else "fifo"
    if statmod.S_ISREG(st.st_mode) and target.startswith(MEMFD_PREFIX) and target.endswith(DELETED):
        return "memfd"
    return ANON_KINDS.get(target)


# character devices without state, reopened by path: /dev/null, zero, full, random, urandom
SIMPLE_CHR = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}


class FdScan:
    """State shared by the fds of one capture: a pidfd, the data budget, and objects."""

    def __init__(self, pid: int, tree: frozenset[int] = frozenset(), check_only: bool = False):
        self.pid = pid
        self.tree = tree  # the other processes dumped with this one (pipes may join them)
        # the preflight's pass over a running process (api/preflight.py): what changes
        # while it runs (the bytes in a pipe) is read at the freeze, not now
        self.check_only = check_only
        self._pidfd = -1
        self.budget = MAX_FD_DATA

    def getfd(self, fd: int) -> int:
        """ckpt's duplicate of the target's fd (same open file description); close it."""
        if self._pidfd < 0:
            self._pidfd = pidfd_open(self.pid)
        return pidfd_getfd(self._pidfd, fd)

    def refuse(
        self, fd: int, what: str, cls: type[UnsupportedProcess] = UnsupportedProcess
    ) -> UnsupportedProcess:
        return cls(f"fd {fd} {what}", pid=self.pid)

    def charge(self, fd: int, kind: str, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise self.refuse(
                fd,
                f"is a {kind} holding more data than ckpt keeps in an image's state "
                f"({MAX_FD_DATA >> 20} MiB for all memfds and pipes together)",
            )

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def capture(scan: FdScan, rec: Fd, kind: str, st: os.stat_result, raw: bytes) -> Fd:
    """Fill `rec` (fd, path, flags, cloexec, pos already set) for `kind`."""
    rec.kind = kind
    fd = rec.fd
    if kind in ("pipe", "fifo"):
        rec.obj_id = st.st_ino
        if kind == "fifo" and rec.path.endswith(DELETED) and not st.st_nlink:
            # no name left: nobody can open it but through /proc/PID/fd, like a pipe; it
            # comes back as one (same bytes, capacity, descriptions and their flags)
            rec.kind = "pipe"
            return rec
        if kind == "fifo" and (rec.path.endswith(DELETED) or not rec.path.startswith("/")):
            raise scan.refuse(fd, f"is a FIFO that was deleted or is unreachable ({rec.path})")
        return rec
    if kind == "pidfd":
        return _pidfd(scan, rec, raw)
    if kind == "memfd":
        if st.st_blksize > abi.PAGE_SIZE:
            raise scan.refuse(fd, f"is a hugetlbfs memfd ({rec.path}): not supported yet")
        rec.obj_id = st.st_ino
        return rec
    try:
        if kind == "eventfd":
            (info,) = fdobjs.fdinfo_lines(raw, "eventfd-count:")
            rec.count = int(info["eventfd-count"], 16)
            (sem,) = fdobjs.fdinfo_lines(raw, "eventfd-semaphore:")
            rec.semaphore = sem["eventfd-semaphore"] == "1"
        elif kind == "signalfd":
            (info,) = fdobjs.fdinfo_lines(raw, "sigmask:")
            rec.sigmask = int(info["sigmask"], 16)
        elif kind == "timerfd":
            rec.timer = _timerfd(raw)
        elif kind == "epoll":
            rec.epoll = [
                EpollEntry(tfd=int(e["tfd"]), events=int(e["events"], 16), data=int(e["data"], 16))
                for e in fdobjs.fdinfo_lines(raw, "tfd:")
            ]
        elif kind == "inotify":
            rec.watches = [_watch(scan, fd, w) for w in fdobjs.fdinfo_lines(raw, "inotify ")]
            _no_queued_events(scan, fd)
    except (KeyError, ValueError) as exc:
        raise scan.refuse(fd, f"({kind}): cannot parse its fdinfo ({exc})") from exc
    return rec


def _pidfd(scan: FdScan, rec: Fd, raw: bytes) -> Fd:
    """The process a pidfd names (fdinfo `Pid:`, -1 once it was reaped) and its start
    time: restore/fds.py gives a process of the image its restored self and reopens any
    other only if it still runs with that start time. A pidfd of a thread other than
    the leader (PIDFD_THREAD) of a process of the dump is refused: threads are made
    after the fds."""
    try:
        pid = int(procfs.parse_fdinfo(raw).extra["Pid"])
    except (KeyError, ValueError, procfs.ProcParseError) as exc:
        raise scan.refuse(rec.fd, f"(pidfd): cannot parse its fdinfo ({exc})") from exc
    start = 0
    if pid > 0:
        try:
            start = procfs.stat(pid).starttime
            tgid = int(procfs.status(pid).get("Tgid", pid))
        except NoSuchProcess:  # reaped while we looked: the pidfd names a dead process now
            pid, tgid = -1, -1
        if rec.flags & PIDFD_THREAD and tgid != pid and tgid in {scan.pid, *scan.tree}:
            raise scan.refuse(
                rec.fd,
                f"is a pidfd of thread {pid} of process {tgid} of the dump (PIDFD_THREAD on "
                "a thread other than the leader): not supported (threads are made after fds)",
            )
    rec.pidfd = PidfdState(pid=pid, start=start)
    return rec


def _timerfd(raw: bytes) -> TimerfdState:
    vals = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        key, _, value = line.partition(":")
        vals[key] = value.strip()
    return TimerfdState(
        clockid=int(vals["clockid"]),
        ticks=int(vals["ticks"]),
        settime_flags=int(vals["settime flags"], 8),
        value_ns=fdobjs.parse_pair(vals["it_value"]),
        interval_ns=fdobjs.parse_pair(vals["it_interval"]),
    )


def _watch(scan: FdScan, fd: int, w: dict[str, str]) -> InotifyWatch:
    wd = int(w["wd"], 16)
    sdev, ino = int(w["sdev"], 16), int(w["ino"], 16)
    handle = bytes.fromhex(w.get("f_handle", ""))
    path = fdobjs.handle_to_path(sdev, int(w.get("fhandle-type", "0"), 16), handle)
    dev = os.makedev(sdev >> 20, sdev & 0xFFFFF)
    if path is not None:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            path = None
        else:
            if (st.st_dev, st.st_ino) != (dev, ino):
                path = None
    if path is None:
        raise scan.refuse(
            fd,
            f"(inotify): the inode watched as wd {wd} (inode {ino}) has no path any more "
            "(deleted, or on a filesystem without file handles)",
        )
    return InotifyWatch(wd=wd, mask=int(w["mask"], 16), path=path, dev=dev, ino=ino)


def _no_queued_events(scan: FdScan, fd: int) -> None:
    copy = scan.getfd(fd)
    try:
        queued = fdobjs.fionread(copy)
    finally:
        os.close(copy)
    if queued:
        raise scan.refuse(
            fd, f"(inotify) has {queued} bytes of unread events (queued events are not saved)"
        )


# ---------------------------------------------------------------- cross-fd checks


STDIO = (0, 1, 2)


def external(rec: Fd, what: str) -> None:
    """An fd 0-2 leading outside the dump: nothing of it is kept but what it was; the
    restore connects it to an fd of the restoring ckpt (its own by default)."""
    rec.kind, rec.data, rec.pipe_size = "external", b"", 0
    rec.path = f"{rec.path}: {what}"


def finish(scan: FdScan, out: list[Fd], maps: list[procfs.Mapping]) -> None:
    """Checks and state that need all fds: pipes, epoll registrations, memfds; then
    the SIGIO owner and signal of every description."""
    by_fd = {f.fd: f for f in out}
    _pipes(scan, [f for f in out if f.kind in ("pipe", "fifo")])
    for f in out:
        if f.kind == "epoll":
            _epoll_sources(scan, f, by_fd)
    _memfds(scan, out, maps)
    _owners(scan, out)


def _owners(scan: FdScan, out: list[Fd]) -> None:
    """Who gets each open file description's SIGIO/SIGURG (F_GETOWN_EX) and which signal
    replaces SIGIO (F_GETSIG), read on ckpt's duplicate of the fd (the same description;
    nothing of it changes). A dup shares its description's; an owner that is gone gets
    nothing from the kernel, so it is not kept either."""
    for f in out:
        if f.fd < 0 or f.kind == "dup" or f.flags & abi.O_PATH:  # O_PATH: fcntl says EBADF
            continue
        copy = scan.getfd(f.fd)
        try:
            kind, pid, f.sigio = fdobjs.sigio_state(copy)
        finally:
            os.close(copy)
        if pid > 0 and fdobjs.owner_exists(kind, pid):
            f.owner = [kind, pid]
        if f.kind == "external" and (f.owner or f.sigio or f.flags & abi.O_ASYNC):
            raise scan.refuse(
                f.fd,
                f"leads outside the dump ({f.path}) and has a SIGIO owner or O_ASYNC: the "
                "restore gives it an fd of its own ckpt, whose owner it must not change",
            )


def _pipes(scan: FdScan, recs: list[Fd]) -> None:
    groups: dict[int, list[Fd]] = {}
    for r in recs:
        groups.setdefault(r.obj_id, []).append(r)
    for recs_of in groups.values():
        first = recs_of[0]
        kind = first.kind
        st = os.stat(procfs.fd_path(scan.pid, first.fd))
        link = os.readlink(procfs.fd_path(scan.pid, first.fd))
        mates = scan.tree  # a pipe or FIFO between processes of the dump: capture/tree.py
        others = fdobjs.holders(st.st_dev, st.st_ino, link, {scan.pid, os.getpid(), *mates})
        if others and kind == "pipe" and all(r.fd in STDIO for r in recs_of):
            # stdin/stdout/stderr to a process outside the dump (`cmd | tee log`, a
            # supervisor's log pipe): reconnected at restore (restore/fds.py _external)
            for r in recs_of:
                external(r, f"a pipe also open in process {others[0]}")
            continue
        if others:
            what = "pipe" if kind == "pipe" else f"FIFO ({first.path})"
            raise scan.refuse(
                first.fd,
                f"is a {what} also open in process {others[0]} (only fds 0-2 may lead to a "
                "process outside the dump, as pipes: they are reconnected at restore)",
            )
        if kind == "pipe":
            _reopened(recs_of)
        if scan.check_only:  # a writer may be filling it: a peek now could see it move
            continue
        readable = next((r for r in recs_of if r.flags & abi.O_ACCMODE != abi.O_WRONLY), None)
        if readable is not None:
            copy = scan.getfd(readable.fd)
        else:  # only writers here: peek through a reader of our own (a pipe's data can
            # still be read by whoever opens it again through /proc)
            copy = os.open(
                procfs.fd_path(scan.pid, first.fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
            )
        try:
            first.pipe_size = fdobjs.pipe_size(copy)
            first.data = fdobjs.pipe_peek(copy)
        finally:
            os.close(copy)
        if first.data and any(r.flags & abi.O_DIRECT for r in recs_of):
            raise scan.refuse(first.fd, "is a packet-mode (O_DIRECT) pipe with buffered data")
        scan.charge(first.fd, kind, len(first.data))


def pipe2_end(r: Fd) -> bool:
    """Could this pipe description be an end pipe2 made (read-only or write-only, not
    opened: open() sets O_LARGEFILE, pipe2 does not)?"""
    mode = r.flags & abi.O_ACCMODE
    return mode in (abi.O_RDONLY, abi.O_WRONLY) and not r.flags & abi.O_LARGEFILE


def _reopened(recs: list[Fd]) -> None:
    """The open file descriptions of one pipe in this process (fd order): the first, and
    the first read-only and write-only ones pipe2 made (open() sets O_LARGEFILE, pipe2
    does not), stay "pipe" (pipe2's two ends at restore); any other (a pipe opened again
    through /proc/PID/fd: a second reader or writer, O_RDWR; each description of a
    deleted FIFO) is a "pipe_open", opened again through /proc at restore."""
    claimed: set[int] = set()
    for i, r in enumerate(recs):
        mode = r.flags & abi.O_ACCMODE
        end = pipe2_end(r) and mode not in claimed
        if i == 0 or end:
            if end:
                claimed.add(mode)
            continue
        r.kind, r.peer_slot, r.peer_fd = "pipe_open", -1, recs[0].fd


def _epoll_sources(scan: FdScan, ep: Fd, by_fd: dict[int, Fd]) -> None:
    """Find, for each registration, an fd of the process holding the registered file."""
    seen: dict[int, int] = {}
    for e in ep.epoll:
        toff = seen.get(e.tfd, 0)
        seen[e.tfd] = toff + 1
        if e.tfd in by_fd and fdobjs.epoll_target_is(scan.pid, e.tfd, ep.fd, e.tfd, toff):
            e.src_fd = e.tfd
            continue
        src = next(
            (
                fd
                for fd in sorted(by_fd)
                if fd >= 0 and fdobjs.epoll_target_is(scan.pid, fd, ep.fd, e.tfd, toff)
            ),
            None,
        )
        # An epoll inherited across fork is one description whose registrations name the
        # fds of the process that added them: a child that closed one (redis' BGSAVE
        # child closes the listeners) still sees it. Another process of the dump holding
        # the file adds it again (capture/tree.py _link_epolls); nobody: refused.
        if src is None and any(
            epoll_source(p, scan.pid, ep.fd, e.tfd, toff) is not None for p in scan.tree
        ):
            src = EPOLL_ELSEWHERE
        if src is None:
            raise scan.refuse(
                ep.fd,
                f"(epoll): the file registered as fd {e.tfd} is no longer open in the process"
                f"{' or any other of the dump' if scan.tree else ''} (closed after "
                "registration, still held elsewhere)",
            )
        e.src_fd = src


# EpollEntry.src_fd while the tree is linked: the registered file is held by another
# process of the dump, not by this one (capture/tree.py _link_epolls resolves it)
EPOLL_ELSEWHERE = -2


def epoll_slots(ep: Fd):
    """Each registration of epoll record `ep` with its `toff` (its rank among the
    registrations of the same fd number: what kcmp(KCMP_EPOLL_TFD) takes)."""
    seen: dict[int, int] = {}
    for e in ep.epoll:
        toff = seen.get(e.tfd, 0)
        seen[e.tfd] = toff + 1
        yield e, toff


def epoll_source(
    pid: int, epid: int, efd: int, tfd: int, toff: int, fds: list[int] | None = None
) -> int | None:
    """An fd of process `pid` holding the file registered as (tfd, toff) in epoll `efd`
    of process `epid`: tfd itself when it still does, else the lowest; None if no fd
    of `pid` does. fds: pid's fd numbers (default: read from /proc)."""
    if fds is None:
        try:
            fds = procfs.fds(pid)
        except (OSError, NoSuchProcess):
            return None
    if tfd in fds and fdobjs.epoll_target_is(pid, tfd, efd, tfd, toff, epid):
        return tfd
    return next(
        (fd for fd in fds if fd >= 0 and fdobjs.epoll_target_is(pid, fd, efd, tfd, toff, epid)),
        None,
    )


def _memfds(scan: FdScan, out: list[Fd], maps: list[procfs.Mapping]) -> None:
    first: dict[int, Fd] = {}
    for f in out:
        if f.kind == "memfd" and f.obj_id not in first:
            first[f.obj_id] = f
            name = f.path[len(MEMFD_PREFIX) : -len(DELETED)]
            f.memfd = _memfd_state(scan, f.fd, name, procfs.fd_path(scan.pid, f.fd))
    for m in maps:
        if not (m.deleted and m.name.startswith(MEMFD_PREFIX) and m.inode):
            continue
        rec = first.get(m.inode)
        if rec is None:  # held only by mappings: a record without an fd number
            name = m.name[len(MEMFD_PREFIX) :]
            rec = Fd(fd=-1, kind="memfd", path=m.name + DELETED, flags=abi.O_RDWR, cloexec=True,
                     pos=0, obj_id=m.inode)  # fmt: skip
            where = procfs.map_file(scan.pid, m.start, m.end)
            rec.memfd = _memfd_state(scan, -1, name, where, m.start)
            first[m.inode] = rec
            out.append(rec)
        rec.memfd.maps.append(m.start)


def _memfd_state(scan: FdScan, fd: int, name: str, path: str, at: int = 0) -> MemfdState:
    try:
        c = fdobjs.read_sparse(path, scan.budget)
    except OSError as exc:
        who = f"fd {fd}" if fd >= 0 else f"the memfd mapped at {at:#x}"
        if exc.errno == 27:  # EFBIG
            raise UnsupportedProcess(
                f"{who} is a memfd ({name}) holding more than the {MAX_FD_DATA >> 20} MiB "
                "ckpt keeps for memfds and pipes in an image's state",
                pid=scan.pid,
            ) from exc
        raise UnsupportedProcess(f"{who}: cannot read memfd {name}: {exc.strerror}",
                                 pid=scan.pid) from exc  # fmt: skip
    scan.budget -= sum(len(d) for _, d in c.extents)
    return MemfdState(name=name, size=c.size, mode=c.mode, seals=c.seals, extents=c.extents)
