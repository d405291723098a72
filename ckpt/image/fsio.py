"""Small file helpers: open/read with errors mapped to ckpt's, write-all, fsync.

Why here: every reader path must turn OSError into ImageNotFound / ImageCorrupt /
AccessDenied naming the file, and every writer path must fsync the same way.
Doing it once keeps the other modules about the format, not about errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from ..errors import AccessDenied, ImageCorrupt, ImageNotFound, ImageUntrusted, NoSpace
from . import trust

FILE_MODE = 0o600  # images hold process memory (keys, passwords): owner only
DIR_MODE = 0o700


def open_read(path: str, what: str) -> int:
    """Open `path` read-only; a missing file is ImageNotFound, EACCES is AccessDenied.

    The file is checked on the fd (image/trust.py): a symbolic link, a file of another
    user or one others may write is ImageUntrusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ImageNotFound(f"{path}: {what} is missing") from None
    except PermissionError as exc:
        raise AccessDenied(f"{path}: cannot read {what}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageUntrusted(
                f"{path}: {what} is a symbolic link (ckpt never writes one into an image)"
            ) from None
        raise ImageCorrupt(f"{path}: cannot open {what}: {exc.strerror}") from None
    try:
        trust.check_owned(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def file_size(fd: int, path: str) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:  # pragma: no cover - fstat on an open fd does not fail
        raise ImageCorrupt(f"{path}: fstat failed: {exc.strerror}") from None


def read_head(fd: int, size: int, path: str, limit: int) -> bytes:
    """The first min(size, limit) bytes of a file: where its header is."""
    if not size:
        return b""
    try:
        return os.pread(fd, min(size, limit), 0)
    except OSError as exc:  # EISDIR, EIO …
        raise ImageCorrupt(f"{path}: cannot read: {exc.strerror}") from None


def pread_exact(fd: int, n: int, offset: int, path: str, what: str) -> bytes:
    """Read exactly n bytes at offset, or raise ImageCorrupt saying the file is truncated."""
    parts = []
    got = 0
    while got < n:
        try:
            b = os.pread(fd, n - got, offset + got)
        except OSError as exc:
            if exc.errno == errno.EINTR:  # pragma: no cover
                continue
            raise ImageCorrupt(f"{path}: read of {what} failed: {exc.strerror}") from None
        if not b:
            raise ImageCorrupt(
                f"{path}: truncated: {what} needs {n} bytes at offset {offset}, file ends first"
            )
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: OSError, where: str, what: str) -> NoSpace:
    """The NoSpace error for ENOSPC/EDQUOT while writing `what` of `where`."""
    reason = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return NoSpace(
        f"{where}: {reason} while writing {what}; nothing was kept there (free some space "
        "or choose another directory, then run it again)"
    )


@contextlib.contextmanager
def space_checked(where: str, what: str) -> Iterator[None]:
    """ENOSPC/EDQUOT inside become NoSpace (exit 18) naming `where` and `what`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(exc, where, what) from None
        raise


def create_file(path: str) -> int:
    """Create a new file for writing; O_EXCL because the tmp dir is ours alone."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


def write_all(fd: int, data) -> None:
    """os.write until everything is written (short writes happen on signals and big buffers)."""
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def fsync_path(path: str) -> None:
    """fsync a file or directory by name (O_RDONLY is enough for fsync on Linux)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
