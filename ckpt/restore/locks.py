"""Take back the file locks a process held (capture/locks.py), by injected syscalls.

Runs right after restore/fds.py restore_fds (restore/rebuild.py state_files), once
every fd of the process is in place and every temporary fd closed: a POSIX lock is
the process's and goes when it closes ANY fd of the file (the dup3/close of a
temporary, an epoll registration's stand-in, a memfd holder would drop it). Later
steps open nothing but O_PATH fds and /proc files. A tree member takes a shared description (with its flock, OFD
locks and lease) from the member that restored it, after that member's locks.

Every lock is taken without waiting (LOCK_NB, F_SETLK, F_OFD_SETLK, F_SETLEASE): if
another process holds a conflicting one now, the restore fails (RestoreError, exit
11, naming the lock and who holds it) and nothing of it is left running.

    flock      flock(fd, LOCK_SH|LOCK_EX | LOCK_NB)
    posix      fcntl(fd, F_SETLK, struct flock {F_RDLCK|F_WRLCK, SEEK_SET, start, len})
    ofd        fcntl(fd, F_OFD_SETLK, …) the same, l_pid 0
    lease      fcntl(fd, F_SETLEASE, F_RDLCK|F_WRLCK): the restorer still has ckpt's
               credentials (CAP_LEASE); the lease's SIGIO goes to the restored process
"""

from __future__ import annotations

import errno
import struct

from ..errors import CkptError, RestoreError
from ..kernel import abi, procfs, syscalls
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, FileLock, ProcessImage
from .hostfs import fstat_fd

FLOCK = "<hh4xqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (32 bytes)
SEEK_SET = 0
CONFLICT = (errno.EAGAIN, errno.EACCES)  # EWOULDBLOCK is EAGAIN


def restore_locks(inj: Injector, proc: ProcessImage) -> None:
    for f in proc.fds:
        for lk in f.locks:
            inj.reset_data()
            try:
                take(inj, f.fd, lk)
            except RemoteError as exc:
                raise RestoreError(_refused(inj, proc, f, lk, exc)) from exc


def take(inj: Injector, fd: int, lk: FileLock) -> None:
    """One lock, through fd, without waiting."""
    if lk.kind == "flock":
        syscalls.flock(inj, fd, (abi.LOCK_EX if lk.write else abi.LOCK_SH) | abi.LOCK_NB)
    elif lk.kind == "lease":
        syscalls.fcntl(inj, fd, abi.F_SETLEASE, abi.F_WRLCK if lk.write else abi.F_RDLCK)
    else:
        length = 0 if lk.end < 0 else lk.end - lk.start + 1  # 0: to the end, and beyond
        kind = abi.F_WRLCK if lk.write else abi.F_RDLCK
        arg = inj.put(struct.pack(FLOCK, kind, SEEK_SET, lk.start, length, 0))
        syscalls.fcntl(inj, fd, abi.F_OFD_SETLK if lk.kind == "ofd" else abi.F_SETLK, arg)


def describe(lk: FileLock) -> str:
    """The lock in words: "the POSIX write lock on bytes 5-14", "the shared flock"…"""
    if lk.kind == "flock":
        return f"the {'exclusive' if lk.write else 'shared'} flock"
    if lk.kind == "lease":
        return f"the {'write' if lk.write else 'read'} lease"
    span = f"{lk.start} to the end" if lk.end < 0 else f"{lk.start}-{lk.end}"
    what = "POSIX" if lk.kind == "posix" else "OFD"
    return f"the {what} {'write' if lk.write else 'read'} lock on bytes {span}"


def _refused(inj: Injector, proc: ProcessImage, f: Fd, lk: FileLock, exc: RemoteError) -> str:
    msg = f"cannot take back {describe(lk)} of process {proc.pid} on {f.path} (fd {f.fd})"
    if exc.errno not in CONFLICT:
        return f"{msg}: {exc.strerror}"
    if lk.kind == "lease":
        return f"{msg}: the file is open elsewhere now, or another lease is held on it"
    return f"{msg}: {_holders(inj, f.fd, lk)} a conflicting lock now"


def _holders(inj: Injector, fd: int, lk: FileLock) -> str:
    """Who holds a lock on the file now that conflicts with lk, from /proc/locks:
    "process 123 (comm) holds"."""
    try:
        st = fstat_fd(inj, fd)
        now = [o for o in procfs.locks_on(st.st_dev, st.st_ino) if _conflicts(lk, o)]
    except (OSError, ValueError):
        now = []
    pids = sorted({o.pid for o in now} - {inj.tracee.pid, -1})
    if not pids:  # an OFD lock belongs to no process; or it went meanwhile
        ofd = any(o.kind == "OFDLCK" for o in now)
        return (
            "an OFD lock of another open file description holds" if ofd else "another process holds"
        )
    names = []
    for pid in pids[:4]:
        try:
            comm = procfs.read_bytes(pid, "comm").decode(errors="replace").strip()
        except (OSError, CkptError):  # gone meanwhile: only its name is lost
            comm = "?"
        names.append(f"process {pid} ({comm})")
    return f"{', '.join(names)} {'holds' if len(names) == 1 else 'hold'}"


def _conflicts(lk: FileLock, other: procfs.FdLock) -> bool:
    """Does a lock /proc/locks lists stand in lk's way? (flock only meets flock; POSIX and
    OFD locks meet each other on the bytes they share; two readers never conflict)"""
    if not (lk.write or other.type == "WRITE"):
        return False
    if lk.kind == "flock":
        return other.kind == "FLOCK"
    if other.kind not in ("POSIX", "OFDLCK"):
        return False
    inf = 1 << 63
    end, oend = inf if lk.end < 0 else lk.end, inf if other.end < 0 else other.end
    return lk.start <= oend and other.start <= end
