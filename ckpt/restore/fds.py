"""Re-create a process's file descriptors inside the restorer, by injected syscalls.

Runs after memory and mm are in place and before signals and credentials (so
the restorer is still root and may open anything the dump could read). Bulk
data (pipe buffers, memfd content) and inotify watches go in from ckpt's side,
through a pidfd_getfd copy of the restorer's fd or /proc/PID/fd/N: the scratch
area is small and both reach the same kernel object.

Order:
  create_memfds  (before map_vmas) memfd objects, at "holder" fds above every fd
                 of the image, with their content — mappings need them
  restore_fds    close the rest; every fd in number order (each kind creates its
                 object at the lowest free number, then dup3 to its own); dups;
                 epoll registrations (keyed by the target's fd numbers, so last);
                 memfd seals; close the holders
"""

from __future__ import annotations

import os
import stat as statmod
import struct

from ..errors import FileChanged, ImageCorrupt, RestoreError
from ..kernel import abi, fdobjs, procfs, syscalls
from ..kernel.pidfd import PIDFD_THREAD, dead_pidfd, pidfd_getfd, pidfd_of_same, pidfd_open
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, ProcessImage
from . import hostfs, written
from .checks import outside_pidfd_gone
from .sockets import restore_socket_end, restore_sockets
from .tty import Ptys, restore_ctty, restore_ptmx, restore_pts, restore_tty
from .unlinked import UnlinkedFiles, restore_unlinked

MAX_WD_TRIES = 1 << 20


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- memfd objects


def _top(proc: ProcessImage) -> int:
    return max((f.fd for f in getattr(proc, "fds", ())), default=-1) + 1


def memfd_holders(proc: ProcessImage, base: int = -1) -> dict[int, int]:
    """memfd object id → the restorer fd holding it until restore_fds is done. base:
    the first holder number (-1: right above the image's fds); a member sharing an
    earlier member's fd table has its own range above that one's (restore/tree.py)."""
    fds = getattr(proc, "fds", ())  # (a staged restore maps layouts that have no fds)
    objs = [f.obj_id for f in fds if f.kind == "memfd" and f.memfd is not None]
    first = _top(proc) if base < 0 else base
    return {obj: first + i for i, obj in enumerate(objs)}


def memfd_fd_for(proc: ProcessImage, start: int, base: int = -1) -> int:
    """The holder fd of the memfd that the VMA starting at `start` maps."""
    holders = memfd_holders(proc, base)
    for f in getattr(proc, "fds", ()):
        if f.memfd is not None and start in f.memfd.maps:
            return holders[f.obj_id]
    raise RestoreError(f"the image has no memfd for the mapping at {start:#x}")


def create_memfds(
    inj: Injector,
    proc: ProcessImage,
    shared: dict[int, tuple[int, int]] | None = None,
    base: int = -1,
) -> None:
    """Pre-pass (start of map_vmas): every memfd object, filled, at its holder fd.

    A holder number may hold a leftover fd of the restorer: dup3 replaces it
    (restore_fds closes every fd but the holders anyway). shared (a process tree):
    obj_id → (pid, holder fd) of the memfds made so far; a memfd an earlier member
    made is taken from there (pidfd_getfd), so the members share it again. base:
    the first holder number (memfd_holders)."""
    holders = memfd_holders(proc, base)
    for f in getattr(proc, "fds", ()):
        if f.kind != "memfd" or f.memfd is None:
            continue
        m = f.memfd
        holder = holders[f.obj_id]
        inj.reset_data()
        if m.shared_from >= 0:
            got = (shared or {}).get(f.obj_id)
            if got is None:
                raise RestoreError(f"memfd {m.name}: the tree member that makes it is missing")
            try:
                _take_fd(inj, got[0], got[1], holder, cloexec=True)
            except OSError as exc:
                raise RestoreError(f"cannot share memfd {m.name}: {exc.strerror}") from exc
            continue
        if shared is not None:
            shared[f.obj_id] = (inj.tracee.pid, holder)
        try:
            tmp = _memfd_create(inj, m.name, m.mode)
            _place(inj, tmp, holder, True)
            content = fdobjs.FileContent(size=m.size, mode=m.mode, seals=0, extents=m.extents)
            fdobjs.write_sparse(procfs.fd_path(inj.tracee.pid, holder), content)
            if m.seals & EARLY_SEALS:
                syscalls.fcntl(inj, holder, abi.F_ADD_SEALS, m.seals & EARLY_SEALS)
        except OSError as exc:
            raise RestoreError(f"cannot re-create memfd {m.name}: {exc.strerror}") from exc


# Seals put on as soon as the content is in, before anything maps the memfd: a shared
# mapping of a write-sealed memfd is then made as the process made it, without
# VM_MAYWRITE (and the seal could not be added once a mapping may write). The rest
# (F_SEAL_SEAL, F_SEAL_FUTURE_WRITE, which a writable mapping made before it survives)
# comes last, in restore_fds.
EARLY_SEALS = abi.F_SEAL_SHRINK | abi.F_SEAL_GROW | abi.F_SEAL_WRITE | abi.F_SEAL_EXEC


def _memfd_create(inj: Injector, name: str, mode: int) -> int:
    """memfd_create, executable when its mode says so: with vm.memfd_noexec = 1 a memfd
    made without MFD_EXEC is sealed non-executable (F_SEAL_EXEC, mode 0666), and its
    old mode could not be set. A kernel before 6.3 knows no MFD_EXEC (EINVAL): every
    memfd is executable there (any other failure comes again without it)."""
    if mode & 0o111:
        try:
            return syscalls.memfd_create(inj, inj.cstr(name), abi.MFD_ALLOW_SEALING | abi.MFD_EXEC)
        except RemoteError:
            pass
    return syscalls.memfd_create(inj, inj.cstr(name), abi.MFD_ALLOW_SEALING)


# ---------------------------------------------------------------- all fds


class _Ctx:
    def __init__(
        self,
        inj: Injector,
        proc: ProcessImage,
        peers: dict[int, int] | None = None,
        parked: dict[tuple[int, int], tuple[int, int]] | None = None,
        terminal=None,
        externals: dict[int, int] | None = None,
        pids: dict[int, int] | None = None,
    ):
        self.inj = inj
        # the image's processes (tree, zombies): PID at the dump → PID restored (pidfds)
        self.pids = pids if pids else {proc.pid: inj.tracee.pid}
        self.terminal = terminal  # restore --shell-job: where terminal fds go (restore/tty.py)
        # fds 0-2 that led outside the dump → the fd of this ckpt they get (default: the same)
        self.externals = externals or {}
        self.proc = proc
        self.peers = peers or {}  # tree slot → PID of that restored process
        # tree restore: pipe ends kept for later members, (obj_id, mode) → (pid, fd)
        self.parked = parked
        self.holders = memfd_holders(proc)
        self.made_here = _first_rw_memfds(proc)  # memfd → its fd with memfd_create's description
        self.spare = _top(proc) + len(self.holders) + 1  # temporaries live from here up
        self.by_obj: dict[int, list[Fd]] = {}
        for f in proc.fds:
            if f.obj_id and f.fd >= 0:
                self.by_obj.setdefault(f.obj_id, []).append(f)
        self.done: set[int] = set()
        self._pidfd = -1

    def copy(self, fd: int) -> int:
        """ckpt's duplicate of the restorer's fd (close it)."""
        if self._pidfd < 0:
            self._pidfd = pidfd_open(self.inj.tracee.pid)
        return pidfd_getfd(self._pidfd, fd)

    def spare_fd(self, fd: int) -> int:
        """Move a fresh fd out of the way of the image's fd numbers."""
        moved = syscalls.fcntl(self.inj, fd, abi.F_DUPFD, self.spare)
        syscalls.close(self.inj, fd)
        return moved

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _place(inj: Injector, tmp: int, fd: int, cloexec: bool) -> None:
    if tmp != fd:
        syscalls.dup3(inj, tmp, fd, abi.O_CLOEXEC if cloexec else 0)
        syscalls.close(inj, tmp)
    elif cloexec:
        syscalls.fcntl(inj, fd, abi.F_SETFD, abi.FD_CLOEXEC)


def restore_fds(
    inj: Injector,
    proc: ProcessImage,
    peers: dict[int, int] | None = None,
    parked: dict[tuple[int, int], tuple[int, int]] | None = None,
    terminal=None,
    externals: dict[int, int] | None = None,
    pids: dict[int, int] | None = None,
    unlinked: UnlinkedFiles | None = None,
    ptys: Ptys | None = None,
) -> None:
    """peers: for a process tree, the PIDs of the processes restored before this one;
    parked: the tree's pipe ends kept for a later member (the caller closes them
    all once every member has its fds); terminal: restore/tty.Terminal (--shell-job);
    externals: fd that led outside the dump → the fd of this ckpt it becomes;
    pids: every process of the image (tree members, zombies) → its restored PID, all
    forked by now (pidfds name them); unlinked: the tree's unlinked files
    (restore/unlinked.py);
    ptys: the tree's pty pairs (restore/tty.py; None: this process's own, locked and let
    go at the end)."""
    ctx = _Ctx(inj, proc, peers, parked, terminal, externals, pids)
    ctx.unlinked = unlinked if unlinked is not None else UnlinkedFiles([proc])
    ctx.ptys = ptys if ptys is not None else Ptys([proc])
    top, n = _top(proc), len(ctx.holders)
    if top > 0:
        syscalls.close_range(inj, 0, top - 1, 0)
    syscalls.close_range(inj, top + n, 0xFFFFFFFF, 0)
    try:
        for fd in sorted(proc.fds, key=lambda f: f.fd):
            if fd.fd < 0 or fd.kind == "dup" or fd.fd in ctx.done:
                continue
            inj.reset_data()
            make = KINDS.get(fd.kind)
            if make is None:
                raise RestoreError(f"fd {fd.fd} is a {fd.kind}, which this ckpt cannot restore")
            try:
                make(ctx, fd)
            except RemoteError as exc:
                raise RestoreError(
                    f"cannot restore fd {fd.fd} ({fd.kind} {fd.path}): {exc.strerror}"
                ) from exc
            ctx.done.add(fd.fd)
        for fd in proc.fds:
            if fd.kind == "dup":  # shares the open file description of an fd restored before
                syscalls.dup3(inj, fd.dup_of, fd.fd, abi.O_CLOEXEC if fd.cloexec else 0)
        for fd in proc.fds:
            # on a "peer" (an epoll taken from an earlier member): the registrations of
            # files only this member holds (capture/tree.py _link_epolls)
            if fd.kind in ("epoll", "peer") and fd.epoll:
                _epoll_entries(ctx, fd)
        for fd in proc.fds:
            if fd.memfd is not None and fd.memfd.seals:
                syscalls.fcntl(inj, ctx.holders[fd.obj_id], abi.F_ADD_SEALS, fd.memfd.seals)
        if n:
            syscalls.close_range(inj, top, top + n - 1, 0)
        if ptys is None:
            ctx.ptys.finish()
    finally:
        ctx.close()
        if ptys is None:
            ctx.ptys.close()


# ---------------------------------------------------------------- shared fd tables


def table_holder_bases(procs: list[ProcessImage]) -> dict[int, int]:
    """slot → first memfd holder number of each member that shares an earlier member's
    fd table (clone(CLONE_FILES)): above the holders of the table's first member and
    of the members sharing it before, so that no holder replaces another's."""
    out: dict[int, int] = {}
    free: dict[int, int] = {}  # the table's first member → its next free holder number
    for i, p in enumerate(procs):
        head = p.files_of
        if head < 0:
            continue
        if head not in free:
            free[head] = _top(procs[head]) + len(memfd_holders(procs[head]))
        out[i] = free[head]
        free[head] += len(memfd_holders(p, out[i]))
    return out


def close_table_holders(inj: Injector, proc: ProcessImage, base: int) -> None:
    """A member sharing an earlier member's fd table restores no fds of its own (that
    member's restore_fds makes them, in the one table). Once every member's memory is
    built, it seals the memfds it made (only it mapped them) and closes its holders,
    before that member's restore_fds closes everything that is not an fd of the image."""
    holders = memfd_holders(proc, base)
    for f in proc.fds:
        if f.memfd is not None and f.memfd.seals:
            syscalls.fcntl(inj, holders[f.obj_id], abi.F_ADD_SEALS, f.memfd.seals)
    if holders:
        syscalls.close_range(inj, base, base + len(holders) - 1, 0)


# ---------------------------------------------------------------- SIGIO ownership


def _owned(f: Fd) -> bool:
    return (
        f.fd >= 0
        and f.kind not in ("dup", "peer")
        and bool(f.owner or f.sigio or f.flags & abi.O_ASYNC)
    )


def check_owners(procs: list[ProcessImage], ids: set[int], new_pid: bool) -> None:
    """Before anything is built: with --new-pid, every SIGIO owner must be a process,
    thread or zombie of the image (mapped to its new PID) or the process's own group;
    any other number would name whoever has it on this host now."""
    if not new_pid:
        return
    for p in procs:
        for f in p.fds:
            if not (_owned(f) and f.owner) or _own_target(p, f, ids):
                continue
            what = ("thread", "process", "process group")[f.owner[0]]
            raise RestoreError(
                f"process {p.pid}: fd {f.fd} sends its SIGIO to {what} {f.owner[1]}, outside "
                "the dumped tree: with --new-pid it cannot be mapped (restore without it)"
            )


def _own_target(p: ProcessImage, f: Fd, ids: set[int]) -> bool:
    return f.owner[1] in ids or (f.owner[0] == abi.F_OWNER_PGRP and f.owner[1] == p.pgid)


def restore_owners(inj: Injector, proc: ProcessImage, pids: dict[int, int], pgid: int) -> None:
    """Who gets each description's SIGIO/SIGURG (F_SETOWN_EX), the signal (F_SETSIG) and
    O_ASYNC, once every process and thread of the tree exists (an owner must, or the
    kernel refuses it) and the process has its own credentials (the kernel keeps the
    setter's uid and euid to check whether it may signal the owner).

    pids: PID/TID at the dump → restored, for the tree's processes, threads and zombies;
    an owner outside them keeps its number (check_owners refused that with --new-pid),
    and the process's own group at the dump is the group it is in now (`pgid`)."""
    for f in proc.fds:
        if not _owned(f):
            continue
        inj.reset_data()
        try:
            if f.owner:
                kind, who = f.owner
                now = pids.get(who, who)
                if kind == abi.F_OWNER_PGRP and who == proc.pgid and who not in pids:
                    now = pgid
                owner = inj.put(struct.pack("<ii", kind, now))
                syscalls.fcntl(inj, f.fd, abi.F_SETOWN_EX, owner)
            if f.sigio:
                syscalls.fcntl(inj, f.fd, abi.F_SETSIG, f.sigio)
            if f.flags & abi.O_ASYNC:
                # open() and F_SETFL of a pipe end take the flag without registering the
                # fd for SIGIO (->fasync): clear it, then set it, so that F_SETFL does
                cur = syscalls.fcntl(inj, f.fd, abi.F_GETFL)
                if cur & abi.O_ASYNC:
                    syscalls.fcntl(inj, f.fd, abi.F_SETFL, cur & ~abi.O_ASYNC)
                syscalls.fcntl(inj, f.fd, abi.F_SETFL, cur | abi.O_ASYNC)
        except RemoteError as exc:
            who = f" (owner {f.owner[1]})" if f.owner else ""
            raise RestoreError(
                f"process {proc.pid}: cannot restore the SIGIO owner or signal of fd {f.fd}"
                f"{who}: {exc.strerror}"
            ) from exc


def _by_path(ctx: _Ctx, fd: Fd) -> None:
    """Regular files and character devices: reopen by path (no symlink followed), the
    file checked on the fd that was opened (restore/hostfs.py), then the offset."""
    inj = ctx.inj
    flags = fd.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)
    what = f"file of fd {fd.fd}"
    try:
        if fd.kind == "chr":
            tmp = hostfs.open_checked(inj, fd.path, flags, what, fmt=statmod.S_IFCHR, rdev=fd.rdev)
        elif fd.kind == "dir":  # the same directory (its entries may have changed since)
            what = f"directory of fd {fd.fd}"
            tmp = hostfs.open_checked(
                inj, fd.path, flags, what, ref=fd.file, strict=False, fmt=statmod.S_IFDIR
            )
        elif fd.content is not None:  # written at its offset: as at the dump (written.py)
            tmp = written.reopen(inj, ctx.proc, fd, flags, what)
        else:
            # a log (O_APPEND) only needs to be the same file; so does a tmpfs file the
            # image holds as a shared memory object (the restore has written it back)
            strict = written.must_be_unchanged(ctx.proc, fd) and not _shm_file(ctx.proc, fd.file)
            tmp = hostfs.open_checked(
                inj, fd.path, flags, what, ref=fd.file, strict=strict, fmt=statmod.S_IFREG
            )
    except RemoteError as exc:
        raise RestoreError(f"cannot reopen fd {fd.fd} ({fd.path}): {exc.strerror}") from exc
    _place(inj, tmp, fd.fd, fd.cloexec)
    if fd.kind in ("file", "dir") and not fd.flags & abi.O_PATH:  # O_PATH: no offset to set
        syscalls.lseek(inj, fd.fd, fd.pos, 0)  # a directory's: where readdir goes on


def _shm_file(proc: ProcessImage, ref) -> bool:
    """Is the file `ref` mapped as a shared memory object (its content in the image)?"""
    return ref is not None and any(
        v.shm >= 0 and v.file is not None and (v.file.dev, v.file.ino) == (ref.dev, ref.ino)
        for v in proc.vmas
    )


def _memfd(ctx: _Ctx, fd: Fd) -> None:
    """The open file description of a memfd fd.

    memfd_create's own description is not a writer of the inode (it is not opened, so
    it takes no write access), where a reopen through /proc for writing is: while one
    is open, execveat of the memfd fails with ETXTBSY. So the process's first read-write
    fd of a memfd it made gets the description create_memfds made (the holder); a fd
    inherited from an earlier tree member takes that member's description; any other
    is a new description through the holder (a reopen, as it was in the process)."""
    inj = ctx.inj
    if fd.peer_slot >= 0:  # the same description as an earlier tree member's fd
        _peer(ctx, fd)
        return
    holder = ctx.holders[fd.obj_id]
    if ctx.made_here.get(fd.obj_id) == fd.fd:
        syscalls.dup3(inj, holder, fd.fd, abi.O_CLOEXEC if fd.cloexec else 0)
        if fd.flags & SETFL_KEPT:
            syscalls.fcntl(inj, fd.fd, abi.F_SETFL, fd.flags & SETFL_KEPT)
    else:
        flags = fd.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)
        path = procfs.in_target("self", "fd", holder)
        tmp = syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(path), flags, 0)
        _place(inj, tmp, fd.fd, fd.cloexec)
    if not fd.flags & abi.O_PATH:  # an O_PATH fd has no offset (lseek: EBADF)
        syscalls.lseek(inj, fd.fd, fd.pos, 0)


# flags F_SETFL sets that an fd may have had (O_ASYNC: restore_owners, with its owner)
SETFL_KEPT = abi.O_APPEND | abi.O_NONBLOCK | abi.O_NOATIME


def _first_rw_memfds(proc: ProcessImage) -> dict[int, int]:
    """memfd object id → the fd that gets memfd_create's description: the lowest read-write
    fd of each memfd this process made (not inherited from a tree member, not O_PATH)."""
    made = {f.obj_id for f in proc.fds if f.memfd is not None and f.memfd.shared_from < 0}
    out: dict[int, int] = {}
    for f in sorted(proc.fds, key=lambda f: f.fd):
        if (
            f.kind == "memfd" and f.fd >= 0 and f.obj_id in made and f.obj_id not in out
            and f.peer_slot < 0 and f.flags & (abi.O_ACCMODE | abi.O_PATH) == abi.O_RDWR
        ):  # fmt: skip
            out[f.obj_id] = f.fd
    return out


def _fill_pipe(ctx: _Ctx, first: Fd, size_fd: int, write_fd: int) -> None:
    """The pipe's capacity (set through size_fd) and its buffered bytes (written in
    through ckpt's copy of write_fd), both recorded on the object's first fd."""
    if first.pipe_size:
        syscalls.fcntl(ctx.inj, size_fd, abi.F_SETPIPE_SZ, first.pipe_size)
    if first.data:
        copy = ctx.copy(write_fd)
        try:
            fdobjs.pipe_fill(copy, first.data)
        finally:
            os.close(copy)


def _pipe(ctx: _Ctx, fd: Fd) -> None:
    """pipe2, both ends placed (an end the process had closed is closed again),
    capacity, then the buffered bytes written in through ckpt's copy of the write end."""
    inj = ctx.inj
    recs = ctx.by_obj[fd.obj_id]
    first = recs[0]
    packet = any(r.flags & abi.O_DIRECT for r in recs)
    buf = inj.alloc(8)
    syscalls.pipe2(inj, buf, abi.O_DIRECT if packet else 0)
    r_tmp, w_tmp = struct.unpack("<ii", inj.read(buf, 8))
    r_tmp, w_tmp = ctx.spare_fd(r_tmp), ctx.spare_fd(w_tmp)
    _fill_pipe(ctx, first, r_tmp, w_tmp)
    ends: dict[int, Fd] = {}
    again: list[Fd] = []  # other descriptions: opened again through /proc (pipe_open, O_RDWR)
    for r in recs:
        mode = r.flags & abi.O_ACCMODE
        pipe2 = mode in (abi.O_RDONLY, abi.O_WRONLY) and not r.flags & abi.O_LARGEFILE
        if r.kind == "pipe" and pipe2 and mode not in ends:
            ends[mode] = r
        else:
            again.append(r)
    for r in again:  # while both ends are here (a pipe's open never waits for a partner)
        _reopen_pipe(ctx, procfs.in_target("self", "fd", r_tmp), r)
    for mode, tmp in ((abi.O_RDONLY, r_tmp), (abi.O_WRONLY, w_tmp)):
        rec = ends.get(mode)
        if rec is None and ctx.parked is not None:  # a later tree member may take it
            ctx.parked[(fd.obj_id, mode)] = (inj.tracee.pid, tmp)
            continue
        if rec is None:
            syscalls.close(inj, tmp)
            continue
        _place(inj, tmp, rec.fd, rec.cloexec)
        if rec.flags & abi.O_NONBLOCK:
            syscalls.fcntl(inj, rec.fd, abi.F_SETFL, abi.O_NONBLOCK | (rec.flags & abi.O_DIRECT))
        ctx.done.add(rec.fd)


def _fifo(ctx: _Ctx, fd: Fd) -> None:
    """Open the FIFO O_RDWR first (never blocks, keeps the buffer alive; no symlink
    followed, checked on the fd to be a FIFO, the same inode), put the data in, open
    each description with its own mode through that fd, then drop the helper."""
    inj = ctx.inj
    recs = ctx.by_obj[fd.obj_id]
    first = recs[0]
    what = f"FIFO of fd {first.fd}"
    tmp = hostfs.open_checked(
        inj,
        first.path,
        abi.O_RDWR | abi.O_NONBLOCK,
        what,
        fmt=statmod.S_IFIFO,
        ino=first.obj_id or None,
    )
    helper = ctx.spare_fd(tmp)
    _fill_pipe(ctx, first, helper, helper)
    inj.reset_data()
    path = inj.cstr(procfs.in_target("self", "fd", helper))  # this FIFO, whatever its name is now
    for rec in recs:
        flags = rec.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)
        _place(inj, syscalls.openat(inj, _u(abi.AT_FDCWD), path, flags, 0), rec.fd, rec.cloexec)
        ctx.done.add(rec.fd)
    if ctx.parked is not None:  # later tree members open their descriptions through it:
        ctx.parked[(fd.obj_id, PIPE_REF)] = (inj.tracee.pid, helper)  # it never blocks them
    else:
        syscalls.close(inj, helper)


# parked[(obj_id, PIPE_REF)]: a FIFO's O_RDWR helper, kept by its first holder in a tree
PIPE_REF = -3


def _reopen_pipe(ctx: _Ctx, path: str, rec: Fd) -> None:
    """Another open file description of a pipe or FIFO, through the /proc link `path` of
    one (O_DIRECT, packet mode, is set after: open refuses it)."""
    inj = ctx.inj
    inj.reset_data()
    flags = rec.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC | abi.O_DIRECT)
    _place(inj, syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(path), flags, 0), rec.fd,
           rec.cloexec)  # fmt: skip
    if rec.flags & abi.O_DIRECT:
        syscalls.fcntl(inj, rec.fd, abi.F_SETFL, abi.O_DIRECT | (rec.flags & abi.O_NONBLOCK))
    ctx.done.add(rec.fd)


def _pipe_open(ctx: _Ctx, fd: Fd) -> None:
    """A description of a pipe or FIFO an earlier tree member made: opened again through
    that member's fd of it (a FIFO: through the O_RDWR helper it kept, so that no open
    waits for a partner). One of this process's own pipe is made with it (_pipe)."""
    ref = (ctx.parked or {}).get((fd.obj_id, PIPE_REF))
    if ref is None:
        owner = ctx.peers.get(fd.peer_slot)
        if owner is None:
            raise RestoreError(f"fd {fd.fd}: process slot {fd.peer_slot} of the tree is missing")
        ref = (owner, fd.peer_fd)
    _reopen_pipe(ctx, procfs.in_target(ref[0], "fd", ref[1]), fd)


def _eventfd(ctx: _Ctx, fd: Fd) -> None:
    inj = ctx.inj
    flags = (abi.EFD_SEMAPHORE if fd.semaphore else 0) | (fd.flags & abi.O_NONBLOCK)
    tmp = syscalls.eventfd2(inj, 0, flags)
    if fd.count:
        syscalls.write(inj, tmp, inj.put(struct.pack("<Q", fd.count)), 8)
    _place(inj, tmp, fd.fd, fd.cloexec)


def _signalfd(ctx: _Ctx, fd: Fd) -> None:
    inj = ctx.inj
    mask = inj.put(struct.pack("<Q", fd.sigmask))
    tmp = syscalls.signalfd4(inj, _u(-1), mask, 8, fd.flags & abi.O_NONBLOCK)
    _place(inj, tmp, fd.fd, fd.cloexec)


def _timerfd(ctx: _Ctx, fd: Fd) -> None:
    """Relative re-arm with the remaining time; unread expirations via TFD_IOC_SET_TICKS."""
    inj = ctx.inj
    t = fd.timer
    tmp = syscalls.timerfd_create(inj, t.clockid, fd.flags & abi.O_NONBLOCK)
    # A periodic timer that expired and was not read shows 0 left (the kernel re-arms
    # it on read): its next expiry is one interval on.
    value = t.value_ns or t.interval_ns
    if value:
        its = struct.pack("<qqqq", t.interval_ns // 10**9, t.interval_ns % 10**9,
                          value // 10**9, value % 10**9)  # fmt: skip
        syscalls.timerfd_settime(inj, tmp, 0, inj.put(its), 0)
    if t.ticks:
        syscalls.ioctl(inj, tmp, abi.TFD_IOC_SET_TICKS, inj.put(struct.pack("<Q", t.ticks)))
    _place(inj, tmp, fd.fd, fd.cloexec)


def _epoll(ctx: _Ctx, fd: Fd) -> None:
    tmp = syscalls.epoll_create1(ctx.inj, 0)
    _place(ctx.inj, tmp, fd.fd, fd.cloexec)
    if fd.flags & abi.O_NONBLOCK:
        syscalls.fcntl(ctx.inj, fd.fd, abi.F_SETFL, abi.O_NONBLOCK)


def _epoll_entries(ctx: _Ctx, ep: Fd) -> None:
    """EPOLL_CTL_ADD per registration. One whose fd number no longer holds the file
    (closed or replaced after epoll_ctl) is added by putting the file at that number
    for the call, then putting back what the number holds."""
    inj = ctx.inj
    table = {f.fd: f for f in ctx.proc.fds if f.fd >= 0}
    for e in ep.epoll:
        inj.reset_data()
        ev = inj.put(struct.pack("<IQ", e.events, e.data))  # struct epoll_event is packed
        try:
            if e.src_fd in (e.tfd, -1):
                syscalls.epoll_ctl(inj, ep.fd, abi.EPOLL_CTL_ADD, e.tfd, ev)
            elif e.tfd not in table:
                syscalls.dup3(inj, e.src_fd, e.tfd, 0)
                syscalls.epoll_ctl(inj, ep.fd, abi.EPOLL_CTL_ADD, e.tfd, ev)
                syscalls.close(inj, e.tfd)
            else:
                saved = syscalls.fcntl(inj, e.tfd, abi.F_DUPFD, ctx.spare)
                syscalls.dup3(inj, e.src_fd, e.tfd, 0)
                syscalls.epoll_ctl(inj, ep.fd, abi.EPOLL_CTL_ADD, e.tfd, ev)
                syscalls.dup3(inj, saved, e.tfd, abi.O_CLOEXEC if table[e.tfd].cloexec else 0)
                syscalls.close(inj, saved)
        except RemoteError as exc:
            raise RestoreError(
                f"cannot re-register fd {e.tfd} in epoll fd {ep.fd}: {exc.strerror}"
            ) from exc


def _inotify(ctx: _Ctx, fd: Fd) -> None:
    """Watches are added from ckpt's copy. wds are allocated cyclically, so a watch is
    added and removed until it gets its old number (as CRIU does); the IN_IGNORED
    events that leaves behind are drained."""
    inj = ctx.inj
    tmp = syscalls.inotify_init1(inj, fd.flags & abi.O_NONBLOCK)
    _place(inj, tmp, fd.fd, fd.cloexec)
    if not fd.watches:
        return
    copy = ctx.copy(fd.fd)
    try:
        for w in sorted(fd.watches, key=lambda w: w.wd):
            # the watched inode through an O_PATH fd checked on itself: the watch goes on
            # exactly that inode, whatever its name leads to by the time it is added
            try:
                handle, st = fdobjs.open_watch_target(w.path)
            except OSError as exc:
                raise FileChanged(
                    f"{w.path} (inotify fd {fd.fd}) is gone or behind a symbolic link now: "
                    f"{exc.strerror}"
                ) from exc
            try:
                if (st.st_dev, st.st_ino) != (w.dev, w.ino):
                    raise FileChanged(f"{w.path} (inotify fd {fd.fd}) was replaced since the dump")
                _add_watch(fd, copy, w, handle, st)
            finally:
                os.close(handle)
        fdobjs.drain(copy)
    except OSError as exc:
        raise RestoreError(f"cannot restore inotify fd {fd.fd}: {exc}") from exc
    finally:
        os.close(copy)


def _add_watch(fd: Fd, copy: int, w, handle: int, st: os.stat_result) -> None:
    via = None if statmod.S_ISLNK(st.st_mode) else handle
    for _ in range(MAX_WD_TRIES):
        got = fdobjs.inotify_add(copy, w.path, w.mask, via=via)
        if got == w.wd:
            return
        fdobjs.inotify_rm(copy, got)
        if got > w.wd:
            raise RestoreError(f"inotify fd {fd.fd}: watch {w.wd} on {w.path} came back as {got}")
    raise RestoreError(f"inotify fd {fd.fd}: cannot get watch number {w.wd}")


def _peer(ctx: _Ctx, fd: Fd) -> None:
    """An open file description another process of the tree restored first:
    take it from there (pidfd_getfd, injected), so offset and flags stay shared."""
    owner = ctx.peers.get(fd.peer_slot)
    if owner is None:
        raise RestoreError(f"fd {fd.fd}: process slot {fd.peer_slot} of the tree is missing")
    _take(ctx, fd, owner, fd.peer_fd)


def _take(ctx: _Ctx, fd: Fd, owner: int, ofd: int) -> None:
    _take_fd(ctx.inj, owner, ofd, fd.fd, cloexec=fd.cloexec)


def _take_fd(inj: Injector, owner: int, ofd: int, at: int, *, cloexec: bool) -> None:
    """Put process owner's fd `ofd` (its open file description) at fd `at` here."""
    pidfd = syscalls.pidfd_open(inj, owner, 0)
    try:
        tmp = syscalls.pidfd_getfd(inj, pidfd, ofd, 0)
    finally:
        syscalls.close(inj, pidfd)
    if tmp == at:  # pidfd_getfd sets close-on-exec
        if not cloexec:
            syscalls.fcntl(inj, at, abi.F_SETFD, 0)
        return
    syscalls.dup3(inj, tmp, at, abi.O_CLOEXEC if cloexec else 0)
    syscalls.close(inj, tmp)


def _external(ctx: _Ctx, fd: Fd) -> None:
    """An fd 0-2 that led to a process outside the dump (a log pipe, journald's stream
    socket): the restored process gets an fd of the restoring ckpt instead — its own
    fd of that number unless `restore --inherit-fd` names another — so the shell
    redirect or systemd unit that runs the restore decides where the output goes."""
    mine = ctx.externals.get(fd.fd, fd.fd)
    try:
        os.fstat(mine)
    except OSError:
        raise RestoreError(
            f"fd {fd.fd} of process {ctx.proc.pid} led outside the dump ({fd.path}), and this "
            f"ckpt has no fd {mine} to give it: run the restore with fd {mine} open, or "
            f"give --inherit-fd {fd.fd}=FD|PATH"
        ) from None
    _take_fd(ctx.inj, os.getpid(), mine, fd.fd, cloexec=fd.cloexec)


def _pidfd(ctx: _Ctx, fd: Fd) -> None:
    """A pidfd of a process of the image is opened on its restored self (pidfd_open in
    the restorer, the mapped PID with --new-pid); one of a process outside it only if
    that process still runs with the same start time (ckpt opens it and passes it in);
    one of a process already reaped becomes a pidfd of another reaped process (they
    behave alike: Pid -1, readable, ESRCH). PIDFD_NONBLOCK and PIDFD_THREAD as they were."""
    inj, want = ctx.inj, fd.pidfd
    flags = fd.flags & (abi.O_NONBLOCK | PIDFD_THREAD)
    restored = ctx.pids.get(want.pid) if want.pid > 0 else None
    if restored is not None:
        tmp = syscalls.pidfd_open(inj, restored, flags)
        if tmp == fd.fd:  # pidfd_open sets close-on-exec
            syscalls.fcntl(inj, fd.fd, abi.F_SETFD, abi.FD_CLOEXEC if fd.cloexec else 0)
        else:
            _place(inj, tmp, fd.fd, fd.cloexec)
        return
    mine = dead_pidfd(flags) if want.pid < 0 else pidfd_of_same(want.pid, want.start, flags)
    if mine is None:
        raise RestoreError(outside_pidfd_gone(ctx.proc.pid, fd))
    try:
        _take_fd(inj, os.getpid(), mine, fd.fd, cloexec=fd.cloexec)
    finally:
        os.close(mine)


def _proc(ctx: _Ctx, fd: Fd) -> None:
    """A file or directory of /proc/PID of a process of the image: the same path of its
    restored PID (the mapped one with --new-pid), no symlink followed, its flags and
    offset (a seq_file's lseek reads up to it again; a directory's is where readdir
    goes on)."""
    inj = ctx.inj
    named = procfs.pid_path(fd.path)
    restored = ctx.pids.get(named[0]) if named is not None else None
    if restored is None:
        raise ImageCorrupt(f"fd {fd.fd} ({fd.path}): not a /proc file of a process of the image")
    pid, rest = named
    parts = rest.split("/") if rest else []
    if parts[:1] == ["task"] and len(parts) > 1 and parts[1] == str(pid):
        parts[1] = str(restored)  # the main thread's own directory
    path = procfs.in_target(restored, *parts)
    flags = fd.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)
    try:
        tmp = hostfs.open_resolved(inj, path, flags)
    except RemoteError as exc:
        raise RestoreError(
            f"process {ctx.proc.pid}: cannot open fd {fd.fd} ({fd.path}) again as {path}: "
            f"{exc.strerror}"
        ) from exc
    _place(inj, tmp, fd.fd, fd.cloexec)
    if fd.pos and not fd.flags & abi.O_PATH:
        syscalls.lseek(inj, fd.fd, fd.pos, 0)


def _pipe_end(ctx: _Ctx, fd: Fd) -> None:
    """This process's end of a pipe an earlier tree member created (and parked)."""
    got = (ctx.parked or {}).get((fd.obj_id, fd.flags & abi.O_ACCMODE))
    if got is None:
        raise RestoreError(f"fd {fd.fd}: the other end's process did not leave this pipe end")
    _take(ctx, fd, *got)
    if fd.flags & abi.O_NONBLOCK:
        syscalls.fcntl(ctx.inj, fd.fd, abi.F_SETFL, abi.O_NONBLOCK | (fd.flags & abi.O_DIRECT))


KINDS = {
    "pipe_end": _pipe_end,
    "peer": _peer,
    "external": _external,
    "file": _by_path,
    "dir": _by_path,
    "chr": _by_path,
    "memfd": _memfd,
    "pipe": _pipe,
    "fifo": _fifo,
    "eventfd": _eventfd,
    "signalfd": _signalfd,
    "timerfd": _timerfd,
    "epoll": _epoll,
    "inotify": _inotify,
    "socket": restore_sockets,  # restore/sockets.py: every socket at the first one
    "socket_end": restore_socket_end,  # a tree member's socket, rebuilt by an earlier one
    "tty": restore_tty,  # restore/tty.py: the terminal ckpt runs on (--shell-job)
    "ptmx": restore_ptmx,  # restore/tty.py: a pty pair made again, its master
    "pts": restore_pts,  # its slave (or /dev/tty, or an outside terminal: --reattach-tty)
    "ctty": restore_ctty,  # (fd -1: the session leader took it with its session)
    "pidfd": _pidfd,
    "unlinked": restore_unlinked,  # restore/unlinked.py: made again with O_TMPFILE
    "proc": _proc,
    "pipe_open": _pipe_open,
}
