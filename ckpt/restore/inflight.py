"""Files in flight in unix sockets (SCM_RIGHTS) sent again, once every fd of the tree
exists (capture/inflight.py says what the image holds).

restore/sockets.py builds a process's sockets as before, but a group whose queues carry
files in flight leaves its queued data and what comes after it (options, buffer sizes,
shutdown, peek offset, flags) for later (`defer`); a unix socket only a message in flight
holds is built with its group at a spare fd and left there (`socket_made`). Once the last
member of the restore has its fds (`member_done`, from restore/rebuild.py state_files,
before its file locks), each deferred group, in slot order:

- gets ckpt's own fd of every file its queues carry. A "peer" is that member's restored
  fd (pidfd_getfd: the same open file description, so the offset is shared again); a
  "socket" the socket built for it. Every other file is made again in the restorer of the
  member done last (it has not changed its root yet), taken into ckpt with pidfd_getfd
  and closed there at once: a file, directory or device reopened by path and checked as
  restore/fds.py does; a pipe or memfd a member holds opened again through /proc of that
  member's fd (a description of its own, as in flight); one no member holds made again
  (pipe2 + its bytes and capacity, memfd_create + content and seals), each of its
  descriptions the made one or one opened again through /proc; an eventfd with its count;
- sends its queues again from the sending ends, in order, each message with its files
  (SCM_RIGHTS of ckpt's fds: what the receiver gets are the same files) and credentials
  (SCM_CREDENTIALS, the sender's PID as restored), then finishes its sockets.

Then ckpt's fds are closed (the files live on in the messages) and so are the spare fds
of the sockets in flight: nothing holds them but their messages, as at the dump.
"""

from __future__ import annotations

import contextlib
import os
import stat as statmod
import struct
from collections.abc import Callable

from ..errors import RestoreError
from ..kernel import abi, fdobjs, procfs, syscalls
from ..kernel.pidfd import pidfd_getfd, pidfd_open
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, ProcessImage, flying_socket
from . import hostfs

PIPE_KINDS = ("pipe", "pipe_end", "pipe_open", "fifo")


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


# restorer PID → the restore's InflightFiles while that restorer makes its fds
# (restore/sockets.py finds it there: restore/fds.py's signature stays as it is)
_serving: dict[int, InflightFiles] = {}


def serving(pid: int) -> InflightFiles | None:
    """The files in flight of the restore whose restorer `pid` is making its fds."""
    return _serving.get(pid)


class InflightFiles:
    """The restore's files in flight (one for the tree, or one per lone process).

    procs: every member, in slot order."""

    def __init__(self, procs: list[ProcessImage]):
        self.procs = procs
        self.pids: dict[int, int] = {}  # PID at the dump → restored (member_done)
        self.left = len(procs)
        # does the image hold files in flight at all? (else nothing here changes a thing)
        self.needed = any(
            flying_socket(f) or (f.socket is not None and f.socket.inflight)
            for p in procs
            for f in p.fds
        )
        self.waiting: list[Callable[[], None]] = []  # after_sending, until they are sent
        self.deferred: list = []  # restore/sockets.py _Sockets groups, in slot order
        # socket inode → (its maker's injector, restored PID, spare fd) of each socket in flight
        self.sockets: dict[int, tuple[Injector, int, int]] = {}

    def serve(self, pid: int) -> None:
        """Restorer `pid` makes its fds now (until member_done)."""
        _serving[pid] = self

    def defer(self, group) -> None:
        self.deferred.append(group)

    def socket_made(self, ino: int, inj: Injector, pid: int, fd: int) -> None:
        self.sockets[ino] = (inj, pid, fd)

    def member_done(self, inj: Injector, pid: int, pids: dict[int, int]) -> None:
        """A member (restored as `pid`, injected through `inj`) has its fds; after the
        last one, every deferred queue is sent (see the module's docstring), then what
        waited for that (after_sending). pids: PID at the dump → restored PID of every
        member and zombie (all forked before any fds are made)."""
        _serving.pop(pid, None)
        self.pids = pids
        self.left -= 1
        if self.left > 0 or not self.needed:
            return
        try:
            self._send(inj, pid)
        finally:
            for sinj, _, fd in self.sockets.values():  # only their messages hold them now
                with contextlib.suppress(OSError, RemoteError):
                    syscalls.close(sinj, fd)
            self.sockets.clear()
        self.needed = False
        waiting, self.waiting = self.waiting, []
        for fn in waiting:
            fn()

    def after_sending(self, fn: Callable[[], None]) -> None:
        """Run `fn` (a member's file locks) once the files in flight are sent, now if
        there are none or they are: the files made again are temporaries of a restorer,
        and closing one drops its process's POSIX locks on that file (and a member that
        shares its table shares its locks)."""
        if self.needed:
            self.waiting.append(fn)
        else:
            fn()

    def restored(self, slot: int) -> int:
        return self.pids.get(self.procs[slot].pid, -1)

    # -- the phase -----------------------------------------------------------------------

    def _send(self, inj: Injector, pid: int) -> None:
        maker = _Maker(self, inj, pid)
        try:
            for group in self.deferred:  # every table first: a pipe's ends may be in two
                for f in group.fds:
                    for e in f.socket.inflight:
                        maker.want(f, e)
            maker.make()
            for group in self.deferred:
                files = {
                    f.socket.ino: [maker.fd_of(f, e) for e in f.socket.inflight]
                    for f in group.fds
                    if f.socket.inflight
                }
                group.flush(files)
        finally:
            maker.close()
            for group in self.deferred:  # (flush closes each; one it never reached too)
                group.close()
            self.deferred.clear()


class _Maker:
    """ckpt's fd of each file in flight, made in restorer `inj` (pid) when no member holds
    it: taken with pidfd_getfd and closed in the restorer at once."""

    def __init__(self, files: InflightFiles, inj: Injector, pid: int):
        self.files, self.inj, self.pid = files, inj, pid
        self.mine: dict[tuple[int, int], int] = {}  # (socket inode, index) → ckpt's fd
        self.wanted: list[tuple[Fd, Fd]] = []  # (socket record, in-flight record)
        self._pidfds: dict[int, int] = {}

    def close(self) -> None:
        for fd in [*self.mine.values(), *self._pidfds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.mine.clear()
        self._pidfds.clear()

    def want(self, f: Fd, e: Fd) -> None:
        self.wanted.append((f, e))

    def fd_of(self, f: Fd, e: Fd) -> int:
        return self.mine[(f.socket.ino, e.fd)]

    def _getfd(self, pid: int, fd: int) -> int:
        if pid not in self._pidfds:
            self._pidfds[pid] = pidfd_open(pid)
        return pidfd_getfd(self._pidfds[pid], fd)

    def _take(self, tmp: int) -> int:
        """ckpt's copy of the restorer's temporary fd `tmp`, which is closed."""
        try:
            return self._getfd(self.pid, tmp)
        finally:
            syscalls.close(self.inj, tmp)

    def make(self) -> None:
        pipes: dict[int, list[tuple[Fd, Fd]]] = {}
        memfds: dict[int, list[tuple[Fd, Fd]]] = {}
        for f, e in self.wanted:
            key = (f.socket.ino, e.fd)
            what = (
                f"the {_KIND.get(e.kind, e.kind)} in flight in socket:[{f.socket.ino}] ({e.path})"
            )
            try:
                if e.kind == "peer":
                    who = self.files.restored(e.peer_slot)
                    self.mine[key] = self._getfd(who, e.peer_fd)
                elif e.kind == "socket":
                    made = self.files.sockets.get(e.obj_id)
                    if made is None:
                        raise RestoreError(f"{what}: the socket was not built")
                    self.mine[key] = self._getfd(made[1], made[2])
                elif e.kind == "pipe":
                    pipes.setdefault(e.obj_id, []).append((f, e))
                elif e.kind == "memfd":
                    memfds.setdefault(e.obj_id, []).append((f, e))
                elif e.kind == "eventfd":
                    self.mine[key] = self._eventfd(e)
                else:
                    self.mine[key] = self._by_path(e, what)
            except (OSError, RemoteError) as exc:
                raise RestoreError(f"cannot make {what} again: {_why(exc)}") from exc
        for obj, recs in pipes.items():
            try:
                self._pipe(obj, recs)
            except (OSError, RemoteError) as exc:
                raise RestoreError(f"cannot make the pipe in flight ({recs[0][1].path}) again: "
                                   f"{_why(exc)}") from exc  # fmt: skip
        for obj, recs in memfds.items():
            try:
                self._memfd(obj, recs)
            except (OSError, RemoteError) as exc:
                raise RestoreError(f"cannot make the memfd in flight ({recs[0][1].path}) "
                                   f"again: {_why(exc)}") from exc  # fmt: skip

    # -- by kind ---------------------------------------------------------------------------

    def _by_path(self, e: Fd, what: str) -> int:
        """A file, directory or stateless device: opened again by path (no symlink
        followed), checked on the fd as restore/fds.py checks the process's own, then
        its offset."""
        inj = self.inj
        inj.reset_data()
        flags = e.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)
        if e.kind == "chr":
            tmp = hostfs.open_checked(inj, e.path, flags, what, fmt=statmod.S_IFCHR, rdev=e.rdev)
        elif e.kind == "dir":
            tmp = hostfs.open_checked(inj, e.path, flags, what, ref=e.file, strict=False,
                                      fmt=statmod.S_IFDIR)  # fmt: skip
        else:
            tmp = hostfs.open_checked(inj, e.path, flags, what, ref=e.file,
                                      strict=must_be_unchanged(e), fmt=statmod.S_IFREG)  # fmt: skip
        try:
            if e.kind in ("file", "dir") and not e.flags & abi.O_PATH:
                syscalls.lseek(inj, tmp, e.pos, 0)
        except BaseException:
            syscalls.close(inj, tmp)
            raise
        return self._take(tmp)

    def _eventfd(self, e: Fd) -> int:
        inj = self.inj
        inj.reset_data()
        flags = (abi.EFD_SEMAPHORE if e.semaphore else 0) | (e.flags & abi.O_NONBLOCK)
        tmp = syscalls.eventfd2(inj, 0, flags)
        if e.count:
            syscalls.write(inj, tmp, inj.put(struct.pack("<Q", e.count)), 8)
        return self._take(tmp)

    def _reopen(self, path: str, e: Fd) -> int:
        """Another open file description of a pipe or memfd, through the /proc link `path`
        (O_DIRECT, a pipe's packet mode, set after: open refuses it), at its offset."""
        inj = self.inj
        inj.reset_data()
        flags = e.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC | abi.O_DIRECT)
        tmp = syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(path), flags, 0)
        try:
            if e.flags & abi.O_DIRECT:
                syscalls.fcntl(inj, tmp, abi.F_SETFL, abi.O_DIRECT | (e.flags & abi.O_NONBLOCK))
            if e.kind == "memfd" and not e.flags & abi.O_PATH:
                syscalls.lseek(inj, tmp, e.pos, 0)
        except BaseException:
            syscalls.close(inj, tmp)
            raise
        return self._take(tmp)

    def _held(self, obj: int, kinds) -> str | None:
        """/proc path of a restored fd (or, for a memfd, a mapping) of object `obj`."""
        for slot, p in enumerate(self.files.procs):
            pid = self.files.restored(slot)
            for f in p.fds:
                if f.obj_id == obj and f.kind in kinds and f.fd >= 0 and pid > 0:
                    return procfs.in_target(pid, "fd", f.fd)
            if "memfd" in kinds and pid > 0:
                for f in p.fds:
                    if f.obj_id == obj and f.memfd is not None and f.memfd.maps:
                        v = next((v for v in p.vmas if v.start == f.memfd.maps[0]), None)
                        if v is not None:
                            return procfs.in_target(pid, "map_files", f"{v.start:x}-{v.end:x}")
        return None

    def _pipe(self, obj: int, recs: list[tuple[Fd, Fd]]) -> None:
        via = self._held(obj, PIPE_KINDS)
        if via is not None:  # the pipe a member holds: each description opened again
            for f, e in recs:
                self.mine[(f.socket.ino, e.fd)] = self._reopen(via, e)
            return
        inj = self.inj
        inj.reset_data()
        first = next((e for _, e in recs if e.data or e.pipe_size), recs[0][1])
        packet = any(e.flags & abi.O_DIRECT for _, e in recs)
        buf = inj.alloc(8)
        syscalls.pipe2(inj, buf, abi.O_DIRECT if packet else 0)
        ends = list(struct.unpack("<ii", inj.read(buf, 8)))  # read end, write end
        try:
            if first.pipe_size:
                syscalls.fcntl(inj, ends[0], abi.F_SETPIPE_SZ, first.pipe_size)
            if first.data:
                w = self._getfd(self.pid, ends[1])
                try:
                    fdobjs.pipe_fill(w, first.data)
                finally:
                    os.close(w)
            via = procfs.in_target("self", "fd", ends[0])
            free = {abi.O_RDONLY: 0, abi.O_WRONLY: 1}
            for f, e in recs:
                mode = e.flags & abi.O_ACCMODE
                key = (f.socket.ino, e.fd)
                if mode in free and not e.flags & abi.O_LARGEFILE:  # a pipe2 end
                    end = ends[free.pop(mode)]
                    if e.flags & abi.O_NONBLOCK:
                        syscalls.fcntl(inj, end, abi.F_SETFL,
                                       abi.O_NONBLOCK | (e.flags & abi.O_DIRECT))  # fmt: skip
                    self.mine[key] = self._getfd(self.pid, end)
                else:
                    self.mine[key] = self._reopen(via, e)
        finally:
            for end in ends:
                syscalls.close(inj, end)

    def _memfd(self, obj: int, recs: list[tuple[Fd, Fd]]) -> None:
        via = self._held(obj, ("memfd",))
        if via is not None:  # a memfd a member holds (fd or mapping): opened again
            for f, e in recs:
                self.mine[(f.socket.ino, e.fd)] = self._reopen(via, e)
            return
        from .fds import SETFL_KEPT, _memfd_create

        first = next((e for _, e in recs if e.memfd is not None), None)
        if first is None:
            raise RestoreError("its content is not in the image")
        m = first.memfd
        inj = self.inj
        inj.reset_data()
        tmp = _memfd_create(inj, m.name, m.mode)
        try:
            content = fdobjs.FileContent(size=m.size, mode=m.mode, seals=0, extents=m.extents)
            fdobjs.write_sparse(procfs.fd_path(self.pid, tmp), content)
            if m.seals:
                syscalls.fcntl(inj, tmp, abi.F_ADD_SEALS, m.seals)
            via = procfs.in_target("self", "fd", tmp)
            created = False  # memfd_create's own description goes to its first O_RDWR one
            for f, e in recs:
                key = (f.socket.ino, e.fd)
                if not created and e.flags & (abi.O_ACCMODE | abi.O_PATH) == abi.O_RDWR:
                    created = True
                    if e.flags & SETFL_KEPT:
                        syscalls.fcntl(inj, tmp, abi.F_SETFL, e.flags & SETFL_KEPT)
                    syscalls.lseek(inj, tmp, e.pos, 0)
                    self.mine[key] = self._getfd(self.pid, tmp)
                else:
                    self.mine[key] = self._reopen(via, e)
        finally:
            syscalls.close(inj, tmp)


_KIND = {"dir": "directory", "chr": "device", "file": "file"}


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def must_be_unchanged(e: Fd) -> bool:
    """As restore/written.py must_be_unchanged for the process's own fds: a file in flight
    that is read, or written at its offset (its content is not kept), must be as dumped;
    an O_APPEND writer (a log) only the same file; a directory only the same one."""
    if e.kind != "file":
        return False
    if e.flags & abi.O_ACCMODE != abi.O_WRONLY:
        return True
    return not e.flags & (abi.O_APPEND | abi.O_PATH)
