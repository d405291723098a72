"""Tracee: seize, interrupt, registers, xstate, signal state, detach.

Every tracee is seized with PTRACE_O_TRACESYSGOOD: ckpt injects syscalls by
PTRACE_SYSCALL stops, and with that option a tracer that dies while its tracee
sits in a syscall stop leaves no stray SIGTRAP to kill the tracee.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from dataclasses import dataclass

from ..errors import AccessDenied, KernelError, NoSuchProcess, TraceeGone
from ..model import REG_NAMES  # the state's names of user_regs_struct's fields, in order
from .native import check, ffi, lib

PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_DETACH = 17
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_STOP = 128

NT_X86_XSTATE = 0x202


# Kernel-internal restart codes visible in rax at a ptrace stop (include/linux/errno.h).
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
NR_RESTART_SYSCALL = 219


def regs_to_dict(r) -> dict[str, int]:
    return {n: getattr(r, n) for n in REG_NAMES}


def dict_to_regs(d: dict[str, int]):
    # REG_NAMES are user_regs_struct's fields in order: initialised in one call
    return ffi.new("struct user_regs_struct *", [d[n] & 0xFFFFFFFFFFFFFFFF for n in REG_NAMES])


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# Syscalls that return -ERESTART_RESTARTBLOCK and can simply be issued again in a
# new process (their restart block, kernel-private, cannot be carried over).
_REISSUE = {7, 23, 202, 270, 271}  # poll, select, futex, pselect6, ppoll
NR_NANOSLEEP, NR_CLOCK_NANOSLEEP, TIMER_ABSTIME = 35, 230, 1


def restore_regs(regs: dict[str, int]) -> dict[str, int]:
    """Registers for a rebuilt process resumed from a stop inside get_signal().

    The kernel applies the restart rules itself there, except for
    -ERESTART_RESTARTBLOCK, whose restart block a new task does not have:
    resume_regs(fresh=True) re-issues those calls instead.
    """
    if _s64(regs["orig_rax"]) >= 0 and _s64(regs["rax"]) == -ERESTART_RESTARTBLOCK:
        return resume_regs(regs, fresh=True)
    return dict(regs)


def resume_regs(regs: dict[str, int], *, fresh: bool = False) -> dict[str, int]:
    """Registers that resume an interrupted syscall correctly in user space.

    A thread interrupted inside a syscall stops with rax = -ERESTART* and rip
    after the `syscall` instruction; the kernel would fix that up on the signal
    path, but a process resumed from a syscall stop, or rebuilt elsewhere, does
    not pass there. Do it here, and clear orig_rax so nothing restarts twice.

    -ERESTART_RESTARTBLOCK: in the same task (fresh=False) restart_syscall finds
    the task's restart block. A new task (fresh=True) has none, so the syscall
    is issued again instead: a relative sleep resumes with the remaining time
    the kernel wrote to its `rem` argument (or its whole length when there is
    none), an absolute one is exact, poll/select/futex restart their timeout.
    """
    out = dict(regs)
    if _s64(regs["orig_rax"]) >= 0:
        nr, rax = regs["orig_rax"], _s64(regs["rax"])
        if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
            out["rax"] = nr
            out["rip"] = regs["rip"] - 2
        elif rax == -ERESTART_RESTARTBLOCK:
            out["rip"] = regs["rip"] - 2
            out["rax"] = NR_RESTART_SYSCALL
            if fresh and nr == NR_NANOSLEEP:
                out["rax"] = nr
                if regs["rsi"]:
                    out["rdi"] = regs["rsi"]  # req = rem (remaining time)
            elif fresh and nr == NR_CLOCK_NANOSLEEP:
                out["rax"] = nr
                if regs["r10"] and not regs["rsi"] & TIMER_ABSTIME:
                    out["rdx"] = regs["r10"]
            elif fresh and nr in _REISSUE:
                out["rax"] = nr
    out["orig_rax"] = (1 << 64) - 1
    return out


@dataclass
class RseqConfig:
    ptr: int
    size: int
    signature: int
    flags: int


def _raise_for(err: OSError, pid: int, what: str) -> None:
    if err.errno == errno.ESRCH:
        raise NoSuchProcess(f"process {pid} exited during {what}", pid=pid) from err
    if err.errno == errno.EPERM and _exiting(pid):
        # ptrace_attach refuses a task already in do_exit (PF_EXITING) with EPERM
        raise NoSuchProcess(f"process {pid} exited during {what}", pid=pid) from err
    if err.errno == errno.EPERM:
        raise AccessDenied(
            f"cannot ptrace process {pid} ({what}: operation not permitted; "
            "is it already traced or protected?)",
            pid=pid,
        ) from err


PF_EXITING = 0x00000004  # include/linux/sched.h: the task is in do_exit()


def _exiting(pid: int) -> bool:
    """Is pid gone, a zombie, or on its way out (PF_EXITING in /proc/PID/stat's flags)?"""
    from . import procfs

    try:
        st = procfs.stat(pid)
    except (OSError, NoSuchProcess):
        return True
    return st.state in ("Z", "X") or bool(st.flags & PF_EXITING)


class Tracee:
    """A seized, stopped task. All methods assume a ptrace stop."""

    def __init__(self, pid: int, tgid: int | None = None):
        self.pid = pid
        self.tgid = pid if tgid is None else tgid  # its process (the leader's pid)
        self.attached = False
        # the other threads of the process, when seized as a group (seize_group)
        self.others: list[Tracee] = []
        #: stopped inside get_signal() (an interrupt's PTRACE_EVENT_STOP, or the stop an
        #: injected program ends with: kernel/program.py), so that registers set now
        #: resume through the kernel's restart rules; False after an injected syscall,
        #: which leaves it in a syscall-exit stop (stop_in_signal_path)
        self.parked = False
        self._status: dict[str, str] | None = None
        self._stat = None

    @property
    def threads(self) -> list[Tracee]:
        """The leader first, then the other threads, ordered by TID."""
        return [self, *self.others]

    # -- /proc, read once while stopped ------------------------------------------------

    def status(self) -> dict[str, str]:
        """Its /proc/PID/task/TID/status, read once per freeze: what ckpt reads there
        (credentials, seccomp, LAM, shadow stacks) cannot change while every thread of
        the process is stopped by ckpt, whose injections at a dump only read. Only the
        lines in procfs.THREAD_STATUS_KEYS (procfs.ThreadStatus: another is an error)."""
        if self._status is None:
            from . import procfs

            raw = procfs.read_bytes(self.tgid, "task", str(self.pid), "status")
            self._status = procfs.thread_status(raw)
        return self._status

    def read_proc(self) -> None:
        """status() and stat() of every thread of the process (self, the leader), each
        file of all threads read in one call into C (procfs.read_task_files); a thread
        whose files are gone is left to status() and stat() to report."""
        from . import procfs

        todo = [t for t in self.threads if t._status is None or t._stat is None]
        if not todo:
            return
        tids = [t.pid for t in todo]
        statuses = procfs.read_task_files(self.tgid, tids, "status")
        stats = procfs.read_task_files(self.tgid, tids, "stat")
        for t, status, stat in zip(todo, statuses, stats):
            if t._status is None and status is not None:
                t._status = procfs.thread_status(status)
            if t._stat is None and stat is not None:
                t._stat = procfs.parse_stat(stat)

    def stat(self):
        """Its /proc/PID/task/TID/stat (procfs.Stat: flags, comm…), read once per freeze
        (status()); the process-wide fields there are its thread's view."""
        if self._stat is None:
            from . import procfs

            self._stat = procfs.parse_stat(
                procfs.read_bytes(self.tgid, "task", str(self.pid), "stat")
            )
        return self._stat

    # -- attach / stop -----------------------------------------------------------------

    @classmethod
    def seize(cls, pid: int, *, exitkill: bool = False) -> Tracee:
        t = cls(pid)
        opts = PTRACE_O_TRACESYSGOOD | (PTRACE_O_EXITKILL if exitkill else 0)
        try:
            check(lib.ck_ptrace(PTRACE_SEIZE, pid, 0, opts), "PTRACE_SEIZE", target=pid)
        except OSError as e:
            _raise_for(e, pid, "seize")
            raise
        t.attached = True
        return t

    def interrupt(self) -> None:
        """Stop the tracee in a PTRACE_EVENT_STOP, letting any signal through first.

        A signal-delivery stop seen on the way is passed on (delivered), so no
        signal is lost; the interrupt trap is still pending and comes next.
        """
        check(lib.ck_ptrace(PTRACE_INTERRUPT, self.pid, 0, 0), "PTRACE_INTERRUPT", target=self.pid)
        while True:
            st = self.wait()
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                self.attached = False
                raise TraceeGone(f"process {self.pid} exited while being stopped", pid=self.pid)
            if not os.WIFSTOPPED(st):
                continue
            if (st >> 16) == PTRACE_EVENT_STOP:
                self._stopped_at(os.WSTOPSIG(st))
                return
            sig = os.WSTOPSIG(st)
            check(lib.ck_ptrace(PTRACE_CONT, self.pid, 0, sig), "PTRACE_CONT", target=self.pid)

    group_stopped: int = 0

    def _stopped_at(self, sig: int) -> None:
        """It is in the PTRACE_EVENT_STOP of an interrupt, with signal sig."""
        self.parked = True
        if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
            self.group_stopped = sig

    def stop_in_signal_path(self) -> None:
        """From a syscall stop, move the tracee to a PTRACE_EVENT_STOP inside get_signal().

        Registers set there are resumed through the kernel's own signal path,
        which applies its syscall-restart rules (a pending handler turns
        -ERESTARTNOHAND into EINTR, otherwise the call is restarted) exactly as
        if the tracee had never been stopped. From a syscall-exit stop that
        path would be skipped.
        """
        check(lib.ck_ptrace(PTRACE_INTERRUPT, self.pid, 0, 0), "PTRACE_INTERRUPT", target=self.pid)
        self.cont(0)
        while True:
            st = self.wait()
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                self.attached = False
                raise TraceeGone(f"process {self.pid} died while being parked", pid=self.pid)
            if os.WIFSTOPPED(st) and (st >> 16) == PTRACE_EVENT_STOP:
                self.parked = True
                return
            if os.WIFSTOPPED(st):
                sig = os.WSTOPSIG(st)
                raise KernelError(
                    f"process {self.pid} took signal {sig} while being parked", pid=self.pid
                )

    def set_options(self, opts: int) -> None:
        check(lib.ck_ptrace(PTRACE_SETOPTIONS, self.pid, 0, opts), "PTRACE_SETOPTIONS")

    def wait(self) -> int:
        st = ffi.new("int *")
        check(lib.ck_wait(self.pid, st, 0), "waitpid", target=self.pid)
        return st[0]

    # -- registers ---------------------------------------------------------------------

    def getregs(self) -> dict[str, int]:
        r = ffi.new("struct user_regs_struct *")
        check(lib.ck_getregs(self.pid, r), "PTRACE_GETREGS", target=self.pid)
        return regs_to_dict(r)

    def setregs(self, regs: dict[str, int]) -> None:
        check(lib.ck_setregs(self.pid, dict_to_regs(regs)), "PTRACE_SETREGS", target=self.pid)

    def get_xstate(self) -> bytes:
        size = lib.ck_xstate_size()
        buf = ffi.new("char[]", size)
        n = check(lib.ck_getregset(self.pid, NT_X86_XSTATE, buf, size), "GETREGSET xstate")
        return bytes(ffi.buffer(buf, n))

    def set_xstate(self, data: bytes) -> None:
        buf = ffi.from_buffer(bytearray(data))
        check(lib.ck_setregset(self.pid, NT_X86_XSTATE, buf, len(data)), "SETREGSET xstate")

    def get_sigmask(self) -> int:
        m = ffi.new("uint64_t *")
        check(
            lib.ck_ptrace(PTRACE_GETSIGMASK, self.pid, 8, int(ffi.cast("uintptr_t", m))),
            "PTRACE_GETSIGMASK",
        )
        return m[0]

    def set_sigmask(self, mask: int) -> None:
        m = ffi.new("uint64_t *", mask & 0xFFFFFFFFFFFFFFFF)
        check(
            lib.ck_ptrace(PTRACE_SETSIGMASK, self.pid, 8, int(ffi.cast("uintptr_t", m))),
            "PTRACE_SETSIGMASK",
        )

    def rseq_config(self) -> RseqConfig | None:
        buf = ffi.new("char[]", 24)
        r = lib.ck_ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION, self.pid, 24, int(ffi.cast("uintptr_t", buf))
        )
        if r < 0:
            return None
        ptr, size, sig, flags, _ = struct.unpack("<QIIII", bytes(ffi.buffer(buf, 24)))
        if ptr == 0:
            return None
        return RseqConfig(ptr=ptr, size=size, signature=sig, flags=flags)

    def peek_siginfo(self, shared: bool) -> list[bytes]:
        """Pending siginfos (128 bytes each) of the private or shared queue, without dequeuing."""
        out: list[bytes] = []
        buf = ffi.new("char[]", 128 * 32)
        while True:
            arg = ffi.new("char[]", struct.pack("<QIi", len(out), 1 if shared else 0, 32))
            n = check(
                lib.ck_ptrace(
                    PTRACE_PEEKSIGINFO,
                    self.pid,
                    int(ffi.cast("uintptr_t", arg)),
                    int(ffi.cast("uintptr_t", buf)),
                ),
                "PTRACE_PEEKSIGINFO",
            )
            raw = bytes(ffi.buffer(buf, 128 * n))
            out.extend(raw[i * 128 : (i + 1) * 128] for i in range(n))
            if n < 32:
                return out

    # -- leave -------------------------------------------------------------------------

    def cont(self, sig: int = 0) -> None:
        self.parked = False
        check(lib.ck_ptrace(PTRACE_CONT, self.pid, 0, sig), "PTRACE_CONT", target=self.pid)

    def detach(self, sig: int = 0) -> None:
        """Let the task (and, for a group, every other thread) run again."""
        others, self.others = self.others, []
        err: OSError | None = None
        for t in others:
            try:
                t.detach()
            except OSError as exc:  # a thread that exited meanwhile; go on with the rest
                err = err or exc
        if self.attached:
            r = lib.ck_ptrace(PTRACE_DETACH, self.pid, 0, sig)
            self.attached = False
            check(r, "PTRACE_DETACH", target=self.pid)
        if err is not None and not isinstance(err, NoSuchProcess):
            raise err

    def reap_killed(self) -> None:
        """After SIGKILL of the process: collect every thread's exit so none lingers traced.

        The other threads first: a traced thread stays a zombie until its tracer
        waits for it, and the leader's exit is only reported once they are gone.
        """
        for t in [*self.others, self]:
            if not t.attached:
                continue
            try:
                t.wait()
            except OSError:
                pass
            t.attached = False
        self.others = []


def seize_group(pid: int, tasks) -> Tracee:
    """Seize and stop every thread of `pid`; returns the leader with `.others` filled.

    Threads may be created while ckpt attaches: a thread that is still running can
    clone. So list the threads again after each pass, until a pass finds no new
    one; once every known thread is stopped, none can appear. A thread that exits
    while being seized is simply not part of the process any more.
    """
    leader = Tracee.seize(pid)
    held: dict[int, Tracee] = {pid: leader}
    try:
        leader.interrupt()
        while True:
            new = [tid for tid in tasks(pid) if tid not in held]
            if not new:
                break
            _seize_many(pid, new, held)
        live = set(tasks(pid))
        leader.others = [held[t] for t in sorted(held) if t != pid and t in live]
        for tid in set(held) - live - {pid}:
            held[tid].attached = False
    except BaseException:
        for t in held.values():
            if t.attached:
                try:
                    t.detach()
                except OSError:
                    pass
        raise
    return leader


@dataclass
class ThreadState:
    """What ptrace shows of a stopped thread (read_states)."""

    regs: dict[str, int]
    xstate: bytes
    sigmask: int
    rseq: RseqConfig | None
    robust_list: tuple[int, int]
    pending: list[bytes]  # private pending siginfos, 128 bytes each


_REGS = struct.Struct(f"<{len(REG_NAMES)}Q")


def read_states(tracees: list[Tracee]) -> list[ThreadState]:
    """getregs, get_xstate, get_sigmask, rseq_config, peek_siginfo(False) and the robust
    list of each thread, in one call into C for all of them (capture/process.py: a
    1024-thread process). A failure is raised as the call alone would raise it."""
    n = len(tracees)
    if not n:
        return []
    xsize = lib.ck_xstate_size()
    tids = ffi.new("int[]", [t.pid for t in tracees])
    regs = ffi.new("struct user_regs_struct[]", n)
    xbuf = ffi.new("char[]", n * xsize)
    pbuf = ffi.new("char[]", n * 32 * 128)
    out = ffi.new("struct ck_thread_state[]", n)
    lib.ck_thread_states(n, tids, regs, xbuf, xsize, pbuf, out)
    rbuf, xb, pb = ffi.buffer(regs), ffi.buffer(xbuf), ffi.buffer(pbuf)
    states = []
    for i, t in enumerate(tracees):
        o = out[i]
        check(o.regs_err, "PTRACE_GETREGS", target=t.pid)
        check(o.xstate_err, "GETREGSET xstate")
        check(o.mask_err, "PTRACE_GETSIGMASK")
        check(o.robust_err, "get_robust_list", target=t.pid)
        rseq = None
        if o.rseq_err == 0 and o.rseq[0]:
            rseq = RseqConfig(ptr=o.rseq[0], size=o.rseq[1] & 0xFFFFFFFF,
                              signature=o.rseq[1] >> 32, flags=o.rseq[2] & 0xFFFFFFFF)  # fmt: skip
        if o.npending < 0 or o.pending_err:
            pending = t.peek_siginfo(False)  # 32 or more (or an error to raise): as before
        else:
            at = i * 32 * 128
            pending = [pb[at + j * 128 : at + (j + 1) * 128] for j in range(o.npending)]
        states.append(ThreadState(
            regs=dict(zip(REG_NAMES, _REGS.unpack_from(rbuf, i * _REGS.size))),
            xstate=xb[i * xsize : i * xsize + o.xstate_len], sigmask=o.mask, rseq=rseq,
            robust_list=(o.robust[0], o.robust[1]), pending=pending,
        ))  # fmt: skip
    return states


def _seize_many(tgid: int, tids: list[int], held: dict[int, Tracee]) -> None:
    """Tracee.seize + interrupt of each of tids (threads of tgid), all at once (C:
    ck_seize_many; one thread after the other cost a wake-up round trip each). Each
    thread seized is put in `held` first, so that the caller can detach them all on
    an error; one that exited meanwhile is left out, as Tracee.seize and interrupt
    tell it; the first other error is raised after, as they raise it."""
    n = len(tids)
    ctids = ffi.new("int[]", tids)
    states, stops, attached = ffi.new("int[]", n), ffi.new("int[]", n), ffi.new("int[]", n)
    opts = PTRACE_O_TRACESYSGOOD
    r = lib.ck_seize_many(n, ctids, opts, states, stops, attached)
    first: BaseException | None = None
    for i, tid in enumerate(tids):
        if attached[i]:
            t = held[tid] = Tracee(tid, tgid)
            t.attached = True
            if states[i] == 0:
                t._stopped_at(stops[i])
            elif first is None:
                first = OSError(-states[i], f"PTRACE_INTERRUPT ({tid}) failed: "
                                f"{os.strerror(-states[i])}")  # fmt: skip
        elif states[i] != -errno.ECHILD and first is None:  # ECHILD: exited while stopped
            err = OSError(-states[i], f"PTRACE_SEIZE ({tid}) failed: {os.strerror(-states[i])}")
            try:
                _raise_for(err, tid, "seize")
                first = err
            except NoSuchProcess:
                pass  # exited meanwhile: not part of the process any more
            except BaseException as exc:
                first = exc
    check(r, "waitpid")
    if first is not None:
        raise first
