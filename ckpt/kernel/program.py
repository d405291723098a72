"""Injected programs: a table of syscalls that a stopped thread runs by itself (issue 12:
the per-thread cost of dump and restore).

An injected syscall (kernel/remote.py) costs two ptrace stops, each a round trip
between ckpt and the thread: ~65 µs one after the other. A program is a table of
syscalls in the process's memory that a small interpreter (INTERP, below) runs under
PTRACE_CONT, storing each result in the table; it ends with a tgkill of a marker
signal to the thread itself, whose signal-delivery stop is the only one. So k
syscalls of a thread cost one stop, and the stops of many threads overlap (C:
ck_run_programs): the threads run their programs at once while ckpt waits.

That stop is inside get_signal(), like the PTRACE_EVENT_STOP of an interrupt
(Tracee.parked): registers set there resume through the kernel's own signal path
(restart rules, pending signals) when the thread goes on, with the marker dropped.

Restore (Program, run): the restorer's threads, which die with ckpt (PTRACE_O_EXITKILL),
so nothing needs healing; the marker is a synchronous signal the injection mask leaves
unblocked and the thread has no private instance of pending (a second instance of a
standard signal is dropped), SIGTRAP first. An entry with STOP ends the program when it
fails (-errno): what a call that raises does in straight code, so the same error is
raised, afterwards, for the same call. The dump's read-only batches run programs too,
each ending in the thread's heal code (kernel/inject_batch.py).

Entry (64 bytes): nr | STOP << 32, six arguments, result (NOT_RUN until it ran).
Registers: rbx = first entry, r12 = entries, r13 = header (tgid, tid, marker signal,
address of the tgkill's `syscall`).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

from ..errors import TraceeGone
from . import abi, syscalls
from .native import PAGE_SIZE, check, ffi, lib
from .ptrace import Tracee, dict_to_regs
from .remote import DataPuts, Injector, RemoteError

# 0:  test r12,r12 ; je 3f
# 5:  mov rax,[rbx] ; mov r14,rax ; shr r14,32 ; mov eax,eax      (nr; flags)
# 11: mov rdi,[rbx+8] ; rsi,[rbx+16] ; rdx,[rbx+24] ; r10,[rbx+32] ; r8,[rbx+40] ;
#     r9,[rbx+48] ; syscall ; mov [rbx+56],rax ; add rbx,64 ; dec r12
# 36: test r14d,1 ; je 0b ; cmp rax,-4095 ; jb 0b                 (STOP and failed: end)
# 47: 3: mov eax,234 (tgkill) ; mov rdi,[r13] ; rsi,[r13+8] ; rdx,[r13+16] ; jmp [r13+24]
INTERP = bytes.fromhex(
    "4d85e47442488b034989c649c1ee2089c0488b7b08488b7310488b53184c8b53204c8b43284c8b4b30"
    "0f05488943384883c34049ffcc41f7c60100000074c1483d01f0ffff72b9b8ea000000498b7d00498b"
    "7508498b551041ff6518"
)
END_STUB = b"\x0f\x05\x0f\x0b"  # syscall (the tgkill); ud2: never resumed past
ENTRY = 64
HEADER = 32
STOP = 1 << 32
NOT_RUN = (1 << 64) - 4096  # never a syscall's result (-4096 is no errno)
_M64 = (1 << 64) - 1

# Restore markers: synchronous signals INJECT_MASK leaves unblocked; the first one the
# thread has no private instance of pending is used.
RESTORE_MARKERS = (5, 4, 7, 8, 11)  # SIGTRAP SIGILL SIGBUS SIGFPE SIGSEGV


def _s64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


class Area:
    """A mapping in the target for programs: the interpreter, then tables and data,
    laid out in ckpt first (image) and written with one pwrite; results read back with
    one pread. Mapped and unmapped by an injected syscall of `inj` (any thread of the
    process: they share the memory)."""

    def __init__(self, inj: Injector, size: int, addr: int = 0):
        self.inj = inj
        self.size = self.mapped(size)
        rwx = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE
        if addr:
            flags |= abi.MAP_FIXED_NOREPLACE
        self.addr = syscalls.mmap(inj, addr, self.size, rwx, flags, _M64, 0)
        self.image = bytearray(INTERP)
        self._dirty = 0  # the image is written from here on at the next flush
        self.code = self.addr
        self.stub = self.alloc(len(END_STUB), 16)
        self.store(self.stub, END_STUB)

    @staticmethod
    def mapped(size: int) -> int:
        """How many bytes an Area for `size` bytes of programs maps."""
        return (size + len(INTERP) + 64 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def alloc(self, size: int, align: int = 8) -> int:
        off = (len(self.image) + align - 1) // align * align
        if off + size > self.size:
            raise OSError(errno.ENOSPC, "ckpt's program area is full")
        self.image.extend(bytes(off + size - len(self.image)))
        return self.addr + off

    def store(self, addr: int, data: bytes) -> None:
        off = addr - self.addr
        if off < 0 or off + len(data) > len(self.image):
            raise OSError(errno.EFAULT, f"{addr:#x} is outside ckpt's program area")
        self.image[off : off + len(data)] = data
        self._dirty = min(self._dirty, off)

    def flush(self) -> None:
        """Write what changed since the last flush."""
        if self._dirty < len(self.image):
            self.inj.write(self.addr + self._dirty, bytes(self.image[self._dirty :]))
        self._dirty = len(self.image)

    def read_back(self, start: int) -> bytes:
        """The area from address start to the end of what is laid out."""
        return self.inj.read(start, self.addr + len(self.image) - start)

    def close(self) -> None:
        syscalls.munmap(self.inj, self.addr, self.size)


class CallRecorder:
    """The call half of the Injector interface, recording instead of running: each call
    is noted (nr, args, checked, name, fail) and returns 0; a subclass runs them later
    (Program; restore/rebuild.py's batch of the leader's calls)."""

    calls: list[tuple[int, tuple[int, ...], bool, str, Callable | None]]

    def raw(self, nr: int, *args: int) -> int:
        self.calls.append((nr, args, False, "", None))
        return 0

    def call_nr(self, nr: int, *args: int, name: str) -> int:
        self.calls.append((nr, args, True, name, None))
        return 0

    def call(self, nr: int, *args: int, name: str, fail: Callable[[RemoteError], BaseException]):
        """call_nr whose failure raises fail(the RemoteError call_nr would raise)."""
        self.calls.append((nr, args, True, name, fail))
        return 0


class Program(CallRecorder, DataPuts):
    """The calls one thread will run, recorded through the Injector interface the
    syscalls.* wrappers use (call_nr, raw; put, alloc, cstr for their data): the same
    code that injects one call at a time builds a program. Nothing runs until run();
    every call returns 0 meanwhile, so only code that ignores results (setters) can be
    recorded. template: registers the program starts from (any of the process's: the
    interpreter sets what it uses). results: each call's result after run() (None for
    those after a failure that ended it)."""

    def __init__(self, area: Area, tracee: Tracee, template: dict[str, int], data: int = 1024):
        self.area = area
        self.tracee = tracee
        self.template = template
        self.calls: list[tuple[int, tuple[int, ...], bool, str, Callable | None]] = []
        self._data = area.alloc(data, 64)
        self._data_size = data
        self._bump = 0
        self.results: list[int | None] = []

    # -- the Injector interface (calls: CallRecorder; alloc, cstr: DataPuts) ----------

    def reset_data(self) -> None:
        """Nothing: the data of a call must stay until the program runs."""

    def put(self, data: bytes, align: int = 8) -> int:
        off = (self._bump + align - 1) // align * align
        if off + len(data) > self._data_size:
            raise OSError(errno.ENOSPC, "program data area full")
        addr = self._data + off
        self.area.store(addr, data)
        self._bump = off + len(data)
        return addr

    def write(self, addr: int, data: bytes) -> None:
        self.area.store(addr, data)

    # -- after the run -------------------------------------------------------------------

    def raise_first(self) -> None:
        """Raise what straight code would have: the first call with a check that failed
        (a program ends there), as Injector.call_nr words it."""
        for (_nr, _a, stop, name, fail), r in zip(self.calls, self.results, strict=True):
            if r is None:
                return
            if stop and -4096 < r < 0:
                exc = RemoteError(
                    -r, f"{name} in process {self.tracee.pid} failed: {os.strerror(-r)}"
                )
                if fail is not None:
                    raise fail(exc) from exc
                raise exc


def marker_for(pending: set[int]) -> int:
    """A restore program's marker: 0 when every candidate is pending in the thread."""
    return next((s for s in RESTORE_MARKERS if s not in pending), 0)


def run(programs: list[Program], pending: Callable[[Tracee], set[int]] = lambda _t: set(),
        live: Callable[[Tracee], Injector] | None = None, raise_first: bool = True) -> None:  # fmt: skip
    """Run each program in its thread, all at once; then (raise_first) raise the first failure,
    in program order (Program.raise_first). pending(tracee): the signals pending in the
    thread now (its marker must not be one); live(tracee): an Injector for a thread
    that has no marker left, whose calls then run one at a time. Programs of one run
    share their Area. Each thread is left parked (Tracee.parked)."""
    progs = [p for p in programs if p.calls]
    for p in programs:
        p.results = []
    if not progs:
        return
    area = progs[0].area
    markers, slow = [], []
    for p in progs:
        m = marker_for(pending(p.tracee))
        markers.append(m)
        if m == 0:
            slow.append(p)
    fast = [(p, m) for p, m in zip(progs, markers) if m]
    heads = []
    for p, m in fast:
        head = area.alloc(HEADER + ENTRY * len(p.calls), 64)
        t = p.tracee
        area.store(head, struct.pack("<qqqQ", t.tgid, t.pid, m, area.stub))
        table = bytearray()
        for nr, args, stop, _n, _f in p.calls:
            a6 = [x & _M64 for x in args] + [0] * (6 - len(args))
            table += struct.pack("<8Q", nr | (STOP if stop else 0), *a6, NOT_RUN)
        area.store(head + HEADER, bytes(table))
        heads.append(head)
    area.flush()
    if fast:
        regs = ffi.new("struct user_regs_struct[]", len(fast))
        structs: dict[int, object] = {}  # one conversion per template
        for i, ((p, _m), head) in enumerate(zip(fast, heads)):
            if id(p.template) not in structs:
                structs[id(p.template)] = dict_to_regs(p.template)
            regs[i] = structs[id(p.template)][0]
            r = regs[i]
            r.rip, r.rbx, r.r12, r.r13 = area.code, head + HEADER, len(p.calls), head
            r.orig_rax = _M64
        launch([p.tracee for p, _ in fast], regs, [m for _, m in fast],
               [area.stub + 2] * len(fast), pass_foreign=False)  # fmt: skip
        back = area.read_back(heads[0])
        for (p, _m), head in zip(fast, heads):
            at = head - heads[0] + HEADER
            raw = struct.unpack_from(f"<{len(p.calls) * 8}Q", back, at)[7::8]  # the results
            p.results = [None if r == NOT_RUN else _s64(r) for r in raw]
    for p in slow:  # every marker pending: the calls one at a time
        if live is None:
            raise OSError(errno.EAGAIN, f"thread {p.tracee.pid}: every marker signal pending")
        inj = live(p.tracee)
        for nr, args, stop, _n, _f in p.calls:
            r = inj.raw(nr, *args)
            p.results.append(r)
            if stop and -4096 < r < 0:
                break
        p.results += [None] * (len(p.calls) - len(p.results))
    for p in programs if raise_first else ():
        if p.calls:
            p.raise_first()


def launch(tracees: list[Tracee], regs, markers: list[int], ends: list[int], *,
           pass_foreign: bool, masks: list[int] | None = None) -> None:  # fmt: skip
    """ck_run_programs for these threads (regs: a struct user_regs_struct[] of their
    start registers; masks: signal masks set after them); raises for the first that did
    not reach its end: TraceeGone when it died, RemoteError(EFAULT) naming the stop when
    it took a signal instead."""
    n = len(tracees)
    tids = ffi.new("int[]", [t.pid for t in tracees])
    states, statuses = ffi.new("int[]", n), ffi.new("int[]", n)
    cmasks = ffi.new("uint64_t[]", [m & _M64 for m in masks]) if masks is not None else ffi.NULL
    r = lib.ck_run_programs(n, tids, regs, cmasks, ffi.new("int[]", markers),
                            ffi.new("uint64_t[]", ends), int(pass_foreign), states, statuses)  # fmt: skip
    for i, t in enumerate(tracees):
        t.parked = states[i] == 0
    check(r, "waitpid")
    for i, t in enumerate(tracees):
        if states[i] == -errno.ECHILD:
            t.attached = False
            raise TraceeGone(f"thread {t.pid} died during syscall injection", pid=t.pid)
        if states[i] == -errno.EFAULT:
            st = statuses[i]
            raise RemoteError(
                errno.EFAULT,
                f"injected program in {t.pid} stopped by signal "
                f"{os.WSTOPSIG(st) if os.WIFSTOPPED(st) else st}",
            )
        check(states[i], "injected program", target=t.pid)


def leave_many(tracees: list[Tracee], masks: list[int], regs: list[dict[str, int]],
               xstates: list[bytes] | None = None,
               park: bool | list[bool] = False) -> None:  # fmt: skip
    """Each thread's signal mask, xstate (when given) and registers, from a stop inside
    get_signal(): a thread not parked there (or every one, with park; those flagged in
    a list) is moved to a PTRACE_EVENT_STOP first (C: ck_leave_many, every thread at
    once). Every thread gets its turn; the first error is raised after."""
    n = len(tracees)
    if not n:
        return
    tids = ffi.new("int[]", [t.pid for t in tracees])
    force = park if isinstance(park, list) else [park] * n
    park_ = ffi.new("int[]", [0 if t.parked and not f else 1 for t, f in zip(tracees, force)])
    cmasks = ffi.new("uint64_t[]", [m & _M64 for m in masks])
    cregs = ffi.new("struct user_regs_struct[]", n)
    for i, d in enumerate(regs):
        cregs[i] = dict_to_regs(d)[0]
    xbuf, xsize = ffi.NULL, 0
    if xstates is not None:
        xsize = max(len(x) for x in xstates)
        if any(len(x) != xsize for x in xstates):
            raise OSError(errno.EINVAL, "threads' xstate of different sizes")
        xbuf = ffi.from_buffer(b"".join(xstates))
    states, statuses = ffi.new("int[]", n), ffi.new("int[]", n)
    r = lib.ck_leave_many(n, tids, park_, cmasks, cregs, xbuf, xsize, states, statuses)
    for i, t in enumerate(tracees):
        t.parked = states[i] == 0
    check(r, "waitpid")
    for i, t in enumerate(tracees):
        if states[i] == -errno.ECHILD:
            t.attached = False
            raise RemoteError(errno.ESRCH, f"thread {t.pid} died while being parked")
        if states[i] == -errno.EFAULT:
            st = statuses[i]
            raise RemoteError(
                errno.EFAULT,
                f"thread {t.pid} took signal {os.WSTOPSIG(st) if os.WIFSTOPPED(st) else st} "
                "while parked",
            )
        check(states[i], "leave", target=t.pid)


# -- the same calls in other threads ---------------------------------------------------------


class Recording(DataPuts):
    """An Injector's calls, run for real in one thread and noted with the data they were
    handed, to be run again in other threads as programs (replay): for setters whose
    calls depend only on what the thread is to become (restore/security.py: threads
    meant to get the same credentials start alike and make the same calls). `ok` turns
    False when the code reads memory back (a replay could not give it the others')."""

    def __init__(self, inj: Injector):
        self.inj = inj
        self.tracee = inj.tracee
        self.scratch = inj.scratch
        self.base = inj.scratch.data
        self.shadow = bytearray()  # the data area as the calls were handed it
        # nr, args, checked (call_nr), name, result, the data area before the call
        self.calls: list[tuple[int, tuple[int, ...], bool, str, int, bytes]] = []
        self.ok = True

    def raw(self, nr: int, *args: int) -> int:
        r = self.inj.raw(nr, *args)
        self.calls.append((nr, args, False, "", r, bytes(self.shadow)))
        return r

    def call_nr(self, nr: int, *args: int, name: str) -> int:
        r = self.inj.raw(nr, *args)
        self.calls.append((nr, args, True, name, r, bytes(self.shadow)))
        if -4096 < r < 0:
            raise RemoteError(-r, f"{name} in process {self.tracee.pid} failed: {os.strerror(-r)}")
        return r

    def reset_data(self) -> None:
        self.inj.reset_data()

    def _note(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        if off < 0 or off + len(data) > self.scratch.data_size:
            self.ok = False
            return
        if off + len(data) > len(self.shadow):
            self.shadow.extend(bytes(off + len(data) - len(self.shadow)))
        self.shadow[off : off + len(data)] = data

    def put(self, data: bytes, align: int = 8) -> int:
        addr = self.inj.put(data, align)
        self._note(addr, data)
        return addr

    def write(self, addr: int, data: bytes) -> None:
        self.inj.write(addr, data)
        self._note(addr, data)

    def read(self, addr: int, size: int) -> bytes:
        self.ok = False
        return self.inj.read(addr, size)


def replay(rec: Recording, area: Area, tracees: list[Tracee], template: dict[str, int],
           pending: Callable[[Tracee], set[int]] = lambda _t: set(),
           live: Callable[[Tracee], Injector] | None = None) -> list[Program]:  # fmt: skip
    """rec's calls in each of these threads, as one program each, all at once (run);
    a pointer into the data area points into the thread's own copy of it as it was
    before the call. Returns the programs; check each with same_as."""
    extent = max(64, -(-len(rec.shadow) // 64) * 64)
    progs = []
    for tr in tracees:
        prog = Program(area, tr, template, data=extent * len(rec.calls) + 64)
        for nr, args, checked, name, _r, before in rec.calls:
            if any(rec.base <= a < rec.base + extent for a in args):
                copy = prog.put(before.ljust(extent, b"\0"), 64)
                args = tuple(a - rec.base + copy if rec.base <= a < rec.base + extent else a
                             for a in args)  # fmt: skip
            prog.calls.append((nr, args, checked, name, None))
        progs.append(prog)
    run(progs, pending=pending, live=live, raise_first=False)
    return progs


def same_as(rec: Recording, prog: Program) -> None:
    """Raise what straight code would have in prog's thread: the first call with a check
    that failed, as Injector.call_nr words it; or, for a call that answered otherwise
    than in rec's thread (they started alike: it should not), RemoteError(EPROTO)."""
    for (nr, _a, checked, name, want, _b), got in zip(rec.calls, prog.results, strict=True):
        pid = prog.tracee.pid
        if got is None:  # not run: a failed call before it ended the program (raised)
            break
        if checked and -4096 < got < 0:
            raise RemoteError(-got, f"{name} in process {pid} failed: {os.strerror(-got)}")
        if got != want:
            what = name or f"syscall {nr}"
            raise RemoteError(
                errno.EPROTO,
                f"{what} in process {pid} returned {got}, not {want} as in thread "
                f"{rec.tracee.pid} it copies",
            )
