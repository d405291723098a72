"""`ckpt restore --shell-job`: a shell job comes back on the terminal ckpt runs on.

ckpt acts as the job's shell. Before anything is built it finds its own
controlling terminal among its stdin, stdout and stderr (no terminal: NoTerminal,
exit 16, nothing touched). The restorer is forked from ckpt, so the restored
process is already in ckpt's session: the root does not setsid, it makes a
process group of its own (tree members keep the tree's groups; one led from
outside the tree joins the root's). Each terminal fd is opened anew on ckpt's
terminal, with the dumped flags (fds that shared an open file description still
share one). Before the job runs, ckpt puts the job's terminal modes (TCGETS at
the dump) on the terminal and makes the job's group the foreground group
(tcsetpgrp), so it can read; when `ckpt restore` waits and the job exits, ckpt
takes the foreground back and puts its own modes back, as a shell does.
A stopped job (^Z) stops ckpt too; when ckpt is continued in the foreground
(`fg`) the job gets the terminal back and is continued.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat as statmod

from ..errors import NoTerminal, RestoreError, UsageError
from ..kernel import abi, procfs, syscalls
from ..kernel import tty as ktty
from ..kernel.remote import Injector
from ..model import Fd, ProcessImage


class Terminal:
    """ckpt's controlling terminal, through a close-on-exec duplicate of one of its std fds."""

    def __init__(self, fd: int, rdev: int, pgrp: int):
        self.fd = fd
        self.rdev = rdev
        self.name = ktty.name_of(rdev, os.ttyname(fd))
        self.pgrp = pgrp  # ckpt's own group: the foreground goes back to it
        self.saved = ktty.tcgets(fd) or b""  # ckpt's modes, put back with the foreground
        self.job: int | None = None  # the group the foreground was handed to

    @classmethod
    def find(cls) -> Terminal:
        me = ktty.job_info("self")
        if not me.tty:
            raise NoTerminal(
                "--shell-job needs a terminal: ckpt has no controlling terminal (run "
                "`ckpt restore --shell-job` from a shell on the terminal the job should use)"
            )
        for std in (0, 1, 2):
            try:
                st = os.fstat(std)
            except OSError:
                continue
            if statmod.S_ISCHR(st.st_mode) and st.st_rdev in (me.tty, ktty.DEV_TTY):
                # Writing to the terminal or setting it from outside its foreground group
                # must not stop ckpt (TOSTOP): SIGTTOU stays blocked in ckpt from here on.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
                return cls(fcntl.fcntl(std, fcntl.F_DUPFD_CLOEXEC, 3), me.tty, me.pgrp)
        raise NoTerminal(
            f"--shell-job needs a terminal: none of ckpt's stdin, stdout and stderr is its "
            f"controlling terminal {ktty.name_of(me.tty)}"
        )

    @property
    def path(self) -> str:
        """Where a restored process opens the terminal: exactly the one ckpt holds."""
        return procfs.fd_path(os.getpid(), self.fd)

    def hand_over(self, pgid: int, modes: bytes | None) -> None:
        """The job's modes on the terminal, then its group in the foreground."""
        try:
            if modes:
                ktty.tcsets(self.fd, modes)
            ktty.tcsetpgrp(self.fd, pgid)
        except OSError as exc:
            raise RestoreError(f"cannot hand the terminal {self.name} to the job: {exc}") from exc
        self.job = pgid

    def take_back(self) -> bytes | None:
        """The foreground and ckpt's modes back (best effort: the terminal may be gone);
        returns the job's modes as they were."""
        if self.job is None:
            return None
        self.job = None
        modes = ktty.tcgets(self.fd)
        with contextlib.suppress(OSError):
            ktty.tcsetpgrp(self.fd, self.pgrp)
        if self.saved:
            with contextlib.suppress(OSError):
                ktty.tcsets(self.fd, self.saved)
        return modes

    def wait_job(self, pid: int) -> int:
        """Wait for the job's root to end (its wait status); pass a stop on to ckpt's shell."""
        while True:
            try:
                _, status = os.waitpid(pid, os.WUNTRACED)
            except ChildProcessError:
                self.take_back()
                return 0
            if not os.WIFSTOPPED(status):
                self.take_back()
                return status
            job = self.job if self.job is not None else pid
            modes = self.take_back()
            os.kill(os.getpid(), signal.SIGSTOP)  # ckpt's shell sees its job stop
            # continued: in the foreground (`fg`) the job gets the terminal back
            with contextlib.suppress(OSError):
                if ktty.tcgetpgrp(self.fd) == self.pgrp:
                    self.hand_over(job, modes)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job, signal.SIGCONT)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- the image


def tty_fds(procs: list[ProcessImage]) -> list[tuple[ProcessImage, Fd]]:
    return [(p, f) for p in procs for f in p.fds if f.kind == "tty"]


def check_image(procs: list[ProcessImage], shell_job: bool) -> None:
    """An image with terminal fds restores only as a shell job."""
    found = tty_fds(procs)
    if found and not shell_job:
        p, f = found[0]
        name = f.tty.name if f.tty else f.path
        raise UsageError(
            f"fd {f.fd} of process {p.pid} is the terminal {name}: restore with --shell-job "
            "(the job then runs on the terminal ckpt runs on)"
        )


def job_modes(procs: list[ProcessImage]) -> bytes | None:
    """The terminal modes the job had at the dump (the root's first terminal fd first)."""
    return next((f.tty.termios for _, f in tty_fds(procs) if f.tty and f.tty.termios), None)


# ---------------------------------------------------------------- the fds


def restore_tty(ctx, fd: Fd) -> None:
    """restore/fds.py KINDS["tty"]: open ckpt's terminal (or /dev/tty) at fd.fd."""
    term: Terminal | None = ctx.terminal
    if term is None:
        raise RestoreError(f"fd {fd.fd} is a terminal: restore with --shell-job")
    inj: Injector = ctx.inj
    path = "/dev/tty" if fd.rdev == ktty.DEV_TTY else term.path
    flags = (fd.flags & ~(abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC)) | abi.O_NOCTTY
    tmp = syscalls.openat(inj, abi.AT_FDCWD & 0xFFFFFFFFFFFFFFFF, inj.cstr(path), flags, 0)
    if tmp != fd.fd:
        syscalls.dup3(inj, tmp, fd.fd, abi.O_CLOEXEC if fd.cloexec else 0)
        syscalls.close(inj, tmp)
    elif fd.cloexec:
        syscalls.fcntl(inj, fd.fd, abi.F_SETFD, abi.FD_CLOEXEC)
