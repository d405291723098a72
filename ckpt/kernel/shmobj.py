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

from . import abi, procfs
from .native import PAGE_SIZE, check, ffi, syscall

NR_FSTATFS, NR_FALLOCATE = abi.NR_FSTATFS, 285
TMPFS_MAGIC = 0x01021994  # tmpfs and the internal shmem mount (anonymous shared memory)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@dataclass(frozen=True)
class ObjectFile:
    """An open shared memory object: ckpt's own fd keeps it alive until closed."""

    fd: int
    dev: int
    ino: int
    size: int  # bytes (the shmem inode's i_size)
    mode: int = 0
    uid: int = 0
    gid: int = 0


def open_mapped(
    pid: int, start: int, end: int, ident: tuple[int, int] | None, *, write: bool = False
) -> ObjectFile:
    """The object a mapping of `pid` maps, opened through /proc/PID/map_files.

    `ident` is (dev, ino) as /proc/PID/maps names it: checked on the opened fd, so a
    mapping replaced meanwhile is never mistaken for the object (None: a mapping of
    ckpt's own restorer, which nobody else changes).
    """
    path = procfs.map_file(pid, start, end)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC  # a magic link: followed
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode) or (ident and (st.st_dev, st.st_ino) != ident):
            raise OSError(errno.ESTALE, f"{path}: not the shared object {ident} any more")
    except BaseException:
        os.close(fd)
        raise
    return ObjectFile(fd, st.st_dev, st.st_ino, st.st_size, st.st_mode & 0o7777, st.st_uid,
                      st.st_gid)  # fmt: skip


def on_shmem(fd: int) -> bool:
    """The file lives in memory (tmpfs, e.g. /dev/shm): its content is the process's
    shared memory, not data a file system keeps."""
    buf = ffi.new("char[]", 128)  # struct statfs; f_type is its first field
    check(syscall(NR_FSTATFS, fd, int(ffi.cast("uintptr_t", buf))), "fstatfs")
    return int.from_bytes(bytes(ffi.buffer(buf, 8)), "little", signed=True) == TMPFS_MAGIC


def punch(fd: int, offset: int, length: int) -> None:
    """Drop [offset, offset+length) of the object: it reads as zero, holds no page."""
    check(
        syscall(NR_FALLOCATE, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
        "fallocate",
    )


def mapped_size(pid: int, start: int, end: int) -> int:
    """The size of the object a mapping maps (-1 if it cannot be looked at)."""
    try:
        return os.stat(procfs.map_file(pid, start, end)).st_size
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


def mappers(dev: int, ino: int, sysv: bool = False) -> list[tuple[int, int, int]]:
    """(pid, start, end) of a mapping of the object (dev, ino) in each process that
    maps it now (every /proc/PID/maps). sysv: the object is a SysV segment, whose inode
    number is its shmid on the mount anonymous shared memory uses too: only its
    /SYSV<key> mappings are it (and only the others when not)."""
    want = f" {os.major(dev):02x}:{os.minor(dev):02x} {ino} ".encode()
    found = []
    for name in os.listdir(procfs.PROC_ROOT):
        if not name.isdigit():
            continue
        try:
            with open(procfs.path(name, "maps"), "rb") as f:
                data = f.read()
        except OSError:
            continue
        at = data.find(want)
        while at >= 0:
            line_end = data.find(b"\n", at)
            path = data[at + len(want) : line_end if line_end >= 0 else len(data)].strip()
            if path.startswith(b"/SYSV") == sysv:
                line = data[data.rfind(b"\n", 0, at) + 1 : at]
                a, b = line.split(b" ", 1)[0].split(b"-")
                found.append((int(name), int(a, 16), int(b, 16)))
                break
            at = data.find(want, at + 1)
    return found


def close(obj: ObjectFile) -> None:
    os.close(obj.fd)
