"""Terminals: termios and foreground-group ioctls, and a process's terminal in /proc.

Every call that may be made by a process outside the terminal's foreground
group (tcsetattr, tcsetpgrp) runs with SIGTTOU blocked, as shells do: blocked,
the kernel lets the call through instead of stopping ckpt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import stat
import struct
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import CkptError
from . import abi, openat2, pidfd, procfs

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


# ---------------------------------------------------------------- pseudo-terminals

PTMX_PATHS = ("/dev/ptmx", "/dev/pts/ptmx")  # where a master may have been opened
WINSIZE_SIZE = 8  # struct winsize: rows, cols, xpixel, ypixel (four u16)
OPOST = termios.OPOST


def is_pts(rdev: int) -> bool:
    """A pseudo-terminal's slave side (/dev/pts/N)."""
    return os.major(rdev) in PTS_MAJORS


def pts_index(rdev: int) -> int:
    """N of /dev/pts/N, from the slave's device number (as name_of names it)."""
    return (os.major(rdev) - PTS_MAJORS[0]) * 256 + os.minor(rdev)


def get_int(fd: int, request: int) -> int:
    """An ioctl that writes one int (TIOCGPTN, TIOCGPKT, TIOCGPTLCK, TIOCGEXCL, TIOCGETD,
    FIONREAD, TIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(fd, request, bytes(4)))[0]


def set_int(fd: int, request: int, value: int) -> None:
    """An ioctl that reads one int through a pointer (TIOCSPTLCK, TIOCPKT, TIOCSPGRP)."""
    fcntl.ioctl(fd, request, struct.pack("i", value))


def winsize(fd: int) -> bytes:
    return bytes(fcntl.ioctl(fd, abi.TIOCGWINSZ, bytes(WINSIZE_SIZE)))


def set_winsize(fd: int, raw: bytes) -> None:
    fcntl.ioctl(fd, abi.TIOCSWINSZ, raw)


def peer(master: int, flags: int) -> int:
    """A new open file description of the master's slave, opened by number from the
    master (TIOCGPTPEER): no path is looked up, so no devpts mount or symlink can
    redirect it. O_NOCTTY always (ckpt must never get a controlling terminal); O_PATH
    opens the inode without opening the terminal (nothing of it changes)."""
    return fcntl.ioctl(master, abi.TIOCGPTPEER, flags | os.O_NOCTTY | os.O_CLOEXEC)


def poll_bits(fd: int) -> int:
    """What poll says of the fd now (POLLIN, POLLPRI: a packet-mode status byte waits,
    POLLHUP: the other side has no open file left)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLPRI | select.POLLOUT)
    return next((ev for _, ev in p.poll(0)), 0)


def master_index(pid: int, fd: int) -> int | None:
    """The pty number of a process's /dev/ptmx fd (its fdinfo's tty-index), or None."""
    try:
        raw = procfs.read_bytes(pid, "fdinfo", str(fd))
    except (OSError, CkptError):
        return None
    for line in raw.splitlines():
        if line.startswith(b"tty-index:"):
            return int(line.split()[1])
    return None


def read_output(master: int, packet: bool, settle: float = 0.02) -> bytes:
    """Everything queued for the master: what the slave side wrote and the master has
    not read yet. FIONREAD counts what the line discipline holds; the flip buffer's
    worker moves more in as room frees, so the queue is empty once it stayed empty for
    `settle` seconds. A read on a master in packet mode starts with TIOCPKT_DATA (0),
    which is not data (a pending status byte was refused before: poll_bits)."""
    out = bytearray()
    quiet = False
    while True:
        n = get_int(master, abi.FIONREAD)
        if n == 0:
            if quiet:
                return bytes(out)
            time.sleep(settle)  # the worker's pass, if one is due
            quiet = True
            continue
        quiet = False
        chunk = os.read(master, n + (1 if packet else 0))  # n are there: it never waits
        if packet:
            if not chunk or chunk[0] != 0:
                raise OSError(errno.EPROTO, "a packet-mode status byte came with the data")
            chunk = chunk[1:]
        out += chunk


def write_output(master: int, data: bytes, timeout: float = 5.0) -> None:
    """Queue `data` for the master again, byte for byte, as if the slave side had just
    written it: through a slave ckpt opens from the master, with output processing
    (OPOST: \\n → \\r\\n…) off for the write, since the bytes were processed when first
    written. The terminal's modes are put back as they were."""
    slave = peer(master, os.O_RDWR | os.O_NONBLOCK)
    try:
        modes = tcgets(slave)
        raw = None
        if modes and struct.unpack_from("<4I", modes)[1] & OPOST:
            flags = list(struct.unpack_from("<4I", modes))
            flags[1] &= ~OPOST
            raw = struct.pack("<4I", *flags) + modes[16:]
            tcsets(slave, raw)
        try:
            _write_all(slave, data, timeout)
        finally:
            if raw is not None and modes is not None:
                tcsets(slave, modes)
    finally:
        os.close(slave)


def _write_all(fd: int, data: bytes, timeout: float) -> None:
    view, end = memoryview(data), time.monotonic() + timeout
    p = select.poll()
    p.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        if time.monotonic() > end:
            raise OSError(errno.ETIMEDOUT, "the terminal takes no output (stopped with ^S?)")
        p.poll(50)


@dataclass
class PtyUsers:
    """Who uses one pseudo-terminal, host-wide: fds on its master, fds on its slave
    (by its /dev/pts name), and processes whose controlling terminal it is."""

    masters: dict[int, list[int]] = field(default_factory=dict)  # pid → its master fds
    slaves: dict[int, list[int]] = field(default_factory=dict)  # pid → its slave fds
    ctty: list[int] = field(default_factory=list)

    def outside(self, inside: set[int] | frozenset[int]) -> tuple[str, int] | None:
        """The first use by a process not in `inside`: (what, pid), or None."""
        for what, pids in (("master", self.masters), ("slave", self.slaves)):
            for pid in pids:
                if pid not in inside:
                    return what, pid
        return next((("controlling", pid) for pid in self.ctty if pid not in inside), None)


def pty_users(index: int, rdev: int, ident: tuple[int, int]) -> PtyUsers:
    """Every process's use of the pty /dev/pts/`index` (device `rdev`; `ident` the
    slave inode's (st_dev, st_ino)): one pass over /proc. A master fd is one on
    /dev/ptmx whose tty-index is `index`, checked exactly (its slave's inode, through
    ckpt's duplicate and TIOCGPTPEER with O_PATH: another devpts may use the number)."""
    users = PtyUsers()
    name, me = f"/dev/pts/{index}", os.getpid()  # ckpt's own duplicates are not uses
    for entry in os.listdir(procfs.PROC_ROOT):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        with contextlib.suppress(OSError, CkptError, ValueError):
            if job_info(pid).tty == rdev:
                users.ctty.append(pid)
        base = procfs.path(pid, "fd")
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for n in names:
            try:
                link = os.readlink(f"{base}/{n}")
                if link == name:
                    st = os.stat(f"{base}/{n}")
                    if (st.st_dev, st.st_ino) == ident:
                        users.slaves.setdefault(pid, []).append(int(n))
                elif (
                    link in PTMX_PATHS
                    and master_index(pid, int(n)) == index
                    and master_slave_ident(pid, int(n)) == ident
                ):
                    users.masters.setdefault(pid, []).append(int(n))
            except OSError:
                continue
    return users


def master_slave_ident(pid: int, fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the slave of process pid's master fd `fd`."""
    try:
        pfd = pidfd.pidfd_open(pid)
    except OSError:
        return None
    try:
        copy = pidfd.pidfd_getfd(pfd, fd)
    except OSError:
        return None
    finally:
        os.close(pfd)
    try:
        slave = peer(copy, os.O_PATH)
        try:
            st = os.fstat(slave)
            return st.st_dev, st.st_ino
        finally:
            os.close(slave)
    except OSError:
        return None
    finally:
        os.close(copy)


def holds_master(pid: int, start: int, index: int, ident: tuple[int, int]) -> bool:
    """Does process pid, started at `start` (clock ticks after boot), hold a master of
    the pty /dev/pts/`index` whose slave inode is `ident` (st_dev, st_ino)?"""
    try:
        if procfs.stat(pid).starttime != start:
            return False
        fds = procfs.fds(pid)
    except (OSError, CkptError):
        return False
    for fd in fds:
        try:
            link = procfs.readlink(pid, "fd", str(fd))
        except (OSError, CkptError):
            continue
        if (
            link in PTMX_PATHS
            and master_index(pid, fd) == index
            and master_slave_ident(pid, fd) == ident
        ):
            return True
    return False


def open_pts(name: str, flags: int) -> int:
    """ckpt's fd on the pty slave `name` (/dev/pts/N), opened without following any
    symlink and never as ckpt's controlling terminal (O_PATH: its inode only, the
    terminal is not opened)."""
    if flags & os.O_PATH:  # openat2 takes nothing else with O_PATH
        return openat2.open_nofollow(name, os.O_PATH | os.O_CLOEXEC)
    return openat2.open_nofollow(name, (flags & abi.VALID_OPEN_FLAGS) | os.O_NOCTTY | os.O_CLOEXEC)


def open_ptmx(path: str) -> int:
    """A new pty master of ckpt's, through `path` (/dev/ptmx or /dev/pts/ptmx), opened
    without following any symlink and checked on the fd to be the multiplexer."""
    fd = openat2.open_nofollow(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != DEV_PTMX:
        os.close(fd)
        raise OSError(errno.ENODEV, f"{path} is not the pty multiplexer (5:2)")
    return fd
