"""Terminal fds (capture/fds.py dispatches here), and a session leader's controlling
terminal (docs/ARCHITECTURE.md "Terminals").

Three shapes are taken:

- **A pty pair inside the dump** (tmux, screen, `script`): a process of the dump holds
  the master (kind "ptmx": the pair's state, PtyState, on its first record), others
  the slave (kind "pts", by obj_id), and a session leader of the dump may have it as
  controlling terminal (a "ctty" record, fd -1). Every user of the pty (master fds,
  slave fds, processes it is the controlling terminal of) must be in the dump. The
  restore makes a new pair (restore/tty.py).
- **The pty of a session the dump leads, its master held outside** (a shell in a
  terminal window, a daemon under sshd): its fds are "pts" records naming the
  terminal (TtyState with its inode's devpts, owner and a process holding its
  master), the leader's "ctty" record likewise; `ckpt restore --reattach-tty` takes
  that same terminal back if it is still there and no other session has it.
- **A shell job** (--shell-job): a process (tree) a shell started on its terminal,
  the session being the shell's (kind "tty"); `ckpt restore --shell-job` connects the
  fds to the terminal ckpt runs on (restore/tty.py).

Refused, naming the fd: another line discipline than N_TTY; bytes typed into a pty
of the dump that its slave side has not read (they cannot be put back exactly); a
packet-mode status byte waiting for the master; a pty master opened elsewhere than
/dev/ptmx or /dev/pts/ptmx; a terminal that is no pty as a session leader's
controlling terminal; a terminal that is not the process's controlling terminal
(outside the dump); every other terminal without --shell-job.

What the slave side wrote and the master has not read yet is kept exactly: read
from the master (consumed), then queued again at once through a slave ckpt opens,
with output processing off for the write, so the original reads it as before if it
runs on (--leave-running, a snapshot, a failed dump).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import stat as statmod
import struct
import time
from dataclasses import dataclass

from ..errors import CkptError, DumpError, UnsupportedProcess
from ..kernel import abi, procfs
from ..kernel import tty as ktty
from ..kernel.pidfd import pidfd_getfd, pidfd_open
from ..model import Fd, PtyState, TtyState
from .fd_kinds import FdScan
from .tree import check_member, descendants

EXTPROC = 0o200000  # c_lflag: a packet-mode master gets TIOCPKT_IOCTL at every TCSETS


def termios_of(scan: FdScan, fd: int, st: os.stat_result) -> bytes | None:
    """The terminal modes of the target's fd `fd`, or None when it is not a terminal.
    Either side of a pty is a terminal even when TCGETS fails (a line discipline that
    does not answer it: capture() refuses that by name)."""
    if not statmod.S_ISCHR(st.st_mode):
        return None
    copy = scan.getfd(fd)
    try:
        modes = ktty.tcgets(copy)
    finally:
        os.close(copy)
    if modes is None and (ktty.is_master(st.st_rdev) or ktty.is_pts(st.st_rdev)):
        return b""
    return modes


class TerminalFd(UnsupportedProcess):
    """A terminal fd that --shell-job would take: the operation's own refusal says how
    (migrate has no --shell-job)."""


def pty_key(index: int) -> int:
    """Fd.obj_id of the pty /dev/pts/`index` (0 means none)."""
    return index + 1


def capture(
    scan: FdScan, rec: Fd, st: os.stat_result, modes: bytes, *, shell_job: bool,
    check_only: bool = False,
) -> Fd:  # fmt: skip
    """Fill `rec` (a terminal fd, fd/path/flags/cloexec set) or refuse it.
    check_only: the preflight's pass (the process runs): no queue is read."""
    pid, fd = scan.pid, rec.fd
    job = ktty.job_info(pid)
    rdev = st.st_rdev
    if ktty.is_master(rdev) or rec.path in ktty.PTMX_PATHS:
        return _master(scan, rec, check_only)
    term = job.tty if rdev == ktty.DEV_TTY and job.tty else rdev
    inside = frozenset({pid, *scan.tree})
    if ktty.is_pts(term):
        _n_tty(scan, fd, f"is the pseudo-terminal {ktty.name_of(term)}")
        try:
            pty = _Pty.of(term)
        except OSError as exc:
            raise scan.refuse(
                fd,
                f"is the pseudo-terminal {ktty.name_of(term)}, which ckpt's /dev/pts does not "
                f"show ({exc}; another devpts instance?): not supported",
            ) from None
        where = f"is the pseudo-terminal {pty.name}"
        masters_in, masters_out = pty.masters(inside)
        if masters_in and masters_out:
            raise scan.refuse(fd, _shared_master(pty, masters_out))
        if masters_in:  # a pair of the dump: made again (restore/tty.py)
            _all_inside(scan, fd, pty, inside)
            rec.kind, rec.rdev, rec.obj_id, rec.pos = "pts", rdev, pty_key(pty.index), 0
            return rec
        if not masters_out:
            raise scan.refuse(fd, f"{where}, whose master was closed (hung up): not supported")
        leader = _leader_of(pty, inside)
        if leader is not None:  # the terminal of a session the dump leads
            rec.kind, rec.rdev, rec.pos = "pts", rdev, 0
            rec.tty = _outside(pty, masters_out, ktty.job_info(leader), modes)
            return rec
    return _shell_job(scan, rec, st, modes, job, shell_job)


def _shell_job(
    scan: FdScan, rec: Fd, st: os.stat_result, modes: bytes, job: ktty.JobInfo, shell_job: bool
) -> Fd:
    pid, fd, rdev = scan.pid, rec.fd, st.st_rdev
    ctty = ktty.name_of(job.tty) if job.tty else "none"
    name = ktty.name_of(job.tty if rdev == ktty.DEV_TTY and job.tty else rdev, rec.path)
    if job.session == pid and job.tty:
        raise scan.refuse(
            fd,
            f"is the terminal {name}, and process {pid} is the session leader of its "
            f"controlling terminal {ctty}, which is not a pseudo-terminal: not supported "
            "(a session's pty is taken; --shell-job takes jobs a shell started)",
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


def _n_tty(scan: FdScan, fd: int, where: str) -> None:
    """The fd's terminal has the line discipline ckpt knows (N_TTY): any other one keeps
    state no call reads back."""
    copy = scan.getfd(fd)
    try:
        disc = ktty.get_int(copy, abi.TIOCGETD)
    finally:
        os.close(copy)
    if disc != abi.N_TTY:
        raise scan.refuse(fd, f"{where} with line discipline {disc}, not N_TTY: not supported")


# ---------------------------------------------------------------- one pseudo-terminal


@dataclass
class _Pty:
    """A pty as the dump finds it: its number, its slave inode, and every user."""

    index: int
    rdev: int
    slave: os.stat_result  # the slave's inode (devpts)
    users: ktty.PtyUsers

    @property
    def name(self) -> str:
        return f"/dev/pts/{self.index}"

    @classmethod
    def of(cls, rdev: int, slave: os.stat_result | None = None) -> _Pty:
        """The pty whose slave is device `rdev` (its inode: `slave`, else looked up in
        /dev/pts, not following symlinks, and checked to be that device)."""
        index = ktty.pts_index(rdev)
        if slave is None:
            slave = os.stat(f"/dev/pts/{index}", follow_symlinks=False)
            if not statmod.S_ISCHR(slave.st_mode) or slave.st_rdev != rdev:
                raise OSError(f"/dev/pts/{index} is not the pty {os.major(rdev)}:{os.minor(rdev)}")
        users = ktty.pty_users(index, rdev, (slave.st_dev, slave.st_ino))
        return cls(index, rdev, slave, users)

    def masters(self, inside: frozenset[int]) -> tuple[list[int], list[int]]:
        """The processes holding its master: (in the dump, outside it)."""
        held = sorted(self.users.masters)
        return [p for p in held if p in inside], [p for p in held if p not in inside]


def _leader_of(pty: _Pty, inside: frozenset[int]) -> int | None:
    """A session leader of the dump whose controlling terminal the pty is, or None."""
    for q in sorted(pty.users.ctty):
        if q in inside:
            with contextlib.suppress(OSError, CkptError):
                if ktty.job_info(q).session == q:
                    return q
    return None


def _shared_master(pty: _Pty, outside: list[int]) -> str:
    return (
        f"is the pseudo-terminal {pty.name}, whose master is also open in process "
        f"{outside[0]} outside the dump: not supported"
    )


def _all_inside(scan: FdScan, fd: int, pty: _Pty, inside: frozenset[int]) -> None:
    """A pair the dump makes again: nobody outside may use it (they would keep the old
    pair, or lose it when the dump kills its master)."""
    found = pty.users.outside(inside)
    if found is None:
        return
    what, other = found
    if what == "master":
        raise scan.refuse(fd, _shared_master(pty, [other]))
    use = "also open in" if what == "slave" else "the controlling terminal of"
    raise scan.refuse(
        fd,
        f"is the pseudo-terminal {pty.name}, {use} process {other} outside the dump: not "
        "supported (the restore makes the pair again for the dump's processes only)",
    )


def _outside(pty: _Pty, holders: list[int], job: ktty.JobInfo, modes: bytes) -> TtyState:
    """The terminal of a session the dump leads, its master held outside: what names it
    again at restore (restore --reattach-tty)."""
    holder = holders[0]
    return TtyState(
        name=pty.name, rdev=pty.rdev, ctty=True, pgid=job.tpgid, foreground=True,
        termios=modes, dev=pty.slave.st_dev, uid=pty.slave.st_uid, gid=pty.slave.st_gid,
        holder=holder, holder_start=procfs.stat(holder).starttime,
    )  # fmt: skip


# ---------------------------------------------------------------- a master of the dump


def _master(scan: FdScan, rec: Fd, check_only: bool) -> Fd:
    """A pty master: the pair's state, everything the kernel lets ckpt read back."""
    pid, fd = scan.pid, rec.fd
    copy = scan.getfd(fd)
    try:
        index = ktty.get_int(copy, abi.TIOCGPTN)
        peer = ktty.peer(copy, os.O_PATH)  # the slave's inode; the terminal is not opened
        try:
            slave = os.fstat(peer)
        finally:
            os.close(peer)
        pty = _Pty.of(slave.st_rdev, slave)
        where = f"is the master of the pseudo-terminal {pty.name}"
        inside = frozenset({pid, *scan.tree})
        _all_inside(scan, fd, pty, inside)
        if rec.path not in ktty.PTMX_PATHS:
            raise scan.refuse(
                fd,
                f"{where}, opened through {rec.path}: not supported (a pair is made again "
                f"through {' or '.join(ktty.PTMX_PATHS)})",
            )
        _n_tty(scan, fd, where)
        if any(fcntl.ioctl(copy, abi.TIOCGLCKTRMIOS, bytes(ktty.TERMIOS_SIZE))):
            raise scan.refuse(
                fd, f"{where}, whose modes are locked (TIOCSLCKTRMIOS): not supported"
            )
        state = PtyState(
            index=index, ptmx=rec.path, termios=ktty.tcgets(copy) or b"",
            winsize=ktty.winsize(copy), locked=bool(ktty.get_int(copy, abi.TIOCGPTLCK)),
            packet=bool(ktty.get_int(copy, abi.TIOCGPKT)),
            excl=bool(ktty.get_int(copy, abi.TIOCGEXCL)), uid=slave.st_uid, gid=slave.st_gid,
            mode=statmod.S_IMODE(slave.st_mode), atime_ns=slave.st_atime_ns,
            mtime_ns=slave.st_mtime_ns,
        )  # fmt: skip
        bits = ktty.poll_bits(copy)
        state.slave_closed = bool(bits & select.POLLHUP)
        _slave_side(scan, fd, pty, inside, state, where, check_only)
        if not check_only:
            _output(scan, fd, copy, state, bits, where)
    except OSError as exc:
        raise DumpError(f"reading the pty master fd {fd} of process {pid} failed: {exc}") from exc
    finally:
        os.close(copy)
    rec.kind, rec.rdev, rec.obj_id, rec.pos, rec.pty = (
        "ptmx", ktty.DEV_PTMX, pty_key(index), 0, state,
    )  # fmt: skip
    return rec


def _slave_side(
    scan: FdScan, fd: int, pty: _Pty, inside: frozenset[int], state: PtyState, where: str,
    check_only: bool,
) -> None:  # fmt: skip
    """The slave's line discipline, exclusive mode and input queue, through a slave fd a
    process of the dump holds (ckpt's duplicate: the same open file description)."""
    slave = _member_slave(pty, inside)
    if slave is None:
        if check_only or state.slave_closed:
            # closed since it was opened: nobody can have queued input it would lose
            # (a reopen reads it, and the restore opens no slave it did not have)
            return
        raise scan.refuse(
            fd,
            f"{where}, whose slave side no process has opened yet: not supported (its input "
            "queue cannot be read without opening it, which the master would notice)",
        )
    try:
        if (disc := ktty.get_int(slave, abi.TIOCGETD)) != abi.N_TTY:
            raise scan.refuse(
                fd, f"{where}, whose slave has line discipline {disc}, not N_TTY: not supported"
            )
        state.slave_excl = bool(ktty.get_int(slave, abi.TIOCGEXCL))
        if check_only:
            return
        typed = ktty.get_int(slave, abi.FIONREAD)
        pending = ktty.get_int(slave, abi.TIOCOUTQ)
        if typed or pending:
            raise scan.refuse(
                fd,
                f"{where}: {typed or pending} bytes written to it wait to be read by its "
                "slave side: not supported (typed input cannot be put back exactly); dump "
                "once the program has read it",
            )
    finally:
        os.close(slave)


def _member_slave(pty: _Pty, inside: frozenset[int]) -> int | None:
    """ckpt's duplicate of a slave fd of a process of the dump, or None."""
    for pid, fds in sorted(pty.users.slaves.items()):
        if pid not in inside:
            continue
        pfd = pidfd_open(pid)
        try:
            return pidfd_getfd(pfd, fds[0])
        finally:
            os.close(pfd)
    return None


def _output(scan: FdScan, fd: int, copy: int, state: PtyState, bits: int, where: str) -> None:
    """What the slave side wrote and the master has not read: read (it is consumed) and
    queued again at once, so the original keeps it too."""
    if state.packet and bits & select.POLLPRI:
        raise scan.refuse(
            fd,
            f"{where} in packet mode, with a status byte (flush, stop, start) waiting to be "
            "read: not supported (no call sets one back)",
        )
    if ktty.get_int(copy, abi.TIOCOUTQ):
        raise scan.refuse(fd, f"{where}, with output waiting in its driver: not supported")
    if not ktty.get_int(copy, abi.FIONREAD):
        time.sleep(0.02)  # the flip buffer's worker, if the slave just wrote
        if not ktty.get_int(copy, abi.FIONREAD):
            return
    lflag = struct.unpack_from("<4I", state.termios)[3] if len(state.termios) >= 16 else 0
    if state.locked or (state.packet and lflag & EXTPROC) or not bits & select.POLLOUT:
        why = (
            "it is locked (TIOCSPTLCK)" if state.locked
            else "packet mode with EXTPROC" if state.packet and lflag & EXTPROC
            else "its output is stopped (^S)"
        )  # fmt: skip
        raise scan.refuse(
            fd,
            f"{where}, with output its master has not read, which cannot be queued again "
            f"({why}): not supported",
        )
    data = ktty.read_output(copy, state.packet)
    try:
        ktty.write_output(copy, data)
    except OSError as exc:
        raise DumpError(
            f"{len(data)} bytes queued for the master of /dev/pts/{state.index} were read, "
            f"but could not be queued again ({exc}): the process may have lost them"
        ) from exc
    scan.charge(fd, "pty", len(data))
    state.output = data


# ---------------------------------------------------------------- controlling terminal


def finish(scan: FdScan, out: list[Fd]) -> None:
    """A session leader whose controlling terminal is a pty: a "ctty" record (fd -1)
    naming it, with the terminal's foreground group (the restore makes it the
    controlling terminal again before the leader's children are forked). Refused: a
    controlling terminal that is no pty, a foreground group outside the dump, and a
    member of the session without that terminal (it would inherit it)."""
    pid = scan.pid
    job = ktty.job_info(pid)
    if job.session != pid or not job.tty:
        return
    name = ktty.name_of(job.tty)
    what = f"process {pid} leads a session whose controlling terminal is {name}"
    if not ktty.is_pts(job.tty):
        raise UnsupportedProcess(f"{what}, which is not a pseudo-terminal: not supported", pid=pid)
    inside = frozenset({pid, *scan.tree})
    try:
        pty = _Pty.of(job.tty)
    except OSError as exc:
        raise UnsupportedProcess(
            f"{what}, which ckpt's /dev/pts does not show ({exc}; another devpts "
            "instance?): not supported",
            pid=pid,
        ) from None
    masters_in, masters_out = pty.masters(inside)
    if masters_in and masters_out:
        raise UnsupportedProcess(f"{what}, whose master is also held by process "
                                 f"{masters_out[0]} outside the dump: not supported", pid=pid)  # fmt: skip
    if not masters_in and not masters_out:
        raise UnsupportedProcess(f"{what}, whose master was closed: not supported", pid=pid)
    _session_members(pid, job, inside, name, what)
    rec = Fd(fd=-1, kind="ctty", path=name, flags=0, cloexec=False, pos=0, rdev=job.tty)
    if masters_in:
        found = pty.users.outside(inside)
        if found is not None:
            raise UnsupportedProcess(
                f"{what}, which process {found[1]} outside the dump uses too: not supported "
                "(the restore makes the pair again for the dump's processes only)",
                pid=pid,
            )
        rec.obj_id = pty_key(pty.index)
        rec.tty = TtyState(name=name, rdev=job.tty, ctty=True, pgid=job.tpgid, foreground=True)
    else:
        other = next((q for q in pty.users.ctty if q not in inside), None)
        if other is not None:
            raise UnsupportedProcess(
                f"{what}, and process {other} of that session is outside the dump: not "
                "supported (dump the whole session)",
                pid=pid,
            )
        modes = next((f.tty.termios for f in out if f.kind == "pts" and f.tty is not None), b"")
        rec.tty = _outside(pty, masters_out, job, modes)
    out.append(rec)


def _session_members(
    pid: int, job: ktty.JobInfo, inside: frozenset[int], name: str, what: str
) -> None:
    """The terminal's foreground group is one of the dump's; every member of the session
    in the dump has its controlling terminal; none outside it has."""
    groups: dict[int, int] = {}
    for q in sorted(inside):
        try:
            qj = ktty.job_info(q)
        except (OSError, CkptError):
            continue  # exited meanwhile: the freeze looks again
        groups[q] = qj.pgrp
        if qj.session == pid and qj.tty != job.tty:
            raise UnsupportedProcess(
                f"{what}, and process {q} of that session does not have it (it was forked "
                "before the terminal was taken, or gave it up): not supported",
                pid=pid,
            )
    if job.tpgid not in groups.values():
        raise UnsupportedProcess(
            f"{what}, and its foreground process group {job.tpgid} is not one of the dump's: "
            "not supported",
            pid=pid,
        )


def outside_terminal(pid: int, *, tree: bool = True) -> str | None:
    """For a migration, which cannot take it: a session the dump would lead whose
    controlling pty has its master outside the dump (restore --reattach-tty takes it
    back on this host only). None when there is none."""
    members = [pid, *(p for p in descendants(pid) if not check_member(p, pid))] if tree else [pid]
    inside = frozenset(members)
    for q in members:
        try:
            job = ktty.job_info(q)
            if job.session != q or not ktty.is_pts(job.tty):
                continue
            _, masters_out = _Pty.of(job.tty).masters(inside)
        except (OSError, CkptError):
            continue  # exited meanwhile, or refused by the preflight in its own words
        if masters_out:
            return (
                f"process {q} leads a session whose controlling terminal {ktty.name_of(job.tty)} "
                f"belongs to a terminal outside the dump (its master is held by process "
                f"{masters_out[0]})"
            )
    return None
