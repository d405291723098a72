"""Unlinked files (kind "unlinked"; capture/unlinked.py): each made again once, for the
whole tree, by whichever process needs it first — a mapping (rebuild.map_vmas, before
any fd) or an fd (restore/fds.py) — and opened again through /proc by every other fd
and mapping of it, so that they all share one inode as they did.

Making one: the file's directory is opened without following symbolic links (its
path came from d_path, which never holds one: restore/hostfs.py), then the restorer,
acting as the file's owner (fsuid/fsgid: the kernel checks the directory as it would
check the owner), makes an unnamed file there with O_TMPFILE — on the same
filesystem, and never visible under any name. ckpt writes the content from its side
(through /proc/PID/fd/N, holes kept), then sets owner and mode. Each fd is a new
open file description with its own flags and offset. The file never gets a name:
what /proc/PID/fd shows for it is the kernel's name of an O_TMPFILE file,
`<dir>/#<inode> (deleted)`, not the name it had.
"""

from __future__ import annotations

import errno
import os

from ..errors import FileChanged, ImageCorrupt, RestoreError
from ..kernel import abi, fdobjs, procfs, syscalls
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, FileRef, ProcessImage, UnlinkedFile
from . import hostfs

Key = tuple[int, int]  # (dev, ino) of the file at the dump


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


class UnlinkedFiles:
    """The unlinked files of a restore: their content (from the record holding it) and,
    once made, where each can be opened again (/proc/PID/...)."""

    def __init__(self, procs: list[ProcessImage]):
        self.content: dict[Key, UnlinkedFile] = {}
        for p in procs:
            for f in getattr(p, "fds", ()):
                if f.kind == "unlinked" and f.unlinked is not None and f.file is not None:
                    self.content.setdefault((f.file.dev, f.file.ino), f.unlinked)
        self.made: dict[Key, tuple[int, tuple[str, ...]]] = {}

    def open(self, inj: Injector, proc: ProcessImage, ref: FileRef, flags: int, what: str) -> int:
        """A new open file description of the file `ref` names, with `flags`, in the
        restorer `inj` (its fd): of the file made already, or of one made now."""
        key = (ref.dev, ref.ino)
        got = self.made.get(key)
        if got is not None:
            return _reopen(inj, procfs.in_target(got[0], *got[1]), flags, what, ref)
        tmp = self._make(inj, proc, key, ref, what)
        try:
            return _reopen(inj, procfs.in_target("self", "fd", tmp), flags, what, ref)
        finally:
            syscalls.close(inj, tmp)

    def note(self, ref: FileRef, pid: int, *where: str) -> None:
        """The file is open (or mapped) in process pid as /proc/PID/<where>."""
        self.made.setdefault((ref.dev, ref.ino), (pid, where))

    def _make(self, inj: Injector, proc: ProcessImage, key: Key, ref: FileRef, what: str) -> int:
        state = self.content.get(key)
        if state is None:
            raise ImageCorrupt(f"{what}: the image lacks the content of unlinked file {ref.path}")
        directory = os.path.dirname(ref.path) or "/"
        inj.reset_data()
        try:
            dirfd = hostfs.open_resolved(
                inj, directory, abi.O_PATH | abi.O_DIRECTORY | abi.O_CLOEXEC
            )
        except RemoteError as exc:
            if exc.errno == errno.ELOOP:
                raise FileChanged(
                    f"{what}: the directory {directory} of unlinked file {ref.path} has a "
                    "symbolic link in its path now, where the dump saw none (not followed)"
                ) from exc
            raise RestoreError(
                f"{what}: cannot make unlinked file {ref.path} again: its directory "
                f"{directory}: {exc.strerror}"
            ) from exc
        uid, gid, groups = hostfs.process_fs_identity(proc)
        if (state.uid, state.gid) != (uid, gid):
            uid, gid, groups = state.uid, state.gid, []
        try:
            with hostfs.fs_identity(inj, uid, gid, groups):
                flags = abi.O_TMPFILE | abi.O_RDWR | abi.O_CLOEXEC
                fd = syscalls.openat(inj, dirfd, inj.cstr("."), flags, 0o600)
        except RemoteError as exc:
            why = exc.strerror
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR):
                why = "its filesystem cannot make unnamed files (O_TMPFILE)"
            raise RestoreError(
                f"{what}: cannot make unlinked file {ref.path} again in {directory} as uid "
                f"{uid}: {why}"
            ) from exc
        finally:
            syscalls.close(inj, dirfd)
        try:
            _fill(procfs.fd_path(inj.tracee.pid, fd), state)
        except OSError as exc:
            syscalls.close(inj, fd)
            raise RestoreError(f"{what}: cannot fill unlinked file {ref.path}: {exc}") from exc
        return fd


def _fill(path: str, state: UnlinkedFile) -> None:
    """Content (holes kept), then owner, then mode (a chown clears setuid/setgid)."""
    fdobjs.write_sparse(path, fdobjs.FileContent(state.size, state.mode, 0, state.extents))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.fchown(fd, state.uid, state.gid)
        os.fchmod(fd, state.mode)
    finally:
        os.close(fd)


def _reopen(inj: Injector, path: str, flags: int, what: str, ref: FileRef) -> int:
    flags &= ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC | abi.O_NOCTTY)
    inj.reset_data()
    try:
        return syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(path), flags, 0)
    except RemoteError as exc:
        raise RestoreError(
            f"{what}: cannot open unlinked file {ref.path} again ({path}): {exc.strerror}"
        ) from exc


def restore_unlinked(ctx, fd: Fd) -> None:
    """restore/fds.py's handler: the fd's own description, at its number, its offset."""
    inj, proc = ctx.inj, ctx.proc
    files = ctx.unlinked
    what = f"process {proc.pid}: fd {fd.fd}"
    tmp = files.open(inj, proc, fd.file, fd.flags, what)
    if tmp != fd.fd:
        syscalls.dup3(inj, tmp, fd.fd, abi.O_CLOEXEC if fd.cloexec else 0)
        syscalls.close(inj, tmp)
    elif fd.cloexec:
        syscalls.fcntl(inj, fd.fd, abi.F_SETFD, abi.FD_CLOEXEC)
    if not fd.flags & abi.O_PATH:
        syscalls.lseek(inj, fd.fd, fd.pos, 0)
    files.note(fd.file, inj.tracee.pid, "fd", str(fd.fd))
