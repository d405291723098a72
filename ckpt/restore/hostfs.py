"""The restore's operations on host paths, made safe against the users who own them.

A restore runs as root, and the image names paths in directories that other users
may change while it runs (a home directory, $XDG_RUNTIME_DIR, /tmp). So every path
operation here holds to three rules (docs/SECURITY.md):

- Identity is checked on the fd that is used: a file is opened inside the restorer,
  then ckpt fstat()s a pidfd_getfd copy of that very fd and compares it with the
  image (dev, inode, size, mtime) — never a path stat()ed before and opened after.
- Paths that came from the kernel at the dump (d_path: open files, mappings, the
  executable, FIFOs, the cwd) are resolved with openat2(RESOLVE_NO_SYMLINKS): d_path
  never contains a symbolic link, so one found now was put there since the dump.
- What creates or removes a name (bind, unlink of a socket file) runs inside the
  restorer with the filesystem identity of the file's owner (setfsuid/setfsgid and
  its groups: the kernel then drops CAP_DAC_OVERRIDE and friends for it), so it can
  do nothing the owner could not do; permissions are set on the socket before bind
  (fchmod + umask 0) so the file is born with its mode, with no chmod by name after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from collections.abc import Iterator

from ..errors import FileChanged, RestoreError
from ..kernel import abi, syscalls
from ..kernel.openat2 import OPEN_HOW_SIZE, RESOLVE_NO_SYMLINKS, open_how
from ..kernel.pidfd import pidfd_getfd, pidfd_open
from ..kernel.remote import Injector, RemoteError
from ..model import FileRef

MAX_GROUPS = 1024  # more than the scratch area holds comfortably: none are set then


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- opening


# openat2 refuses flag bits it does not know (openat ignores them); fdinfo's flags may
# carry kernel-internal ones (__FMODE_*): only abi.VALID_OPEN_FLAGS are passed on, and
# these with O_PATH
O_PATH_FLAGS = abi.O_PATH | abi.O_DIRECTORY | abi.O_NOFOLLOW | abi.O_CLOEXEC


def open_resolved(inj: Injector, path: str, flags: int) -> int:
    """openat2(AT_FDCWD, path, flags, RESOLVE_NO_SYMLINKS) in the restorer: its fd."""
    flags &= O_PATH_FLAGS if flags & abi.O_PATH else abi.VALID_OPEN_FLAGS
    p = inj.cstr(path)
    how = inj.put(open_how(flags, 0, RESOLVE_NO_SYMLINKS))
    return syscalls.openat2(inj, _u(abi.AT_FDCWD), p, how, OPEN_HOW_SIZE)


def fstat_fd(inj: Injector, fd: int) -> os.stat_result:
    """fstat of the restorer's fd, through ckpt's pidfd_getfd copy of it."""
    pidfd = pidfd_open(inj.tracee.pid)
    try:
        copy = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        return os.fstat(copy)
    finally:
        os.close(copy)


def compare(st: os.stat_result, ref: FileRef, what: str, *, strict: bool = True) -> None:
    """FileChanged unless st is the file the image names (strict: unchanged too)."""
    if (st.st_dev, st.st_ino) != (ref.dev, ref.ino):
        raise FileChanged(f"{what} {ref.path} was replaced since the dump (inode changed)")
    if strict and (st.st_size != ref.size or st.st_mtime_ns != ref.mtime_ns):
        raise FileChanged(
            f"{what} {ref.path} changed since the dump (size {ref.size} → {st.st_size}, "
            "or modification time)"
        )


_KIND_NAMES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFREG: "a file"}


def open_checked(
    inj: Injector,
    path: str,
    flags: int,
    what: str,
    *,
    ref: FileRef | None = None,
    strict: bool = True,
    fmt: int | None = None,
    ino: int | None = None,
    rdev: int | None = None,
) -> int:
    """Open `path` in the restorer without following symlinks and check, on the fd,
    that it is what the image names: `ref` (dev, inode, size, mtime; size and mtime
    only when strict), a file type `fmt` (stat.S_IF*), an inode number `ino`, a device
    `rdev`. Returns the restorer's fd; FileChanged (exit 10) when it is not."""
    try:
        fd = open_resolved(inj, path, flags)
    except RemoteError as exc:
        if exc.errno == errno.ELOOP:
            raise FileChanged(
                f"{what} {path}: a symbolic link is in its path now, where the dump saw "
                "none (not followed)"
            ) from exc
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise FileChanged(f"{what} {path} is gone since the dump") from exc
        raise
    try:
        st = fstat_fd(inj, fd)
        if fmt is not None and stat.S_IFMT(st.st_mode) != fmt:
            raise FileChanged(f"{what} {path} is no longer {_KIND_NAMES.get(fmt, 'the same kind')}")
        if ino is not None and st.st_ino != ino:
            raise FileChanged(f"{what} {path} was replaced since the dump (inode changed)")
        if rdev is not None and rdev and st.st_rdev != rdev:
            raise FileChanged(f"{what} {path} is another device now")
        if ref is not None:
            compare(st, ref, what, strict=strict)
    except BaseException:
        syscalls.close(inj, fd)
        raise
    return fd


def chdir_resolved(inj: Injector, path: str) -> None:
    """chdir(path) in the restorer, through an O_PATH fd opened without following
    symlinks (the cwd came from d_path)."""
    try:
        fd = open_resolved(inj, path, abi.O_PATH | abi.O_DIRECTORY | abi.O_CLOEXEC)
    except RemoteError as exc:
        if exc.errno == errno.ELOOP:
            raise FileChanged(
                f"working directory {path}: a symbolic link is in its path now, where the "
                "dump saw none (not followed)"
            ) from exc
        raise RestoreError(f"cannot enter working directory {path}: {exc.strerror}") from exc
    try:
        syscalls.fchdir(inj, fd)
    finally:
        syscalls.close(inj, fd)


# ---------------------------------------------------------------- acting as a user


def process_fs_identity(proc) -> tuple[int, int, list[int]]:
    """(fsuid, fsgid, groups) the dumped process used for its own path operations."""
    uids, gids = list(proc.uids), list(proc.gids)
    uid = uids[3] if len(uids) > 3 else uids[1]
    gid = gids[3] if len(gids) > 3 else gids[1]
    return uid, gid, list(proc.groups)


@contextlib.contextmanager
def fs_identity(inj: Injector, uid: int, gid: int, groups: list[int] | None) -> Iterator[None]:
    """The restorer's injected calls inside run with filesystem identity uid:gid and
    supplementary `groups` (None: keep ckpt's, only when uid:gid are ckpt's own).

    Only fsuid/fsgid change (setfsuid drops CAP_DAC_OVERRIDE, CAP_FOWNER… from the
    effective set while the fsuid is not 0, and gives them back after); the restorer
    is still ckpt's process otherwise. Needs a single-threaded restorer (credentials
    are per thread): fds and sockets are restored before any other thread exists.
    """
    me_uid, me_gid = os.geteuid(), os.getegid()
    if (uid, gid) == (me_uid, me_gid) and groups is None:
        yield
        return
    mine = os.getgroups()
    want = groups if groups is not None else mine
    if len(want) > MAX_GROUPS:
        want = []
    change_groups = sorted(want) != sorted(mine)
    if change_groups:
        _setgroups(inj, want)
    try:
        syscalls.setfsgid(inj, gid & 0xFFFFFFFF)
        syscalls.setfsuid(inj, uid & 0xFFFFFFFF)
        # setfsuid/setfsgid cannot fail visibly: -1 (invalid) reads the current value back
        got = (
            syscalls.setfsuid(inj, 0xFFFFFFFF),
            syscalls.setfsgid(inj, 0xFFFFFFFF),
        )
        if got != (uid, gid):
            raise RestoreError(f"cannot act as {uid}:{gid} in the restorer (fsuid:fsgid {got})")
        yield
    finally:
        syscalls.setfsuid(inj, me_uid)
        syscalls.setfsgid(inj, me_gid)
        if change_groups:
            _setgroups(inj, mine)


def _setgroups(inj: Injector, groups: list[int]) -> None:
    raw = struct.pack(f"<{len(groups)}I", *groups)
    syscalls.setgroups(inj, len(groups), inj.put(raw) if raw else 0)


def unlink_as_owner(inj: Injector, path: bytes) -> bool:
    """unlink(path) in the restorer (inside fs_identity); False if it did not exist."""
    try:
        syscalls.unlink(inj, inj.cstr(path))
    except RemoteError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
