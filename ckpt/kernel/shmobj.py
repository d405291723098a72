"""Shared memory objects (shmem inodes: MAP_SHARED anonymous memory, SysV segments)
read and written as files, not through one process's page tables.

A page of a shared object may be in no process's page tables at all (the process
that wrote it exited, or never touched its own mapping of it), so the object is
opened through /proc/PID/map_files and its pages are found with SEEK_DATA/SEEK_HOLE
(resident or swapped pages are "data", never-touched ones are holes).
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from dataclasses import dataclass

from .native import PAGE_SIZE
from .procfs import PROC_ROOT


@dataclass(frozen=True)
class ObjectFile:
    """An open shared memory object: ckpt's own fd keeps it alive until closed."""

    fd: int
    dev: int
    ino: int
    size: int  # bytes (the shmem inode's i_size)


def open_mapped(
    pid: int, start: int, end: int, ident: tuple[int, int] | None, *, write: bool = False
) -> ObjectFile:
    """The object a mapping of `pid` maps, opened through /proc/PID/map_files.

    `ident` is (dev, ino) as /proc/PID/maps names it: checked on the opened fd, so a
    mapping replaced meanwhile is never mistaken for the object (None: a mapping of
    ckpt's own restorer, which nobody else changes).
    """
    path = f"{PROC_ROOT}/{pid}/map_files/{start:x}-{end:x}"
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC  # a magic link: followed
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode) or (ident and (st.st_dev, st.st_ino) != ident):
            raise OSError(errno.ESTALE, f"{path}: not the shared object {ident} any more")
    except BaseException:
        os.close(fd)
        raise
    return ObjectFile(fd, st.st_dev, st.st_ino, st.st_size)


def mapped_size(pid: int, start: int, end: int) -> int:
    """The size of the object a mapping maps (-1 if it cannot be looked at)."""
    try:
        return os.stat(f"{PROC_ROOT}/{pid}/map_files/{start:x}-{end:x}").st_size
    except OSError:
        return -1


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(first_page, npages) runs of the object holding data (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first = start // PAGE_SIZE
        last = (end + PAGE_SIZE - 1) // PAGE_SIZE
        if out and out[-1][0] + out[-1][1] >= first:
            out[-1] = (out[-1][0], last - out[-1][0])
        elif last > first:
            out.append((first, last - first))
        pos = max(end, start + 1)
    return out


def read_pages(fd: int, first: int, npages: int) -> bytes:
    """npages pages from page `first` (reads past EOF come back as zeros)."""
    want = npages * PAGE_SIZE
    data = os.pread(fd, want, first * PAGE_SIZE)
    if len(data) < want:  # a short read at EOF: the object shrank (memfd) or a race
        data += bytes(want - len(data))
    return data


def write_pages(fd: int, offset: int, data) -> None:
    """Write data at byte `offset` of the object, all of it."""
    mv = memoryview(data)
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write into a shared memory object")
        done += n


def close(obj: ObjectFile) -> None:
    os.close(obj.fd)
