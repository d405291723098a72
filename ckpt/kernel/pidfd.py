"""pidfd_open / pidfd_getfd / pidfd_send_signal.

A pidfd names one process for its whole life, so holding one is how ckpt
makes sure that "pid 1234" still means the process it inspected earlier; and
pidfd_getfd is how the tracker gets its own copy of a uffd that was created
inside the target (a uffd context belongs to the mm of its creator).
"""

from __future__ import annotations

import os
import shutil
import sys

from ..errors import NoSuchProcess
from . import abi, procfs
from .native import check, syscall

SYS_PIDFD_SEND_SIGNAL = 424
SYS_PIDFD_OPEN = abi.NR_PIDFD_OPEN
SYS_PIDFD_GETFD = abi.NR_PIDFD_GETFD

PIDFD_NONBLOCK = os.O_NONBLOCK
PIDFD_THREAD = 0x80  # = O_EXCL; Linux 6.9+, required to open a non-leader TID


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd (close-on-exec) for pid; ESRCH when it does not exist."""
    return check(syscall(SYS_PIDFD_OPEN, pid, flags), "pidfd_open", target=f"pid {pid}")


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate, in ckpt, of the target's fd (same open file description).

    The copy is close-on-exec. Needs PTRACE_MODE_ATTACH over the target.
    """
    return check(syscall(SYS_PIDFD_GETFD, pidfd, fd, 0), "pidfd_getfd", target=f"fd {fd}")


def take_fd(pid: int, fd: int) -> int:
    """ckpt's duplicate of process pid's fd (pidfd_getfd through a pidfd it closes)."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Signal the process behind pidfd; sig 0 only checks that it is still alive."""
    check(syscall(SYS_PIDFD_SEND_SIGNAL, pidfd, sig, 0, 0), "pidfd_send_signal")


def pidfd_of_same(pid: int, start: int, flags: int = 0) -> int | None:
    """A pidfd of pid if it is still the process that started at `start` (clock ticks,
    /proc/PID/stat field 22), else None. The pidfd is taken first and the process
    checked after, through it: a PID reused meanwhile fails the start time, one that
    exits after the check is still the right (now dead) process."""
    try:
        fd = pidfd_open(pid, flags)
    except OSError:
        return None
    try:
        if procfs.stat(pid).starttime == start:
            pidfd_send_signal(fd, 0)  # ESRCH: reaped between pidfd_open and the stat
            return fd
    except (OSError, NoSuchProcess):  # gone (reaped, ESRCH): not the same process
        pass
    os.close(fd)
    return None


def dead_pidfd(flags: int = 0) -> int:
    """A pidfd of a process that has exited and been reaped (fdinfo `Pid: -1`), as a
    pidfd kept after its process was waited for reads: a child that exits at once,
    opened before it is reaped."""
    exe = shutil.which("true") or sys.executable
    argv = [exe] if exe != sys.executable else [exe, "-c", ""]
    child = os.posix_spawn(exe, argv, {})
    try:
        fd = pidfd_open(child, flags)
    finally:
        os.waitpid(child, 0)
    return fd
