"""Terminals at restore (docs/ARCHITECTURE.md "Terminals").

Pty pairs of the image are made again (Ptys: ckpt holds each new master for the whole
restore); a session leader takes its controlling pty right after its setsid
(attach_ctty), the foreground group is set once every group exists (foreground); a
session's terminal outside the image is taken back only with --reattach-tty, checked
to be the same terminal on the fd ckpt opened.

`ckpt restore --shell-job`: a shell job comes back on the terminal ckpt runs on.

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
import errno
import fcntl
import os
import signal
import stat as statmod
import struct

from ..errors import ImageCorrupt, NoTerminal, RestoreError, UsageError
from ..kernel import abi, procfs, syscalls
from ..kernel import tty as ktty
from ..kernel.remote import Injector, RemoteError
from ..model import Fd, ProcessImage, PtyState, TtyState
from . import hostfs


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


def check_image(procs: list[ProcessImage], shell_job: bool, reattach_tty: bool = False) -> None:
    """An image with terminal fds restores only as a shell job; one whose session has
    a terminal outside the image only with --reattach-tty, while that terminal is
    still there and no other session has it (before anything is built)."""
    found = tty_fds(procs)
    if found and not shell_job:
        p, f = found[0]
        name = f.tty.name if f.tty else f.path
        raise UsageError(
            f"fd {f.fd} of process {p.pid} is the terminal {name}: restore with --shell-job "
            "(the job then runs on the terminal ckpt runs on)"
        )
    outside = outside_terminals(procs)
    if outside and not reattach_tty:
        p, f = outside[0]
        t = f.tty
        what = "the controlling terminal" if f.kind == "ctty" else f"fd {f.fd}"
        raise UsageError(
            f"{what} of process {p.pid} is {t.name}, a terminal outside the image (its master "
            f"was held by process {t.holder}): restore with --reattach-tty to take that same "
            "terminal back, if it is still open and no other session has it"
        )
    for p, f in outside:
        if f.kind == "ctty":
            reattach_check(p, f.tty)


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


# ---------------------------------------------------------------- pseudo-terminals


def ctty_record(proc: ProcessImage) -> Fd | None:
    """A session leader's controlling pty (capture/tty.py finish), or None."""
    return next((f for f in proc.fds if f.kind == "ctty"), None)


def outside_terminals(procs: list[ProcessImage]) -> list[tuple[ProcessImage, Fd]]:
    """The records of a terminal outside the image that a session of it had (a pty whose
    master another process held: a terminal window, sshd)."""
    return [
        (p, f) for p in procs for f in p.fds
        if f.kind in ("pts", "ctty") and not f.obj_id and f.tty is not None
    ]  # fmt: skip


class Ptys:
    """The image's pty pairs, made again, one new pair per pty (a new /dev/pts number).

    ckpt itself opens the multiplexer (openat2 without symlinks, checked on the fd) and
    holds every new master for the whole restore: a session leader needs its slave
    before its children are forked (they inherit the controlling terminal), when its
    restorer has no memory of its own yet to pass a path from, while the master's holder
    gets its fds later, after restore_fds closed every fd the image does not name. The
    restorers run with ckpt's root, mount namespace and credentials until the very end
    of their rebuild, so the pair is the one they would have opened. Each takes what it
    needs from ckpt with pidfd_getfd; slaves are opened by number from the master
    (TIOCGPTPEER), never by path."""

    def __init__(self, procs: list[ProcessImage], reattach: bool = False):
        self.states: dict[int, tuple[PtyState, int]] = {
            f.obj_id: (f.pty, f.flags) for p in procs for f in p.fds
            if f.kind == "ptmx" and f.pty is not None
        }  # fmt: skip
        self.masters: dict[int, int] = {}  # obj_id → ckpt's fd of the new master
        self.reattach = reattach

    def master(self, key: int) -> int:
        """ckpt's fd of the new master of pty `key`, made and set up on first use."""
        if key in self.masters:
            return self.masters[key]
        got = self.states.get(key)
        if got is None:
            raise ImageCorrupt(f"pty {key} is named but the image does not hold its master")
        st = got[0]
        try:
            fd = ktty.open_ptmx(st.ptmx)
        except OSError as exc:
            raise RestoreError(
                f"cannot make a pseudo-terminal again for /dev/pts/{st.index}: {st.ptmx}: "
                f"{exc.strerror or exc}"
            ) from exc
        self.masters[key] = fd
        try:
            _configure(fd, st)
        except OSError as exc:
            raise RestoreError(
                f"cannot set up the new pseudo-terminal for /dev/pts/{st.index}: {exc}"
            ) from exc
        return fd

    def finish(self) -> None:
        """Once every slave is open (the lock makes further opens fail): the slave's
        exclusive mode, then the lock."""
        for key, fd in self.masters.items():
            st = self.states[key][0]
            try:
                if st.slave_excl:
                    slave = ktty.peer(fd, os.O_RDWR | os.O_NONBLOCK)
                    try:
                        fcntl.ioctl(slave, abi.TIOCEXCL)
                    finally:
                        os.close(slave)
                if st.locked:
                    ktty.set_int(fd, abi.TIOCSPTLCK, 1)
            except OSError as exc:
                raise RestoreError(
                    f"cannot lock the pseudo-terminal /dev/pts/{st.index}: {exc}"
                ) from exc

    def close(self) -> None:
        for fd in self.masters.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.masters.clear()


def _configure(fd: int, st: PtyState) -> None:
    """Everything of the pair that is not a process's: unlocked for the slaves to open,
    the slave's modes and window size (before any session has it: no SIGWINCH), the
    output the master had not read (written through a slave with output processing
    off), the slave's owner, mode and times, the master's exclusive mode, packet mode
    last (its status bytes start empty, as TIOCPKT makes them)."""
    ktty.set_int(fd, abi.TIOCSPTLCK, 0)
    ktty.tcsets(fd, st.termios)  # through the master: the slave's termios
    ktty.set_winsize(fd, st.winsize)
    if st.output:
        ktty.write_output(fd, st.output)
    elif st.slave_closed:  # its slave was opened and closed: the master reads EOF (EIO)
        os.close(ktty.peer(fd, os.O_RDWR | os.O_NONBLOCK))
    inode = ktty.peer(fd, os.O_PATH)  # the slave's devpts inode, not the terminal
    try:
        where = procfs.fd_path(os.getpid(), inode)
        os.chown(where, st.uid, st.gid)
        os.chmod(where, st.mode)
        os.utime(where, ns=(st.atime_ns, st.mtime_ns))
    finally:
        os.close(inode)
    if st.excl:
        fcntl.ioctl(fd, abi.TIOCEXCL)
    if st.packet:
        ktty.set_int(fd, abi.TIOCPKT, 1)


def _take_mine(inj: Injector, mine: int) -> int:
    """ckpt's fd `mine` into the restorer (the same open file description): its fd."""
    pidfd = syscalls.pidfd_open(inj, os.getpid(), 0)
    try:
        return syscalls.pidfd_getfd(inj, pidfd, mine, 0)
    finally:
        syscalls.close(inj, pidfd)


def _place(inj: Injector, tmp: int, fd: Fd) -> None:
    if tmp != fd.fd:
        syscalls.dup3(inj, tmp, fd.fd, abi.O_CLOEXEC if fd.cloexec else 0)
        syscalls.close(inj, tmp)
    else:
        syscalls.fcntl(inj, fd.fd, abi.F_SETFD, abi.FD_CLOEXEC if fd.cloexec else 0)


SETFL_KEPT = abi.O_APPEND | abi.O_NONBLOCK  # what F_SETFL puts back (O_ASYNC: with its owner)
OPEN_DROP = abi.O_CREAT | abi.O_EXCL | abi.O_TRUNC | abi.O_CLOEXEC


def restore_ptmx(ctx, fd: Fd) -> None:
    """restore/fds.py KINDS["ptmx"]: the new master's description (ckpt made it)."""
    inj: Injector = ctx.inj
    _place(inj, _take_mine(inj, ctx.ptys.master(fd.obj_id)), fd)
    if fd.flags & SETFL_KEPT:
        syscalls.fcntl(inj, fd.fd, abi.F_SETFL, fd.flags & SETFL_KEPT)


def restore_pts(ctx, fd: Fd) -> None:
    """restore/fds.py KINDS["pts"]: a slave description of a pair of the image, opened by
    number from its new master (TIOCGPTPEER, with the fd's flags); /dev/tty opened again
    (the process has its controlling terminal by now); a terminal outside the image,
    opened by ckpt by its name (no symlink followed) and checked on that fd to be the
    same terminal (restore --reattach-tty)."""
    inj: Injector = ctx.inj
    flags = (fd.flags & abi.VALID_OPEN_FLAGS & ~OPEN_DROP) | abi.O_NOCTTY
    what = f"process {ctx.proc.pid}: fd {fd.fd}"
    if fd.rdev == ktty.DEV_TTY:
        tmp = hostfs.open_checked(
            inj, "/dev/tty", flags, f"{what} (its controlling terminal)", fmt=statmod.S_IFCHR,
            rdev=ktty.DEV_TTY,
        )  # fmt: skip
        _place(inj, tmp, fd)
        return
    if fd.obj_id:
        master = _take_mine(inj, ctx.ptys.master(fd.obj_id))
        try:
            tmp = syscalls.ioctl(inj, master, abi.TIOCGPTPEER, flags)
        finally:
            syscalls.close(inj, master)
        _place(inj, tmp, fd)
        return
    if not ctx.ptys.reattach:
        raise RestoreError(f"{what} is the terminal {fd.tty.name}: restore with --reattach-tty")
    mine = _open_outside(ctx.proc, fd.tty, (flags & ~abi.O_NOCTTY) | abi.O_NONBLOCK, what)
    try:
        _place(inj, _take_mine(inj, mine), fd)
    finally:
        os.close(mine)
    syscalls.fcntl(inj, fd.fd, abi.F_SETFL, fd.flags & SETFL_KEPT)


def restore_ctty(ctx, fd: Fd) -> None:
    """restore/fds.py KINDS["ctty"]: nothing (fd -1): the session leader took its
    controlling terminal when it made its session (attach_ctty)."""


def _open_outside(proc: ProcessImage, t: TtyState, flags: int, what: str) -> int:
    """ckpt's fd on the outside terminal `t`, checked on that fd to be the dumped one:
    the same device in the same devpts, the same owner, and its master still held by
    the process that held it at the dump (a pty number is reused as soon as a master
    closes; the holder's master fd is the proof it is the same terminal)."""
    try:
        mine = ktty.open_pts(t.name, flags)
    except OSError as exc:
        raise RestoreError(
            f"process {proc.pid}: {what}: the terminal {t.name} is gone ({exc.strerror}): it "
            "cannot be taken back"
        ) from exc
    try:
        st = os.fstat(mine)
        ident = (st.st_dev, st.st_ino)
        same = (
            statmod.S_ISCHR(st.st_mode) and (st.st_rdev, st.st_dev) == (t.rdev, t.dev)
            and (t.uid < 0 or st.st_uid == t.uid) and (t.gid < 0 or st.st_gid == t.gid)
        )  # fmt: skip
        if not same or not ktty.holds_master(
            t.holder, t.holder_start, ktty.pts_index(t.rdev), ident
        ):
            raise RestoreError(
                f"process {proc.pid}: {what}: {t.name} is not the terminal it had (its master "
                f"is no longer held by process {t.holder}, or its device or owner changed): "
                "not taken"
            )
    except BaseException:
        os.close(mine)
        raise
    return mine


def reattach_check(proc: ProcessImage, t: TtyState) -> None:
    """Before anything is built: the outside terminal of a session is there, the same,
    and nobody has it as controlling terminal (the kernel checks that again, atomically,
    when the leader takes it: TIOCSCTTY never steals)."""
    # O_PATH: the inode only, the terminal is not opened (its master sees nothing)
    mine = _open_outside(proc, t, abi.O_PATH, "its controlling terminal")
    try:
        st = os.fstat(mine)
        users = ktty.pty_users(ktty.pts_index(t.rdev), t.rdev, (st.st_dev, st.st_ino))
    finally:
        os.close(mine)
    if users.ctty:
        raise RestoreError(
            f"process {proc.pid}: its controlling terminal {t.name} is now the controlling "
            f"terminal of process {users.ctty[0]}'s session: not taken (end that session, "
            "or restore elsewhere)"
        )


def attach_ctty(inj: Injector, proc: ProcessImage, ptys: Ptys | None) -> None:
    """A session leader, right after setsid and before its children are forked (they
    inherit it), takes its controlling pty again: a slave of the new pair opened from
    its master, or the outside terminal (restore --reattach-tty, checked on ckpt's fd);
    TIOCSCTTY with 0, which never takes a terminal from another session. The temporary
    fd is closed again (the terminal stays the session's)."""
    rec = ctty_record(proc)
    if rec is None or rec.tty is None:
        return
    name = rec.tty.name
    if ptys is None:  # the staged restore (a migration) builds one process, no tree
        raise RestoreError(
            f"process {proc.pid}: its controlling terminal {name} is not taken by a staged "
            "restore: migrate it as an image (ckpt dump, then ckpt restore)"
        )
    if rec.obj_id:
        master = _take_mine(inj, ptys.master(rec.obj_id))
        try:
            slave = syscalls.ioctl(inj, master, abi.TIOCGPTPEER, abi.O_RDWR | abi.O_NOCTTY)
        finally:
            syscalls.close(inj, master)
        name = f"the new pseudo-terminal for {name}"
    else:
        if not ptys.reattach:
            raise RestoreError(
                f"process {proc.pid}: its controlling terminal {name} is outside the image: "
                "restore with --reattach-tty"
            )
        mine = _open_outside(proc, rec.tty, abi.O_RDWR | abi.O_NONBLOCK, "its controlling terminal")
        try:
            slave = _take_mine(inj, mine)
            if rec.tty.termios:  # the session's modes (a shell's raw line editing…)
                ktty.tcsets(mine, rec.tty.termios)
        finally:
            os.close(mine)
    try:
        syscalls.ioctl(inj, slave, abi.TIOCSCTTY, 0)
    except RemoteError as exc:
        raise RestoreError(
            f"process {proc.pid}: cannot make {name} its controlling terminal again: "
            f"{exc.strerror}" + (" (another session has it)" if exc.errno == errno.EPERM else "")
        ) from exc
    finally:
        syscalls.close(inj, slave)


def foreground(rbs: list, made: list) -> None:
    """Once every process group exists: each session leader with a controlling pty makes
    the dumped foreground group the terminal's again (TIOCSPGRP through /dev/tty: only
    a process of the session may), that group as restored (its PID with --new-pid)."""
    groups = {rb.proc.pgid: rb.pid for rb in rbs} | {m.image.pgid: m.pid for m in made}
    for rb in rbs:
        rec = ctty_record(rb.proc)
        if rec is None or rec.tty is None or rb.proc.sid != rb.proc.pid:
            continue
        member = groups.get(rec.tty.pgid)
        if member is None:
            raise ImageCorrupt(
                f"process {rb.proc.pid}: the foreground group {rec.tty.pgid} of its terminal "
                "is no group of the image"
            )
        pgid = os.getpgid(member)
        inj: Injector = rb.inj
        inj.reset_data()
        tty = hostfs.open_checked(
            inj, "/dev/tty", abi.O_RDWR | abi.O_NOCTTY | abi.O_CLOEXEC,
            f"process {rb.proc.pid}: its controlling terminal", fmt=statmod.S_IFCHR,
            rdev=ktty.DEV_TTY,
        )  # fmt: skip
        try:
            syscalls.ioctl(inj, tty, abi.TIOCSPGRP, inj.put(struct.pack("i", pgid)))
        except RemoteError as exc:
            raise RestoreError(
                f"process {rb.proc.pid}: cannot make group {pgid} the foreground group of "
                f"{rec.tty.name} again: {exc.strerror}"
            ) from exc
        finally:
            syscalls.close(inj, tty)
