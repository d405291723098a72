"""SysV shared memory segments: what /proc/sysvipc/shm says, and re-creating one
under its old id (kernel.shm_next_id, the checkpoint/restore knob).

A segment outlives its processes unless it was marked for deletion (IPC_RMID while
attached: SHM_DEST), so a restore on the same host usually finds it still there and
attaches to it; elsewhere, or once it is gone, ckpt makes it again with the same
id, key, size and mode, and the image's pages fill it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from . import procfs
from .native import check, syscall

NR_SHMGET, NR_SHMCTL = 29, 31
IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0o1000, 0o2000, 0, 1, 2
SHM_DEST = 0o1000
SHM_NEXT_ID = ("sys", "kernel", "shm_next_id")  # under /proc: procfs.system(*SHM_NEXT_ID)
# struct shmid64_ds (x86_64): ipc64_perm { key, uid, gid, cuid, cgid, mode(u16) ... }
_UID_OFF, _GID_OFF, _MODE_OFF, _DS_SIZE = 4, 8, 20, 128


@dataclass
class Segment:
    shmid: int
    key: int
    mode: int  # permission bits and SHM_DEST/SHM_LOCKED as the kernel keeps them
    size: int
    uid: int
    gid: int
    nattch: int


def segments() -> dict[int, Segment]:
    """Every segment of this IPC namespace, by id."""
    out: dict[int, Segment] = {}
    try:
        with open(procfs.system("sysvipc", "shm")) as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        return out
    for line in lines:
        p = line.split()
        if len(p) < 10:
            continue
        seg = Segment(
            shmid=int(p[1]), key=int(p[0]), mode=int(p[2], 8), size=int(p[3]),
            nattch=int(p[6]), uid=int(p[7]), gid=int(p[8]),
        )  # fmt: skip
        out[seg.shmid] = seg
    return out


def recreate(shmid: int, key: int, size: int, mode: int, uid: int, gid: int) -> None:
    """Make the segment again under id `shmid` (EEXIST if the key or id is taken)."""
    with open(procfs.system(*SHM_NEXT_ID), "w") as f:
        f.write(str(shmid))
    r = syscall(NR_SHMGET, key, size, IPC_CREAT | IPC_EXCL | (mode & 0o777))
    if r < 0:
        _consume_next_id()
    got = check(r, "shmget")
    if got != shmid:
        remove(got)
        raise OSError(errno.EEXIST, f"shmget gave id {got}, not {shmid}")
    buf = ctypes.create_string_buffer(_DS_SIZE)
    check(syscall(NR_SHMCTL, shmid, IPC_STAT, ctypes.addressof(buf)), "shmctl IPC_STAT")
    ctypes.c_uint32.from_buffer(buf, _UID_OFF).value = uid
    ctypes.c_uint32.from_buffer(buf, _GID_OFF).value = gid
    ctypes.c_uint16.from_buffer(buf, _MODE_OFF).value = mode & 0o777
    check(syscall(NR_SHMCTL, shmid, IPC_SET, ctypes.addressof(buf)), "shmctl IPC_SET")


def _consume_next_id() -> None:
    """shm_next_id is used up by the next shmget only (writing -1 back is refused):
    take it with a throwaway segment, so nobody else's segment gets that id."""
    r = syscall(NR_SHMGET, 0, 4096, IPC_CREAT | 0o600)
    if r >= 0:
        remove(r)


def remove(shmid: int) -> None:
    """IPC_RMID: gone now, or (attached) once the last process detaches."""
    r = syscall(NR_SHMCTL, shmid, IPC_RMID, 0)
    if r < 0 and -r not in (errno.EINVAL, errno.EIDRM):
        check(r, "shmctl IPC_RMID")


def next_id_settable() -> bool:
    return os.access(procfs.system(*SHM_NEXT_ID), os.W_OK)
