"""Files a process was writing at its own offset (`model.writes_at_offset`; the capture
is capture/written.py): the file must be as it was at the dump, or the restored
process's writes land over or beside bytes it never wrote (redis' BGSAVE child would
finish a corrupt RDB).

With the content in the image (`Fd.content`), `reopen` gives the restorer an fd of
the file as it was at the dump, whatever happened to it since:
- the same file, unchanged (size and mtime): opened as it is;
- the same file, changed (the original, left running, wrote on): its content is put
  back — truncated, the dumped bytes written in, the dumped mtime set — and one line on
  stderr says so;
- gone (the original finished and renamed or removed it): made again at its name,
  O_CREAT|O_EXCL in its directory opened without following symbolic links, acting as
  the file's owner (restore/hostfs.py), with its mode and content; one line says so;
- another file at that name now: refused (FileChanged, exit 10) — ckpt never writes
  over a file the process did not have.
Without content (too large at the dump), restore/checks.py wants the file unchanged.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from ..errors import FileChanged, RestoreError
from ..kernel import abi, procfs, syscalls
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, ProcessImage, UnlinkedFile
from . import hostfs


def check(fd: Fd, what: str) -> None:
    """Before anything is built: the file is the dumped one (changed or not: its content
    goes back), or gone with its directory still there (made again); never another file."""
    ref = fd.file
    try:
        st = os.stat(ref.path, follow_symlinks=False)
    except FileNotFoundError:
        directory = os.path.dirname(ref.path) or "/"
        if not os.path.isdir(directory):
            raise FileChanged(
                f"{what} {ref.path} is gone since the dump, and so is its directory"
            ) from None
        return
    except OSError as exc:
        raise FileChanged(f"{what} {ref.path}: {exc.strerror}") from exc
    if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or not stat.S_ISREG(st.st_mode):
        raise FileChanged(_replaced(what, ref.path))


def _replaced(what: str, path: str) -> str:
    return (
        f"{what} {path} was replaced since the dump (inode changed): the process was "
        "writing the old one at its offset, and ckpt puts its content back only into "
        "that file or at a free name"
    )


def reopen(inj: Injector, proc: ProcessImage, fd: Fd, flags: int, what: str) -> int:
    """The restorer's new fd (`flags`) on the file as it was at the dump."""
    ref = fd.file
    try:
        tmp = hostfs.open_resolved(inj, ref.path, flags)
    except RemoteError as exc:
        if exc.errno == errno.ELOOP:
            raise FileChanged(
                f"{what} {ref.path}: a symbolic link is in its path now, where the dump saw "
                "none (not followed)"
            ) from exc
        if exc.errno != errno.ENOENT:
            raise
        tmp = _make(inj, proc, fd, flags, what)
        _say(proc, fd, f"{ref.path} was gone since the dump: made again with its content "
                       f"as at the dump ({fd.content.size} bytes)")  # fmt: skip
        return tmp
    try:
        st = hostfs.fstat_fd(inj, tmp)
        if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or not stat.S_ISREG(st.st_mode):
            raise FileChanged(_replaced(what, ref.path))
        if (st.st_size, st.st_mtime_ns) != (ref.size, ref.mtime_ns):
            _fill(procfs.fd_path(inj.tracee.pid, tmp), fd.content, ref.mtime_ns)
            _say(proc, fd, f"{ref.path} changed since the dump (size {ref.size} → "
                           f"{st.st_size}): its content as at the dump is put back")  # fmt: skip
    except OSError as exc:
        syscalls.close(inj, tmp)
        raise RestoreError(f"{what} {ref.path}: cannot put its content back: {exc}") from exc
    except BaseException:
        syscalls.close(inj, tmp)
        raise
    return tmp


def _make(inj: Injector, proc: ProcessImage, fd: Fd, flags: int, what: str) -> int:
    """The file made again at its name (O_EXCL: never another's), as its owner."""
    ref, content = fd.file, fd.content
    directory, name = os.path.split(ref.path)
    inj.reset_data()
    try:
        dirfd = hostfs.open_resolved(inj, directory or "/", abi.O_PATH | abi.O_DIRECTORY
                                     | abi.O_CLOEXEC)  # fmt: skip
    except RemoteError as exc:
        if exc.errno == errno.ELOOP:
            raise FileChanged(
                f"{what} {ref.path}: a symbolic link is in the path of its directory now, "
                "where the dump saw none (not followed)"
            ) from exc
        raise FileChanged(f"{what} {ref.path} is gone since the dump, and so is its "
                          f"directory ({exc.strerror})") from exc  # fmt: skip
    uid, gid, groups = hostfs.process_fs_identity(proc)
    if (content.uid, content.gid) != (uid, gid):
        uid, gid, groups = content.uid, content.gid, []
    make = flags | abi.O_CREAT | abi.O_EXCL | abi.O_NOFOLLOW
    try:
        with hostfs.fs_identity(inj, uid, gid, groups):
            tmp = syscalls.openat(inj, dirfd, inj.cstr(name), make, 0o600)
    except RemoteError as exc:
        if exc.errno == errno.EEXIST:  # made by someone since check(): not ours to write
            raise FileChanged(_replaced(what, ref.path)) from exc
        raise RestoreError(
            f"{what}: cannot make {ref.path} again as uid {uid}: {exc.strerror}"
        ) from exc
    finally:
        syscalls.close(inj, dirfd)
    try:
        _fill(procfs.fd_path(inj.tracee.pid, tmp), content, ref.mtime_ns, owner=True)
    except OSError as exc:
        syscalls.close(inj, tmp)
        raise RestoreError(f"{what}: cannot fill {ref.path} made again: {exc}") from exc
    return tmp


def _fill(path: str, content: UnlinkedFile, mtime_ns: int, *, owner: bool = False) -> None:
    """Through ckpt's own description of the restorer's fd (`path`, a /proc link): the
    file emptied, the dumped bytes written in (holes kept), owner (a file made again)
    and mode, then the dumped mtime (so it reads as unchanged since the dump)."""
    f = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(f, 0)
        os.ftruncate(f, content.size)
        for off, data in content.extents:
            view = memoryview(data)
            while view:
                n = os.pwrite(f, view, off)
                view, off = view[n:], off + n
        if owner:
            os.fchown(f, content.uid, content.gid)
        os.fchmod(f, content.mode)  # after fchown, which clears setuid and setgid
        os.utime(f, ns=(os.fstat(f).st_atime_ns, mtime_ns))
    finally:
        os.close(f)


def _say(proc: ProcessImage, fd: Fd, msg: str) -> None:
    sys.stderr.write(f"ckpt: process {proc.pid}: fd {fd.fd}: {msg}\n")


def shm_file(proc: ProcessImage, fd: Fd) -> bool:
    """Is the fd's file mapped as a shared memory object (its content in the image,
    written back by restore/shm.py)?"""
    ref = fd.file
    return ref is not None and any(
        v.shm >= 0 and v.file is not None and (v.file.dev, v.file.ino) == (ref.dev, ref.ino)
        for v in proc.vmas
    )


def must_be_unchanged(proc: ProcessImage, fd: Fd) -> bool:
    """Does a file fd need its file exactly as dumped (size and mtime), not only the same
    inode? A reader's yes; a writer at its offset too, unless the image holds its content
    (reopen puts it back) or its file is a shared memory object (written back anyway);
    an O_APPEND writer (a log) only adds at the end: the same inode is enough."""
    if fd.kind == "dir":
        return False
    if fd.flags & abi.O_ACCMODE != abi.O_WRONLY:
        return True
    return (
        fd.content is None
        and fd.kind == "file"
        and not (fd.flags & (abi.O_APPEND | abi.O_PATH) or shm_file(proc, fd))
    )
