"""pidfd_open / pidfd_getfd / pidfd_send_signal.

A pidfd names one process for its whole life, so holding one is how ckpt
makes sure that "pid 1234" still means the process it inspected earlier; and
pidfd_getfd is how the tracker gets its own copy of a uffd that was created
inside the target (a uffd context belongs to the mm of its creator).
"""

from __future__ import annotations

import os

from . import abi
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


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Signal the process behind pidfd; sig 0 only checks that it is still alive."""
    check(syscall(SYS_PIDFD_SEND_SIGNAL, pidfd, sig, 0, 0), "pidfd_send_signal")
