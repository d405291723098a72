"""Terminals: termios and foreground-group ioctls, and a process's terminal in /proc.

Every call that may be made by a process outside the terminal's foreground
group (tcsetattr, tcsetpgrp) runs with SIGTTOU blocked, as shells do: blocked,
the kernel lets the call through instead of stopping ckpt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Iterator
from dataclasses import dataclass

from . import procfs

TERMIOS_SIZE = 36  # struct termios of TCGETS/TCSETS (not termios2)
TTY_MAJOR, TTYAUX_MAJOR = 4, 5
PTS_MAJORS = range(136, 144)  # UNIX98_PTY_SLAVE_MAJOR .. + 7
DEV_TTY = os.makedev(TTYAUX_MAJOR, 0)  # /dev/tty: "my controlling terminal"
DEV_CONSOLE = os.makedev(TTYAUX_MAJOR, 1)
DEV_PTMX = os.makedev(TTYAUX_MAJOR, 2)  # the pty multiplexer: every fd on it is a master
ECHO = termios.ECHO


def tcgets(fd: int) -> bytes | None:
    """The terminal's struct termios, or None when `fd` is not a terminal."""
    try:
        return bytes(fcntl.ioctl(fd, termios.TCGETS, bytes(TERMIOS_SIZE)))
    except OSError:
        return None


def lflag(raw: bytes) -> int:
    """c_lflag of a struct termios (c_iflag, c_oflag, c_cflag, c_lflag: four u32)."""
    return struct.unpack_from("<4I", raw)[3]


@contextlib.contextmanager
def _no_sigttou() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def tcsets(fd: int, raw: bytes) -> None:
    """Set the terminal's modes now (TCSETS), even from a background group."""
    if len(raw) != TERMIOS_SIZE:
        raise ValueError(f"struct termios is {TERMIOS_SIZE} bytes, not {len(raw)}")
    with _no_sigttou():
        fcntl.ioctl(fd, termios.TCSETS, raw)


def tcgetpgrp(fd: int) -> int:
    return os.tcgetpgrp(fd)


def tcsetpgrp(fd: int, pgid: int) -> None:
    """Make `pgid` the foreground group of the terminal (our controlling terminal)."""
    with _no_sigttou():
        os.tcsetpgrp(fd, pgid)


def is_master(rdev: int) -> bool:
    return rdev == DEV_PTMX


def name_of(rdev: int, fallback: str = "") -> str:
    """/dev name of a terminal device (pts numbers from the device number)."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major in PTS_MAJORS:
        return f"/dev/pts/{(major - PTS_MAJORS[0]) * 256 + minor}"
    if major == TTY_MAJOR and minor < 64:
        return f"/dev/tty{minor}"
    if rdev == DEV_TTY:
        return "/dev/tty"
    if rdev == DEV_CONSOLE:
        return "/dev/console"
    return fallback or f"the terminal {major}:{minor}"


@dataclass
class JobInfo:
    """A process's place in job control, from /proc/PID/stat (fields 5-8)."""

    pgrp: int
    session: int
    tty: int  # device number of its controlling terminal; 0: none
    tpgid: int  # that terminal's foreground process group; -1: no terminal


def job_info(pid: int | str) -> JobInfo:
    data = procfs.read_bytes(pid, "stat")
    rest = data[data.rfind(b")") + 2 :].split()
    pgrp, session, tty, tpgid = (int(x) for x in rest[2:6])
    return JobInfo(pgrp=pgrp, session=session, tty=tty & 0xFFFFFFFF, tpgid=tpgid)
