"""Terminal fds (capture/fds.py dispatches here): only a shell job's, with --shell-job.

A shell job is a process (tree) a shell started on its terminal: its terminal fds
are on its controlling terminal, and its session belongs to the shell. That is the
one case ckpt can bring back faithfully — `ckpt restore --shell-job` connects the
fds to the terminal ckpt itself runs on, in ckpt's session (restore/tty.py).
Refused, naming the fd: a pty master, a session leader's own terminal (a shell, or
a daemon with its own pty), a terminal that is not the process's controlling one,
a session created inside the dumped tree, and every terminal without --shell-job.

Recorded per fd: the terminal, the job's group and whether it was in the
foreground, and the terminal's modes (TCGETS), which the restore puts back.
"""

from __future__ import annotations

import os
import stat as statmod

from ..errors import UnsupportedProcess
from ..kernel import tty as ktty
from ..model import Fd, TtyState
from .fd_kinds import FdScan


def termios_of(scan: FdScan, fd: int, st: os.stat_result) -> bytes | None:
    """The terminal modes of the target's fd `fd`, or None when it is not a terminal."""
    if not statmod.S_ISCHR(st.st_mode):
        return None
    copy = scan.getfd(fd)
    try:
        return ktty.tcgets(copy)
    finally:
        os.close(copy)


class TerminalFd(UnsupportedProcess):
    """A terminal fd that --shell-job would take: the operation's own refusal says how
    (migrate has no --shell-job)."""


def capture(scan: FdScan, rec: Fd, st: os.stat_result, modes: bytes, *, shell_job: bool) -> Fd:
    """Fill `rec` (a terminal fd, fd/path/flags/cloexec set) or refuse it."""
    pid, fd = scan.pid, rec.fd
    job = ktty.job_info(pid)
    rdev = st.st_rdev
    if ktty.is_master(rdev) or rec.path.endswith("/ptmx"):
        raise scan.refuse(
            fd, f"is the master side of a pseudo-terminal ({rec.path}): not supported"
        )
    ctty = ktty.name_of(job.tty) if job.tty else "none"
    name = ktty.name_of(job.tty if rdev == ktty.DEV_TTY and job.tty else rdev, rec.path)
    if job.session == pid and job.tty:
        raise scan.refuse(
            fd,
            f"is the terminal {name}, and process {pid} is the session leader of its "
            f"controlling terminal {ctty} (a shell, or a daemon with its own pty): not "
            "supported; --shell-job takes jobs a shell started, not the session leader",
        )
    if not shell_job:
        raise scan.refuse(
            fd,
            f"is the terminal {name}: taken only with --shell-job (restored as a job of the "
            "terminal `ckpt restore --shell-job` runs on)",
            TerminalFd,
        )
    if not job.tty or (rdev != job.tty and rdev != ktty.DEV_TTY):
        raise scan.refuse(
            fd,
            f"is the terminal {name}, which is not the controlling terminal of process {pid} "
            f"({ctty}): --shell-job re-attaches only the terminal a job was started from",
        )
    if job.session in scan.tree:
        raise scan.refuse(
            fd,
            f"is the terminal {name} of a session that process {job.session} of the dumped "
            "tree created: --shell-job re-attaches only the terminal of the shell that "
            "started the job",
        )
    rec.kind = "tty"
    rec.rdev = rdev
    rec.tty = TtyState(name=name, rdev=job.tty, ctty=True, pgid=job.pgrp,
                       foreground=job.tpgid == job.pgrp, termios=modes)  # fmt: skip
    return rec
