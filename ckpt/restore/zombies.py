"""Zombies of a process tree: children that had exited and were not waited for yet.

A zombie is only a PID, its links (parent, process group, session) and the status its
parent's wait will read (capture/tree.py). Each is forked from its restored parent's
restorer with clone3 + set_tid like any member (Rebuilder.fork_child), before the
parent's memory is built (it needs none; after it when its session needs a stand-in:
restore/sessions.py), and then, once the process groups exist, made to exit the way
the original did:

- exit(code): exit_group(code) from the scratch area's `syscall` instruction;
- killed by signal N: the signal's default action (dispositions reset, mask cleared)
  with the process made non-dumpable, so no core is written whatever core_pattern says
  and the status has no core bit; killed by N with a core dump (WCOREDUMP): the core bit
  is only ever set by a core that was really written, so it writes one, of nothing but
  the scratch page (everything else unmapped), into a private directory that is removed
  afterwards. That needs a core_pattern that is a plain file name (relative to the
  process's directory: no pipe, no socket, no path) and a hard RLIMIT_CORE that allows
  a page or more; otherwise the restore is refused before anything is built.

It leads its process group (or session) again if it did, joins the group of another
member, and only then exits (restore/sessions.py make_groups). Its credentials (uids,
gids) are set before it exits (a zombie still counts against its user's processes).

The parent restorer collects nothing: it reads the status with an injected
waitid(WNOWAIT), which leaves the zombie in place, checks it is the dumped one, and
takes back the exit signal (SIGCHLD) the exit queued for it, with rt_sigtimedwait, so
that its pending signals are exactly the dumped ones (restored later). The process
then finds its zombie as it left it, and reaps it with the same status.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import struct
import tempfile
from dataclasses import dataclass

from ..errors import ImageCorrupt, RestoreError
from ..kernel import abi, procfs, syscalls
from ..kernel.ptrace import PTRACE_O_EXITKILL, PTRACE_O_TRACESYSGOOD, Tracee
from ..kernel.remote import Injector, RemoteError
from ..model import ProcessImage, Zombie

CORE_PATTERN = ("sys", "kernel", "core_pattern")  # under /proc: procfs.system(*CORE_PATTERN)
MIN_CORE = 1 << 20  # a core of the scratch area alone is far smaller
DEATH_TIMEOUT = 30.0  # seconds for a zombie to die once let go (it runs one instruction)


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def expected(status: int) -> tuple[int, int]:
    """(si_code, si_status) a waitid reports for this wait status."""
    sig = status & 0x7F
    if not sig:
        return abi.CLD_EXITED, (status >> 8) & 0xFF
    return (abi.CLD_DUMPED if status & 0x80 else abi.CLD_KILLED), sig


def check(root: ProcessImage, member_pids: set[int]) -> None:
    """Before anything is built: every zombie belongs to a member, has a status a
    process can die with, and, dumped core, can dump one here (see the module doc)."""
    seen: set[int] = set()
    for z in root.zombies:
        if z.ppid not in member_pids or z.pid in member_pids or z.pid in seen:
            raise ImageCorrupt(f"zombie {z.pid}: its parent {z.ppid} is not in the tree")
        seen.add(z.pid)
        sig = z.status & 0x7F
        if not z.status_ok():
            raise ImageCorrupt(f"zombie {z.pid}: {z.status:#x} is not a status to die with")
        if not 0 <= z.exit_signal <= 64 or {len(z.uids), len(z.gids)} - {0, 4}:
            raise ImageCorrupt(f"zombie {z.pid}: exit signal or ids out of range")
        if sig and z.status & 0x80:
            _check_core(z)


def _check_core(z: Zombie) -> None:
    why = ""
    pattern = _core_pattern()
    if pattern is None:
        why = f"{procfs.system(*CORE_PATTERN)} is unreadable"
    elif not pattern or pattern[0] in "|@" or "/" in pattern:
        why = f"this host's core_pattern is {pattern!r}, not a plain file name"
    else:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        if hard != resource.RLIM_INFINITY and hard < MIN_CORE:
            why = f"the hard RLIMIT_CORE is {hard}"
    if why:
        raise RestoreError(
            f"zombie {z.pid} ({z.comm.decode(errors='replace')}) was killed by signal "
            f"{z.status & 0x7F} and dumped core; its wait status says so only if a core is "
            f"really written, which ckpt does into a private directory, but {why}"
        )


def _core_pattern() -> str | None:
    try:
        with open(procfs.system(*CORE_PATTERN)) as f:
            return f.read().strip()
    except OSError:
        return None


@dataclass
class Made:
    """A zombie-to-be: a stopped, traced child of its parent's restorer."""

    image: Zombie
    parent: object  # the parent's Rebuilder
    tracee: Tracee
    inj: Injector
    mem_fd: int
    done: bool = False

    @property
    def pid(self) -> int:
        return self.tracee.pid


def fork(parent, z: Zombie, new_pid: bool, forker=None) -> Made:
    """Fork the zombie from its parent's restorer (the parent's session is made by
    then: restore/sessions.py), or from `forker`, a stand-in of its session that forks
    it as the parent's child; it leads its session or group again at once."""
    tr = (forker or parent).fork_child(None if new_pid else z.pid, z.exit_signal)
    mem_fd = -1
    try:
        tr.set_options(PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL)
        mem_fd = procfs.open_file(tr.pid, "mem", os.O_RDWR)
        inj = Injector(tr, tr.getregs(), mem_fd)
        inj.scratch = parent.inj.scratch  # inherited at the same address
        inj.use(parent.inj.scratch.addr)
        made = Made(z, parent, tr, inj, mem_fd)
        cfg = tr.rseq_config()  # the restorer's, inherited: its memory may go (core)
        if cfg is not None:
            syscalls.rseq(inj, cfg.ptr, cfg.size, abi.RSEQ_FLAG_UNREGISTER, cfg.signature)
        inj.reset_data()
        syscalls.prctl(inj, abi.PR_SET_NAME, inj.cstr(z.comm[:15]), 0, 0, 0)
        if z.sid == z.pid:
            syscalls.setsid(inj)
        elif z.pgid == z.pid:
            syscalls.setpgid(inj, 0, 0)
    except BaseException:
        _kill(tr)
        if mem_fd >= 0:
            os.close(mem_fd)
        raise
    return made


def exit_all(made: list[Made]) -> None:
    """Make each zombie exit as it did; its parent reads the status (WNOWAIT) and takes
    back the exit signal. Runs after the process groups are made, before the parents'
    signals are restored."""
    for m in made:
        _exit_one(m)


def _exit_one(m: Made) -> None:
    z, inj, tr = m.image, m.inj, m.tracee
    code, want = expected(z.status)
    sig = z.status & 0x7F
    core_dir = None
    pidfd = -1
    try:
        inj.reset_data()
        if sig:
            syscalls.rt_sigaction(inj, sig, inj.put(bytes(32)), 0, 8)  # SIG_DFL
        if code == abi.CLD_DUMPED:
            core_dir = _prepare_core(m)
        _set_ids(inj, z)
        if sig:  # dumpable again after setresuid cleared it, or never: then no core is
            # written whatever core_pattern and RLIMIT_CORE say, and the status has no bit
            syscalls.prctl(inj, abi.PR_SET_DUMPABLE, 1 if code == abi.CLD_DUMPED else 0, 0, 0, 0)
        # the parent: SIGCHLD not ignored (that would reap the zombie at once)
        parent = m.parent.inj
        parent.reset_data()
        syscalls.rt_sigaction(parent, abi.SIGCHLD, parent.put(bytes(32)), 0, 8)
        pidfd = os.pidfd_open(m.pid)
        if sig:
            tr.set_sigmask(0)
            os.kill(m.pid, sig)  # pending; taken (default action) once let go
        else:
            regs = dict(inj.template)
            regs.update(rip=inj.insn, rax=abi.NR_EXIT_GROUP, orig_rax=_u(-1), rdi=want)
            tr.setregs(regs)
        tr.detach()
        if not select.select([pidfd], [], [], DEATH_TIMEOUT)[0]:
            raise RestoreError(f"zombie {z.pid} did not exit")
        _collect_status(m, code, want)
        m.done = True
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        if core_dir is not None:
            shutil.rmtree(core_dir, ignore_errors=True)
        close(m)


def _set_ids(inj: Injector, z: Zombie) -> None:
    """Its uids and gids (real, effective, saved, fs), gids first (as root)."""
    if len(z.gids) == 4:
        syscalls.setresgid(inj, z.gids[0], z.gids[1], z.gids[2])
        syscalls.setfsgid(inj, z.gids[3])
    if len(z.uids) == 4:
        syscalls.setresuid(inj, z.uids[0], z.uids[1], z.uids[2])
        if z.uids[3] != z.uids[1]:  # setresuid set the fs uid to the effective one
            syscalls.setfsuid(inj, z.uids[3])


def _prepare_core(m: Made) -> str:
    """A core the kernel can write (so the status gets its core bit) of almost nothing:
    the zombie keeps only the scratch area, in a directory of its own that its fs uid
    owns (entered while still root)."""
    z, inj = m.image, m.inj
    d = tempfile.mkdtemp(prefix=f"ckpt-core-{z.pid}-")
    uid = z.uids[3] if len(z.uids) == 4 else os.getuid()
    gid = z.gids[3] if len(z.gids) == 4 else os.getgid()
    inj.reset_data()
    # entered while only root can change it: once it is the user's, the user could
    # rename it away and put a symlink at its name (docs/SECURITY.md)
    syscalls.chdir(inj, inj.cstr(d))
    os.chown(d, uid, gid)
    old = inj.alloc(16)
    syscalls.prlimit64(inj, 0, abi.RLIMIT_CORE, 0, old)
    _, hard = struct.unpack("<QQ", inj.read(old, 16))
    syscalls.prlimit64(inj, 0, abi.RLIMIT_CORE, inj.put(struct.pack("<QQ", hard, hard)), 0)
    s = inj.scratch
    syscalls.munmap(inj, 0, s.addr)
    syscalls.munmap(inj, s.addr + s.size, abi.TASK_SIZE - (s.addr + s.size))
    return d


def _collect_status(m: Made, code: int, want: int) -> None:
    """waitid(WNOWAIT) in the parent: the zombie stays; its exit signal is taken back."""
    z, parent = m.image, m.parent.inj
    parent.reset_data()
    info = parent.alloc(128)
    options = abi.WEXITED | abi.WNOHANG | abi.WNOWAIT | abi.WALL
    syscalls.waitid(parent, abi.P_PID, m.pid, info, options, 0)
    _, _, si_code, _, si_pid, _, si_status = struct.unpack_from("<7i", parent.read(info, 28))
    if si_pid != m.pid or (si_code, si_status) != (code, want):
        raise RestoreError(
            f"zombie {z.pid} came back with waitid code {si_code} status {si_status}, "
            f"not code {code} status {want} (wait status {z.status:#x})"
        )
    if z.exit_signal:
        sigset = parent.put(struct.pack("<Q", 1 << (z.exit_signal - 1)))
        ts = parent.put(bytes(16))
        try:
            syscalls.rt_sigtimedwait(parent, sigset, 0, ts, 8)
        except RemoteError as exc:
            if exc.errno != 11:  # EAGAIN: not queued (ignored by the parent)
                raise


def close(m: Made) -> None:
    if m.mem_fd >= 0:
        os.close(m.mem_fd)
        m.mem_fd = -1


def kill_all(made: list[Made]) -> None:
    """A failed restore: the zombies-to-be go with the rest (their exit is collected by
    ckpt, their tracer, which hands them to their parents: killed too)."""
    for m in made:
        if not m.done and m.tracee.attached:
            _kill(m.tracee)
        close(m)


def _kill(tr: Tracee) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(tr.pid, signal.SIGKILL)
    if tr.attached:
        with contextlib.suppress(OSError):
            tr.wait()
        tr.attached = False
