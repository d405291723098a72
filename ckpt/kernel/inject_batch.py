"""The same read-only injected calls in many threads at once (issue 12: 1024 threads).

Reading each thread's injected-only state (sigaltstack, clear_child_tid, prctl and
arch_prctl values, memory policy, securebits…) costs ~10 injected syscalls per thread,
each two ptrace round trips between ckpt and the thread: ~0.6 ms per thread, one
after the other. The calls are the same in every thread, so:

1. the first thread runs them the usual way (remote.ThreadInjection), through a
   Recorder that notes each syscall, its arguments and the scratch data area before
   and after it;
2. if they are all pure reads (an allowlist: nothing in the thread changes), every
   other thread runs that program at once (C: ck_inject_many serves the stops of all
   threads as they come), each call with its own copy of the data area;
3. the caller's code runs again for each thread against a Replayer, which hands it
   that thread's results and data in the same order; a thread whose code asks for
   anything else (its results took it down another path) runs the usual way after.

Heal safety is the usual one: each thread runs one injected syscall at a time from
its own heal blob, with its registers parked there before its signal mask is
widened, and goes back through the signal path; a ckpt killed at any point leaves
each thread to finish its syscall and heal itself. Threads that heal by rt_sigreturn
(seccomp, remote.heal_frame) are not batched.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from . import abi, syscalls
from .native import check, ffi, lib
from .ptrace import PTRACE_CONT, PTRACE_EVENT_STOP, PTRACE_INTERRUPT, Tracee, dict_to_regs
from .remote import (
    HEAL_SIZE,
    INJECT_MASK,
    Injector,
    RemoteError,
    heal_blob,
)

# Syscalls a batch may run: they only read the calling thread's state.
_PRCTL_GETS = {2, 3, 7, 16, 23, 25, 27, 30, 34, 37, 39, 40, 42, 52, 68}
_ARCH_GETS = {0x1003, 0x1004, 0x1011}  # ARCH_GET_FS, ARCH_GET_GS, ARCH_GET_CPUID


def _read_only(nr: int, args: tuple[int, ...]) -> bool:
    if nr == abi.NR_PRCTL:
        return args[0] in _PRCTL_GETS
    if nr == abi.NR_ARCH_PRCTL:
        return args[0] in _ARCH_GETS
    if nr == abi.NR_SIGALTSTACK:
        return args[0] == 0
    return nr in (abi.NR_GET_MEMPOLICY, abi.NR_GETTID, abi.NR_GETPID)


class Diverged(Exception):
    """A replayed thread's code asked for something its batch did not run."""


class _DataArea:
    """Injector's scratch-data calls (reset_data, put, alloc, cstr) over a shadow copy."""

    def __init__(self, base: int, size: int):
        self.base = base
        self.size = size
        self.bump = 0
        self.shadow = bytearray()
        self.allocs: dict[int, int] = {}  # start -> end of each put() since reset_data()

    def reset_data(self) -> None:
        self.bump = 0
        self.allocs = {}

    def _store(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > len(self.shadow):
            self.shadow.extend(bytes(end - len(self.shadow)))
        self.shadow[off:end] = data

    def put(self, data: bytes, align: int = 8) -> int:
        off = (self.bump + align - 1) // align * align
        if off + len(data) > self.size:
            raise OSError(errno.ENOSPC, "scratch data area full")
        self._store(off, data)
        self.bump = off + len(data)
        self.allocs[self.base + off] = self.base + off + len(data)
        return self.base + off

    def alloc(self, size: int, align: int = 8) -> int:
        return self.put(b"\0" * size, align)

    def cstr(self, s: str | bytes) -> int:
        b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
        return self.put(b + b"\0", 1)

    def inside(self, addr: int, n: int) -> bool:
        return self.base <= addr and addr + n <= self.base + len(self.shadow)

    def call_nr(self, nr: int, *args: int, name: str) -> int:
        r = self.raw(nr, *args)
        if -4096 < r < 0:
            raise RemoteError(-r, f"{name} in process {self.pid} failed: {os.strerror(-r)}")
        return r


class Recorder(_DataArea):
    """Wraps the first thread's real Injector and notes what its calls need."""

    def __init__(self, inj: Injector):
        super().__init__(inj.scratch.data, inj.scratch.data_size)
        self.inj = inj
        self.tracee = inj.tracee
        self.pid = inj.tracee.pid
        self.calls: list[tuple[int, tuple[int, ...], bytes]] = []  # nr, args, data before
        self.ok = True  # every call read-only and every write inside the data area

    def put(self, data: bytes, align: int = 8) -> int:
        addr = super().put(data, align)
        self.inj.write(addr, data)
        return addr

    def write(self, addr: int, data: bytes) -> None:
        if self.inside(addr, len(data)):
            self._store(addr - self.base, data)
        else:
            self.ok = False
        self.inj.write(addr, data)

    def read(self, addr: int, size: int) -> bytes:
        return self.inj.read(addr, size)

    def raw(self, nr: int, *args: int) -> int:
        args6 = tuple(args) + (0,) * (6 - len(args))
        if not _read_only(nr, args6):
            self.ok = False
        before = bytes(self.shadow)
        r = self.inj.raw(nr, *args)
        self.calls.append((nr, args6, before))
        if self.shadow:  # what the kernel wrote: the next call's "before"
            self.shadow[:] = self.inj.read(self.base, len(self.shadow))
        return r


class Replayer(_DataArea):
    """Serves one batched thread's results to the same code, in the same order.

    The batched calls take no input from memory (the allowlist: they only fill
    buffers), so what the data area held before a call does not matter; a read is
    served only from a buffer the last call was handed (what its kernel filled for
    this thread), anything else is Diverged."""

    def __init__(self, rec: Recorder, tracee: Tracee, results: list[int], after: list[bytes]):
        super().__init__(rec.base, rec.size)
        self.rec = rec
        self.tracee = tracee
        self.pid = tracee.pid
        self.results = results
        self.after = after
        self.i = 0
        self.handed: set[int] = set()  # buffers (put() starts) the last call was given

    def write(self, addr: int, data: bytes) -> None:
        if not self.inside(addr, len(data)):
            raise Diverged
        self._store(addr - self.base, data)

    def read(self, addr: int, size: int) -> bytes:
        for s in self.handed:  # (a loop: any() over a generator cost more, per read)
            if s <= addr and addr + size <= self.allocs[s]:
                return bytes(self.shadow[addr - self.base : addr - self.base + size])
        raise Diverged

    def raw(self, nr: int, *args: int) -> int:
        args6 = tuple(args) + (0,) * (6 - len(args))
        if self.i >= len(self.rec.calls):
            raise Diverged
        want_nr, want_args, before = self.rec.calls[self.i]
        if (nr, args6) != (want_nr, want_args):
            raise Diverged
        r = self.results[self.i]
        self.shadow[:] = self.after[self.i][: len(before)]  # its kernel's answer
        self.handed = {a for a in args6 if a in self.allocs}
        self.i += 1
        return r

    def finished(self) -> bool:
        return self.i == len(self.rec.calls)


def run_batch(
    rec: Recorder,
    main: Injector,
    threads: list[Tracee],
    regs: list[dict[str, int]],
    masks: list[int],
    blob_addrs: list[int],
    work: Callable[[int, object], None],
    checkpoint: Callable[[], None] = lambda: None,
    marker: int = 0,
) -> list[Tracee]:
    """Run rec's calls in every thread at once, then work(tid, replayer) for each.
    Returns the threads whose replay diverged (the caller runs those the usual way).
    checkpoint() runs while every thread sits inside its injection session.

    marker: a signal the process ignores (ignored_marker), for threads under no
    seccomp mode: each thread then runs its calls as one injected program (below);
    0: one injected syscall at a time (ck_inject_many)."""
    if marker:
        got = _run_programs(rec, main, threads, regs, masks, marker, checkpoint)
    else:
        got = _run_calls(rec, main, threads, regs, masks, blob_addrs, checkpoint)
    results, after = got
    k = len(rec.calls)
    diverged = []
    for i, t in enumerate(threads):
        rep = Replayer(rec, t, results[i * k : i * k + k], after[i * k : i * k + k])
        try:
            work(t.pid, rep)
            if not rep.finished():
                raise Diverged
        except (Diverged, RemoteError):
            diverged.append(t)
    return diverged


def _extent(rec: Recorder) -> int:
    """Bytes of the data area each call gets a copy of."""
    return max(64, -(-len(rec.shadow) // 64) * 64)


def _run_calls(rec, main, threads, regs, masks, blob_addrs, checkpoint):
    """Each call of each thread one injected syscall, the threads' stops served as
    they come (ck_inject_many). Returns (results, data after each call), thread-major."""
    from .ptrace import resume_regs

    n, k = len(threads), len(rec.calls)
    extent = _extent(rec)
    size = -(-n * k * extent // 4096) * 4096
    rw, private = abi.PROT_READ | abi.PROT_WRITE, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS
    area = syscalls.mmap(main, 0, size, rw, private, (1 << 64) - 1, 0)
    entered: list[int] = []
    try:
        # each call of each thread gets its own copy of the data area, as it was before
        init = bytearray(size)
        nrs = ffi.new("long[]", n * k)
        args = ffi.new("long[]", n * k * 6)
        lo, hi = rec.base, rec.base + extent
        for i in range(n):
            for j, (nr, a6, before) in enumerate(rec.calls):
                at = (i * k + j) * extent
                init[at : at + len(before)] = before
                nrs[i * k + j] = nr
                for m, v in enumerate(a6):  # pointers into the data area: into this copy
                    v = v - lo + area + at if lo <= v < hi else v
                    args[(i * k + j) * 6 + m] = v - (1 << 64) if v >= 1 << 63 else v
        main.write(area, bytes(init))
        base = ffi.new("struct user_regs_struct[]", n)
        insn = ffi.new("uint64_t[]", n)
        tids = ffi.new("int[]", [t.pid for t in threads])
        for i, t in enumerate(threads):
            resume = resume_regs(regs[i])
            main.write(blob_addrs[i], heal_blob(resume, masks[i]))
            base[i] = dict_to_regs(resume)[0]
            insn[i] = blob_addrs[i]
            park = dict(resume, rip=blob_addrs[i], rax=abi.NR_GETPID, orig_rax=(1 << 64) - 1)
            t.setregs(park)  # at its heal blob before its mask is widened
            entered.append(i)
            t.set_sigmask(INJECT_MASK)
        results = ffi.new("long[]", n * k)
        states = ffi.new("int[]", n)
        statuses = ffi.new("int[]", n)
        check(
            lib.ck_inject_many(n, tids, base, insn, k, nrs, args, results, states, statuses),
            "waitpid",
        )
        for i, t in enumerate(threads):
            if states[i] == -errno.ECHILD:
                t.attached = False
                raise RemoteError(errno.ESRCH, f"thread {t.pid} died during syscall injection")
            if states[i] == -errno.EFAULT:
                raise RemoteError(
                    errno.EFAULT, f"injected syscall in {t.pid} stopped by status {statuses[i]:#x}"
                )
            check(states[i], "syscall injection", target=t.pid)
        checkpoint()
        after = main.read(area, n * k * extent)
        _leave(threads, regs, masks, entered)
        entered = []
    finally:
        if entered:
            _leave(threads, regs, masks, entered)
        syscalls.munmap(main, area, size)
    return list(results), [after[j * extent : j * extent + extent] for j in range(n * k)]


# -- one injected program per thread -------------------------------------------------------
#
# Each thread runs all its calls by itself (kernel/program.py's interpreter under
# PTRACE_CONT) and stops once, on a tgkill of `marker` to itself made from the first
# instruction of its own heal blob (the `syscall` that heal code follows). The first
# call of its table sets its signal mask to the injection mask with the marker
# unblocked (ckpt also sets it, after pointing the registers at the program). A ckpt
# killed at any moment leaves the thread to run the rest of its calls (reads only),
# the marker (a signal its process ignores, so the kernel drops it), then its heal
# code: its mask and registers back, as with one call at a time. After the stops, each
# thread gets its mask and then its registers back (ck_leave_many) in the marker's
# stop, inside get_signal() like a PTRACE_EVENT_STOP: a ckpt killed there leaves the
# marker to be delivered (ignored) on the way out. A thread whose own mask blocks the
# marker is parked in a PTRACE_EVENT_STOP first: the kernel would queue a marker it
# must deliver under a mask that blocks it again, pending for good.

_IGNORED_BY_DEFAULT = (23, 28, 17)  # SIGURG SIGWINCH SIGCHLD
_NEVER_MARKERS = {4, 5, 7, 8, 9, 11, 18, 19, 20, 21, 22, 31}  # sync, KILL, job control, SYS


def ignored_marker(handlers: dict[int, int], pending: set[int], blocked: int = 0) -> int:
    """A signal the process ignores (SIG_IGN, or SIG_DFL whose default is to ignore),
    none pending in any of its threads or in the process: a tgkill of it has no effect
    on an untraced thread, and a traced one stops for it. handlers: signal → handler of
    the non-default actions; blocked: the signals some thread blocks (one no thread
    blocks is preferred: its threads need no parking after their programs). 0 when
    there is none."""
    ignored = [s for s in _IGNORED_BY_DEFAULT if handlers.get(s, 0) in (0, 1)]
    ignored += [s for s in range(1, 65) if handlers.get(s) == 1 and s not in _NEVER_MARKERS]
    ignored = [s for s in ignored if s not in pending]
    return next((s for s in ignored if not blocked >> (s - 1) & 1), ignored[0] if ignored else 0)


def _run_programs(rec, main, threads, regs, masks, marker, checkpoint):
    """Each thread's calls as one injected program (above). Returns (results, data
    after each call), thread-major."""
    from . import program
    from .ptrace import resume_regs

    n, k = len(threads), len(rec.calls)
    extent = _extent(rec)
    table = program.HEADER + (k + 1) * program.ENTRY + 64  # header, calls, the mask
    block = -(-(table + HEAL_SIZE) // 64) * 64 + k * extent
    area = program.Area(main, n * block + 64)
    entered: list[int] = []
    try:
        widened = INJECT_MASK & ~(1 << (marker - 1))
        base = area.alloc(n * block, 64)
        heads = [base + i * block for i in range(n)]
        # one thread's block, its addresses relative to the block; `reloc`: the table's
        # values that are addresses (each thread's are its block's)
        copies = -(-(table + HEAL_SIZE) // 64) * 64
        vals = [abi.NR_RT_SIGPROCMASK, 2, table - 64, 0, 8, 0, 0, program.NOT_RUN]
        reloc = [2]
        for j, (nr, a6, _before) in enumerate(rec.calls):
            at, entry = copies + j * extent, len(vals)
            vals.append(nr)
            for m, v in enumerate(a6):
                if rec.base <= v < rec.base + extent:  # into the data area: into copy j
                    reloc.append(entry + 1 + m)
                    v = v - rec.base + at
                vals.append(v & (1 << 64) - 1)
            vals.append(program.NOT_RUN)
        pack = struct.Struct(f"<{len(vals)}Q").pack
        data = b"".join(before.ljust(extent, b"\0") for _nr, _a, before in rec.calls)
        img = bytearray(n * block)
        resume = [resume_regs(r) for r in regs]
        for i, (t, head) in enumerate(zip(threads, heads)):
            at = i * block
            for m in reloc:
                vals[m] += head
            img[at : at + table] = (
                struct.pack("<qqqQ", t.tgid, t.pid, marker, head + table) + pack(*vals)
            ).ljust(table - 64, b"\0") + struct.pack("<Q", widened).ljust(64, b"\0")
            for m in reloc:
                vals[m] -= head
            img[at + table : at + table + HEAL_SIZE] = heal_blob(resume[i], masks[i])
            img[at + copies : at + copies + len(data)] = data
        area.store(base, bytes(img))
        area.flush()
        start = ffi.new("struct user_regs_struct[]", n)
        for i in range(n):
            start[i] = dict_to_regs(resume[i])[0]
            r, head = start[i], heads[i]
            r.rip, r.rbx, r.r12, r.r13 = area.code, head + program.HEADER, k + 1, head
            r.orig_rax = (1 << 64) - 1
        entered = list(range(n))
        program.launch(threads, start, [marker] * n, [h + table + 2 for h in heads],
                       pass_foreign=True, masks=[widened] * n)  # fmt: skip
        checkpoint()
        back = area.read_back(base)
        blocks = [bool(m >> (marker - 1) & 1) for m in masks]  # those parked first
        program.leave_many(threads, masks, regs, park=blocks)
        entered = []
    finally:
        if entered:
            program.leave_many([threads[i] for i in entered], [masks[i] for i in entered],
                               [regs[i] for i in entered], park=True)  # fmt: skip
        area.close()
    results, after = [], []
    for i in range(n):
        at = i * block
        raw = struct.unpack_from(f"<{(k + 1) * 8}Q", back, at + program.HEADER)[15::8]
        results += [v - (1 << 64) if v >= 1 << 63 else v for v in raw]
        copies = -(-(table + HEAL_SIZE) // 64) * 64 + at
        after += [back[copies + j * extent : copies + (j + 1) * extent] for j in range(k)]
    return results, after


def _leave(threads: list[Tracee], regs, masks, which: list[int]) -> None:
    """Each thread back to its own registers and mask, from a stop inside get_signal()
    (remote.ThreadInjection.__exit__, for all of them at once). Every thread gets its
    turn even when one fails; the first error is raised after."""
    first: BaseException | None = None
    parked = []
    for i in which:
        t = threads[i]
        try:
            check(lib.ck_ptrace(PTRACE_INTERRUPT, t.pid, 0, 0), "PTRACE_INTERRUPT", target=t.pid)
            check(lib.ck_ptrace(PTRACE_CONT, t.pid, 0, 0), "PTRACE_CONT", target=t.pid)
            parked.append(i)
        except OSError as exc:
            first = first or exc
    for i in parked:
        t = threads[i]
        try:
            while True:
                st = t.wait()
                if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                    t.attached = False
                    raise RemoteError(errno.ESRCH, f"thread {t.pid} died while being parked")
                if os.WIFSTOPPED(st) and (st >> 16) == PTRACE_EVENT_STOP:
                    break
                if os.WIFSTOPPED(st):
                    raise RemoteError(
                        errno.EFAULT, f"thread {t.pid} took signal {os.WSTOPSIG(st)} while parked"
                    )
            t.set_sigmask(masks[i])
            t.setregs(regs[i])
        except OSError as exc:
            first = first or exc
    if first is not None:
        raise first
