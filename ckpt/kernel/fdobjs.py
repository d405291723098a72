"""Kernel objects behind fds (pipes, memfds, epoll, inotify, timerfd…), seen from ckpt.

Reading their state never changes it: pipe data is duplicated with tee()
into a private pipe (the target's buffer is not consumed), memfd content is
read through ckpt's own open file description (the target's offset stays),
and epoll/inotify/timerfd/signalfd/eventfd state comes from fdinfo.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios
from dataclasses import dataclass

from . import abi, procfs
from .native import PAGE_SIZE, check, ffi, nonzero_runs, syscall
from .openat2 import RESOLVE_NO_SYMLINKS, openat2

NR_TEE, NR_KCMP, NR_OPEN_BY_HANDLE_AT = 276, abi.NR_KCMP, 304
NR_INOTIFY_ADD_WATCH, NR_INOTIFY_RM_WATCH = 254, 255
KCMP_EPOLL_TFD = 7
SPLICE_F_NONBLOCK = 2
F_GETPIPE_SZ, F_SETPIPE_SZ = abi.F_GETPIPE_SZ, abi.F_SETPIPE_SZ
F_ADD_SEALS, F_GET_SEALS = abi.F_ADD_SEALS, abi.F_GET_SEALS
TFD_IOC_SET_TICKS = abi.TFD_IOC_SET_TICKS
IN_DONT_FOLLOW = 0x02000000
O_PATH = abi.O_PATH
SEEK_DATA, SEEK_HOLE = 3, 4
_CHUNK = 8 << 20


# ---------------------------------------------------------------- fdinfo


def fdinfo_lines(raw: bytes, prefix: str) -> list[dict[str, str]]:
    """Every fdinfo line starting with `prefix` as {key: value} of its `key:value` words.

    `tfd:        5 events:       19 data: ...` → {"tfd": "5", "events": "19", ...}.
    """
    out = []
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        if not line.startswith(prefix):
            continue
        fields: dict[str, str] = {}
        key = None
        for word in line[len(prefix) :].replace(":", ": ").split():
            if word.endswith(":"):
                key = word[:-1]
            elif key is not None:
                fields[key] = word
                key = None
        if prefix.endswith(":"):
            fields[prefix[:-1].strip()] = line[len(prefix) :].split()[0]
        out.append(fields)
    return out


def parse_pair(value: str) -> int:
    """`(sec, nsec)` from timerfd fdinfo → nanoseconds."""
    sec, nsec = value.strip("() ").split(",")
    return int(sec) * 10**9 + int(nsec)


# ---------------------------------------------------------------- pipes


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def fionread(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def pipe_peek(fd: int) -> bytes:
    """The bytes buffered in the pipe/FIFO that `fd` reads, left in place.

    tee() duplicates the pipe's buffers into a private pipe of the same
    capacity (capacity counts buffers, so all of them fit); reading the
    private pipe consumes only the copies.
    """
    want = fionread(fd)
    if want == 0:
        return b""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, pipe_size(fd))
        n = check(syscall(NR_TEE, fd, w, 1 << 30, SPLICE_F_NONBLOCK), "tee")
        chunks = []
        got = 0
        while got < n:
            chunk = os.read(r, n - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(r)
        os.close(w)
    data = b"".join(chunks)
    if len(data) != want:
        raise OSError(errno.EIO, f"tee copied {len(data)} of the pipe's {want} bytes")
    return data


def pipe_fill(fd: int, data: bytes) -> None:
    """Write `data` into a pipe through ckpt's copy of its write end (it fits: the
    pipe was sized to hold it). Never blocks: the copy shares the open file
    description, which is made non-blocking for the fill and put back after, so data
    that does not fit is an error instead of a restore that waits forever."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError as exc:
                raise OSError(
                    errno.EAGAIN,
                    f"the pipe is full with {len(data) - len(view)} of its {len(data)} "
                    "buffered bytes written back",
                ) from exc
            view = view[n:]
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def holders(dev: int, ino: int, link: str, exclude: set[int]) -> list[int]:
    """PIDs (other than `exclude`) with an fd on the object whose /proc fd link reads `link`
    and whose (st_dev, st_ino) is (dev, ino)."""
    out = []
    for entry in os.listdir(procfs.PROC_ROOT):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        base = procfs.path(entry, "fd")
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{base}/{name}") != link:
                    continue
                st = os.stat(f"{base}/{name}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                out.append(int(entry))
                break
    return out


# ---------------------------------------------------------------- memfd


@dataclass
class FileContent:
    size: int
    mode: int
    seals: int
    extents: list[list]  # [offset, bytes]: the data; holes read as zero


def read_sparse(path: str, limit: int) -> FileContent:
    """Size, mode, seals and data extents (SEEK_DATA/SEEK_HOLE) of a file opened by
    path (e.g. /proc/PID/fd/N: a new open file description, so the target's
    offset is untouched). OSError(EFBIG) when the data exceeds `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            seals = 0
        extents: list[list] = []
        total = 0
        pos = 0
        while pos < st.st_size:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, SEEK_HOLE)
            for off in range(start, end, _CHUNK):  # bounded reads; pages of zeros stay holes
                data = os.pread(fd, min(_CHUNK, end - off), off)
                for first, n in _nonzero(data):
                    a, b = first * PAGE_SIZE, min((first + n) * PAGE_SIZE, len(data))
                    total += b - a
                    if total > limit:
                        raise OSError(errno.EFBIG, f"more than {limit >> 20} MiB of data")
                    extents.append([off + a, data[a:b]])
            pos = end
        return FileContent(size=st.st_size, mode=st.st_mode & 0o7777, seals=seals, extents=extents)
    finally:
        os.close(fd)


def _nonzero(data: bytes) -> list[tuple[int, int]]:
    """(first page, pages) runs of data that are not all zero (a short tail counts)."""
    npages = (len(data) + PAGE_SIZE - 1) // PAGE_SIZE
    if len(data) % PAGE_SIZE:
        data = data + bytes(PAGE_SIZE - len(data) % PAGE_SIZE)
    return nonzero_runs(data, npages)


def write_sparse(path: str, content: FileContent) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, content.size)
        for off, data in content.extents:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        os.fchmod(fd, content.mode)
    finally:
        os.close(fd)


def add_seals(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


# ---------------------------------------------------------------- SIGIO ownership


def sigio_state(fd: int) -> tuple[int, int, int]:
    """(F_OWNER_* type, owner PID/TID/PGID or 0, F_GETSIG) of the open file description
    behind ckpt's fd: who gets its SIGIO/SIGURG and which signal is sent instead of SIGIO."""
    kind, pid = struct.unpack("<ii", fcntl.fcntl(fd, abi.F_GETOWN_EX, bytes(8)))
    return kind, pid, fcntl.fcntl(fd, abi.F_GETSIG)


def owner_exists(kind: int, pid: int) -> bool:
    """Is there still a thread (F_OWNER_TID), process (F_OWNER_PID) or process group
    (F_OWNER_PGRP) with that number? A description keeps its owner's number after the
    owner is gone, and the kernel then sends its signals to nobody."""
    try:
        if kind == abi.F_OWNER_PGRP:
            os.killpg(pid, 0)
        else:
            os.stat(procfs.path(pid))  # a TID too: /proc/TID is reachable, though unlisted
    except (ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:  # killpg: the group exists, its members are not ours to signal
        return True
    return True


# ---------------------------------------------------------------- epoll


def epoll_target_is(pid: int, fd: int, efd: int, tfd: int, toff: int, epid: int = 0) -> bool:
    """Is the file at `fd` of pid the one registered in epoll `efd` of process epid (0:
    pid itself) as (tfd, toff-th)? An epoll inherited across fork is one description:
    its registrations name the fds of whoever added them, which another process of a
    tree may be the only one to hold."""
    slot = ffi.new("uint32_t[3]", [efd, tfd, toff])
    addr = int(ffi.cast("uintptr_t", slot))
    return syscall(NR_KCMP, pid, epid or pid, KCMP_EPOLL_TFD, fd, addr) == 0


# ---------------------------------------------------------------- inotify


def _mount_dir_for(sdev: int) -> str | None:
    """A mount point of the filesystem with kernel dev_t `sdev` (major << 20 | minor)."""
    want = f"{sdev >> 20}:{sdev & 0xFFFFF}"
    with open(procfs.path("self", "mountinfo")) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 4 and parts[2] == want:
                return parts[4].replace("\\040", " ")
    return None


def handle_to_path(sdev: int, htype: int, handle: bytes) -> str | None:
    """Path of the inode named by a file handle (open_by_handle_at), or None."""
    mnt = _mount_dir_for(sdev)
    if mnt is None or not handle:
        return None
    mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # not O_PATH: EBADF
    try:
        buf = ffi.new("char[]", struct.pack("<Ii", len(handle), htype) + handle)
        addr = int(ffi.cast("uintptr_t", buf))
        fd = syscall(NR_OPEN_BY_HANDLE_AT, mfd, addr, O_PATH | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            path = os.readlink(procfs.path("self", "fd", str(fd)))
        finally:
            os.close(fd)
    finally:
        os.close(mfd)
    return None if path.endswith(" (deleted)") or not path.startswith("/") else path


def open_watch_target(path: str) -> tuple[int, os.stat_result]:
    """An O_PATH fd on the inode a watch named `path` is on (resolved without following
    any symlink: the path came from the kernel; a trailing symlink is the watched
    inode itself), and its stat. The caller closes the fd."""
    fd = openat2(path, O_PATH | os.O_NOFOLLOW, RESOLVE_NO_SYMLINKS)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def inotify_add(fd: int, path: str, mask: int, *, via: int | None = None) -> int:
    """inotify_add_watch of `path` (the final component not followed); via: an O_PATH
    fd of ckpt's on the inode to watch instead, reached through /proc/self/fd (the
    watch lands on that inode, whatever `path` names now)."""
    if via is not None:
        target, mask = procfs.path("self", "fd", str(via)), mask & ~IN_DONT_FOLLOW
    else:
        target, mask = path, mask | IN_DONT_FOLLOW
    p = ffi.new("char[]", os.fsencode(target))
    r = syscall(NR_INOTIFY_ADD_WATCH, fd, int(ffi.cast("uintptr_t", p)), mask)
    return check(r, "inotify_add_watch", target=path)


def inotify_rm(fd: int, wd: int) -> None:
    check(syscall(NR_INOTIFY_RM_WATCH, fd, wd), "inotify_rm_watch")


def drain(fd: int) -> None:
    """Discard what is queued on fd now (reads exactly FIONREAD bytes: never blocks)."""
    n = fionread(fd)
    while n > 0:
        got = os.read(fd, n)
        if not got:
            break
        n -= len(got)
