"""Run syscalls inside a stopped tracee, from a scratch area, safely.

Each injected syscall runs from a `syscall` instruction followed by a heal
trampoline. ckpt drives it with PTRACE_SYSCALL stops, so the trampoline never
runs while ckpt is alive. If ckpt dies (SIGKILL) at any point, ptrace detaches,
the tracee finishes the injected syscall and falls into the trampoline, which
restores the original signal mask and every general register (from a frame
stored next to it) and jumps back to where the tracee was stopped: the target
keeps running as if nothing happened. Only the scratch mapping stays behind.

The very first and last syscalls of a dump (mmap/munmap of the scratch area)
run from a copy of the same trampoline written into the unused tail of an
executable file mapping's last page (past the ELF segment's end), and the
original bytes are put back afterwards.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import TraceeGone, UnsupportedProcess
from . import abi, procfs, seccomp, syscalls
from .native import PAGE_SIZE, check, ffi, lib
from .procfs import Mapping
from .ptrace import PTRACE_O_TRACESYSGOOD, REG_NAMES, Tracee

SCRATCH_PAGES = 4  # page 0: code + heal frame; pages 1..3: data
HEAL_SIZE = 224
_OFF_MASK, _OFF_FRAME, _OFF_RIP = 72, 80, 216
_FRAME_REGS = REG_NAMES[:15]  # r15 … rdi: the order the trampoline pops them


def _heal_code() -> bytes:
    """syscall; rt_sigprocmask(SIG_SETMASK, &MASK, 0, 8); restore GPRs+flags+rsp; jmp [RIP]."""
    c = bytearray()
    c += b"\x0f\x05"  # 0: syscall (the injected one)
    c += b"\xb8\x0e\x00\x00\x00"  # mov eax, 14 (rt_sigprocmask)
    c += b"\xbf\x02\x00\x00\x00"  # mov edi, 2 (SIG_SETMASK)
    c += b"\x48\x8d\x35" + struct.pack("<i", _OFF_MASK - (len(c) + 7))  # lea rsi,[rip+MASK]
    c += b"\x31\xd2"  # xor edx, edx
    c += b"\x41\xba\x08\x00\x00\x00"  # mov r10d, 8
    c += b"\x0f\x05"  # syscall
    c += b"\x48\x8d\x25" + struct.pack("<i", _OFF_FRAME - (len(c) + 7))  # lea rsp,[rip+FRAME]
    c += bytes.fromhex("415f415e415d415c5d5b415b415a4159415858595a5e5f")  # pop r15..rdi
    c += b"\x9d"  # popfq
    c += b"\x5c"  # pop rsp
    c += b"\xff\x25" + struct.pack("<i", _OFF_RIP - (len(c) + 6))  # jmp [rip+RIP]
    assert len(c) <= _OFF_MASK
    return bytes(c.ljust(_OFF_MASK, b"\xcc"))


HEAL_CODE = _heal_code()


def heal_blob(resume: dict[str, int], mask: int) -> bytes:
    """Trampoline + data that put the tracee back at `resume` with signal mask `mask`."""
    frame = struct.pack("<15Q", *(resume[n] for n in _FRAME_REGS))
    frame += struct.pack("<QQ", resume["eflags"], resume["rsp"])
    blob = HEAL_CODE + struct.pack("<Q", mask) + frame + struct.pack("<Q", resume["rip"])
    assert len(blob) == HEAL_SIZE
    return blob


# Signals that stay deliverable while we inject: synchronous faults must reach us as
# signal-delivery stops (a forced fault on a blocked signal would reset the handler).
_SYNC_SIGNALS = (4, 5, 7, 8, 11)  # SIGILL SIGTRAP SIGBUS SIGFPE SIGSEGV
INJECT_MASK = 0xFFFFFFFFFFFFFFFF & ~sum(1 << (s - 1) for s in _SYNC_SIGNALS)


class RemoteError(OSError):
    """An injected syscall failed inside the tracee."""


@dataclass
class Scratch:
    addr: int
    size: int = SCRATCH_PAGES * PAGE_SIZE

    @property
    def data(self) -> int:
        return self.addr + PAGE_SIZE

    @property
    def data_size(self) -> int:
        return self.size - PAGE_SIZE


class DataPuts:
    """alloc and cstr over a class's own put(data, align) -> address: the data half of
    the Injector interface the syscalls.* wrappers use (Injector, and kernel/program.py's
    Program and Recording)."""

    def put(self, data: bytes, align: int = 8) -> int:
        raise NotImplementedError

    def alloc(self, size: int, align: int = 8) -> int:
        return self.put(b"\0" * size, align)

    def cstr(self, s: str | bytes) -> int:
        b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
        return self.put(b + b"\0", 1)


class Injector(DataPuts):
    """Injects syscalls into a stopped tracee from a given `syscall` instruction."""

    def __init__(self, tracee: Tracee, template: dict[str, int], mem_fd: int):
        self.tracee = tracee
        self.template = template
        self.mem_fd = mem_fd
        self.insn = 0
        self._regs = None
        self._args = ffi.new("long[6]")
        self._result = ffi.new("long *")
        self._status = ffi.new("int *")
        self.scratch: Scratch | None = None
        self._bump = 0
        #: threads of the process to heal by rt_sigreturn (seccomp.prepare_dump)
        self.sigreturn: frozenset[int] = frozenset()
        #: threads under a seccomp mode (a heal-safe injected program would run its
        #: remaining calls under their filters: kernel/inject_batch.py)
        self.filtered: frozenset[int] = frozenset()

    def use(self, insn: int) -> None:
        self.insn = insn
        from .ptrace import dict_to_regs

        self._regs = dict_to_regs(self.template)

    def for_thread(self, tracee: Tracee) -> Injector:
        """An Injector for another thread of the same process, with this one's template
        registers and scratch area, injecting from the scratch area's `syscall` (a
        restorer's new threads)."""
        other = Injector(tracee, self.template, self.mem_fd)
        other.scratch = self.scratch
        other._regs = self._regs  # the template's, converted once (never written)
        other.insn = self.scratch.addr if self.scratch is not None else self.insn
        return other

    def park(self, nr: int = abi.NR_GETPID, rip: int | None = None) -> None:
        """Point the tracee's registers at the injection site (harmless syscall), or at
        `rip` (the sigreturn heal, which starts without a syscall)."""
        regs = dict(self.template)
        regs.update(rip=self.insn if rip is None else rip, rax=nr, orig_rax=(1 << 64) - 1)
        self.tracee.setregs(regs)

    def raw(self, nr: int, *args: int) -> int:
        """Run one syscall; returns the raw result (negative errno on failure)."""
        for i in range(6):
            a = args[i] if i < len(args) else 0
            self._args[i] = a - (1 << 64) if a >= 1 << 63 else a
        self.tracee.parked = False  # it ends in a syscall-exit stop
        r = lib.ck_inject_syscall(
            self.tracee.pid, self._regs, self.insn, nr, self._args, self._result, self._status
        )
        if r == -errno.ECHILD:
            self.tracee.attached = False
            pid = self.tracee.pid
            raise TraceeGone(f"process {pid} died during syscall injection", pid=pid)
        if r == -errno.EFAULT:
            st = self._status[0]
            raise RemoteError(
                errno.EFAULT,
                f"injected syscall {nr} in {self.tracee.pid} stopped by signal "
                f"{os.WSTOPSIG(st) if os.WIFSTOPPED(st) else st}",
            )
        check(r, "syscall injection", target=self.tracee.pid)
        return self._result[0]

    def call_nr(self, nr: int, *args: int, name: str) -> int:
        r = self.raw(nr, *args)
        if -4096 < r < 0:
            raise RemoteError(-r, f"{name} in process {self.tracee.pid} failed: {os.strerror(-r)}")
        return r

    # -- memory --------------------------------------------------------------------------

    def write(self, addr: int, data: bytes) -> None:
        n = os.pwrite(self.mem_fd, data, addr)
        if n != len(data):
            raise OSError(errno.EIO, f"short write to /proc/{self.tracee.pid}/mem at {addr:#x}")

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self.mem_fd, size, addr)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of /proc/{self.tracee.pid}/mem at {addr:#x}")
        return data

    def reset_data(self) -> None:
        self._bump = 0

    def put(self, data: bytes, align: int = 8) -> int:
        """Copy data into the scratch data area; returns its address in the tracee."""
        assert self.scratch is not None
        off = (self._bump + align - 1) // align * align
        if off + len(data) > self.scratch.data_size:
            raise OSError(errno.ENOSPC, "scratch data area full")
        addr = self.scratch.data + off
        self.write(addr, data)
        self._bump = off + len(data)
        return addr


def open_mem(pid: int) -> int:
    return procfs.open_file(pid, "mem", os.O_RDWR)


# -- finding a site for the bootstrap trampoline ---------------------------------------------


def _exec_segment_ends(path: str) -> list[tuple[int, int]]:
    """(p_offset, p_filesz) of executable PT_LOAD segments of an ELF64 file."""
    try:
        with open(path, "rb") as f:
            eh = f.read(64)
            if len(eh) < 64 or eh[:4] != b"\x7fELF" or eh[4] != 2:
                return []
            (phoff,) = struct.unpack_from("<Q", eh, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", eh, 0x36)
            f.seek(phoff)
            ph = f.read(phentsize * phnum)
    except OSError:
        return []
    out = []
    for i in range(phnum):
        p_type, p_flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", ph, i * phentsize
        )
        if p_type == 1 and p_flags & 1:
            out.append((p_offset, p_filesz))
    return out


def find_bootstrap_site(pid: int, mappings: Iterable[Mapping]) -> int | None:
    """Address of HEAL_SIZE unused bytes at the end of an executable file mapping's last page."""
    for m in mappings:
        if m.perms[2] != "x" or not m.is_file or m.deleted or m.shared:
            continue
        for p_offset, p_filesz in _exec_segment_ends(procfs.map_file(pid, m.start, m.end)):
            seg_end = m.start + (p_offset + p_filesz - m.offset)
            page_end = (seg_end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            if m.start < seg_end and page_end <= m.end and page_end - seg_end >= HEAL_SIZE + 16:
                return page_end - HEAL_SIZE
    return None


# -- the sigreturn heal: threads under seccomp strict mode ---------------------------------
#
# Strict mode allows read, write, exit and rt_sigreturn only: the heal trampoline's
# rt_sigprocmask would kill such a thread if ckpt died mid-injection (and a filter may
# stop it too). Such a thread is put back by one rt_sigreturn instead, with a signal
# frame that holds its resume registers, signal mask and FPU/xstate; the frame is
# written below its stack pointer's red zone (memory the ABI lets signal delivery
# overwrite at any time), inside its stack's VMA, and the bytes there are put back
# when the session closes. Code (in place of HEAL_CODE, same slot size):
#
#     0: syscall                      ; the injected one
#     2: movabs rsp, FRAME + 8        ; rt_sigreturn reads its frame at rsp - 8
#    12: mov eax, 15
#    17: syscall                      ; rt_sigreturn: registers, mask, xstate back
#
# A parked thread starts at offset 2. The frame's sigaltstack has invalid flags, so
# rt_sigreturn leaves the thread's own alone (restore_altstack ignores the error).

SIGRETURN_PARK = 2
_SC_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp",
            "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags")  # fmt: skip
_UC_FLAGS = 0x1 | 0x2 | 0x4  # UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
_FP_XSTATE_MAGIC1, _FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
_FRAME_HEAD = 448  # pretcode 8 + struct ucontext 304 + siginfo 128, 64-byte aligned
_M64 = (1 << 64) - 1


def sigreturn_code(frame: int) -> bytes:
    code = b"\x0f\x05" + b"\x48\xbc" + struct.pack("<Q", frame + 8)
    code += b"\xb8\x0f\x00\x00\x00" + b"\x0f\x05"
    return code.ljust(HEAL_SIZE, b"\xcc")


def sigreturn_frame(resume: dict[str, int], mask: int, xstate: bytes, addr: int) -> bytes:
    """struct rt_sigframe (x86_64) to be placed at `addr` (64-byte aligned), then the
    xstate (the kernel restores it with XRSTOR: PTRACE_GETREGSET's standard format,
    its sw_reserved bytes saying so, and FP_XSTATE_MAGIC2 after it)."""
    fpstate = addr + _FRAME_HEAD
    sc = struct.pack("<18Q", *(resume[n] & _M64 for n in _SC_REGS))
    sc += struct.pack("<4H", resume["cs"], 0, 0, resume["ss"])
    sc += bytes(32) + struct.pack("<Q", fpstate) + bytes(64)
    # uc_flags, uc_link, uc_stack {ss_sp, ss_flags 3 (invalid), ss_size}, mcontext, mask
    uc = struct.pack("<QQQiiQ", _UC_FLAGS, 0, 0, 3, 0, 0) + sc + struct.pack("<Q", mask & _M64)
    head = (bytes(8) + uc).ljust(_FRAME_HEAD, b"\0")
    xs = bytearray(xstate)
    if struct.unpack_from("<I", xs, 464)[0] == _FP_XSTATE_MAGIC1:
        xfeatures = struct.unpack_from("<Q", xs, 472)[0]
    else:
        xfeatures = struct.unpack_from("<Q", xs, 512)[0]  # the header's xstate_bv
    struct.pack_into("<IIQI", xs, 464, _FP_XSTATE_MAGIC1, len(xs) + 4, xfeatures, len(xs))
    return head + bytes(xs) + struct.pack("<I", _FP_XSTATE_MAGIC2)


class StackFrame:
    """One thread's sigreturn frame, below its red zone while a session lasts."""

    def __init__(self, inj: Injector, tracee: Tracee, resume: dict[str, int], mask: int,
                 sp: int, mappings: list[Mapping]):  # fmt: skip
        xstate = tracee.get_xstate()
        size = _FRAME_HEAD + len(xstate) + 4
        addr = (sp - 128 - size) & ~63
        vma = next((m for m in mappings if m.start <= addr and sp <= m.end), None)
        if vma is None or vma.perms[:2] != "rw" or vma.shared:
            raise UnsupportedProcess(
                f"thread {tracee.pid} runs under seccomp (strict mode, or a filter that stops "
                f"ckpt's usual way back) and has no room for ckpt's {size}-byte signal frame "
                "below its stack pointer",
                pid=tracee.pid,
            )
        self.addr = addr
        self.orig = inj.read(addr, size)
        inj.write(addr, sigreturn_frame(resume, mask, xstate, addr))
        self.code = sigreturn_code(addr)

    def restore(self, inj: Injector) -> None:
        inj.write(self.addr, self.orig)


def heal_frame(inj: Injector, tracee: Tracee, resume: dict[str, int], mask: int, sp: int,
               mappings: list[Mapping] | None = None) -> StackFrame | None:  # fmt: skip
    """The sigreturn frame a thread under seccomp needs (seccomp.heal_kind), else None."""
    if tracee.pid not in inj.sigreturn:
        return None
    if mappings is None:
        mappings = procfs.maps(tracee.pid)
    return StackFrame(inj, tracee, resume, mask, sp, mappings)


class DumpInjection:
    """Open/close an injection session on a dump target, heal-safe throughout.

    Order is what makes a SIGKILLed ckpt harmless: the registers are pointed at
    a trampoline before the signal mask is widened, and the mask is restored
    before the registers leave the trampoline.
    """

    def __init__(self, tracee: Tracee, mappings: list[Mapping], regs: dict[str, int], mask: int):
        self.tracee = tracee
        self.mappings = mappings
        self.regs = regs
        self.mask = mask
        from .ptrace import resume_regs

        self.resume = resume_regs(regs)
        self.mem_fd = open_mem(tracee.pid)
        self.inj = Injector(tracee, self.resume, self.mem_fd)
        self.site: int | None = None
        self.site_orig: bytes | None = None
        self.scratch: Scratch | None = None
        self.frame: StackFrame | None = None
        self._entered = False

    def __enter__(self) -> Injector:
        from .. import faults

        try:
            # the target's seccomp filters (or strict mode) let ckpt's syscalls through
            # (suspended while traced), or it is refused before anything is injected
            self.inj.sigreturn = seccomp.prepare_dump(self.tracee, PTRACE_O_TRACESYSGOOD)
            modes = seccomp.frozen_modes(self.tracee)
            self.inj.filtered = frozenset(t for t, m in modes.items() if m[0])
        except BaseException:
            self._cleanup_fd()
            raise
        site = find_bootstrap_site(self.tracee.pid, self.mappings)
        if site is None:
            raise UnsupportedProcess(
                "no safe place for syscall injection (no executable ELF mapping with a free "
                f"page tail of {HEAL_SIZE} bytes)",
                pid=self.tracee.pid,
            )
        try:
            self.frame = heal_frame(
                self.inj, self.tracee, self.resume, self.mask, self.regs["rsp"], self.mappings
            )
        except BaseException:
            self._cleanup_fd()
            raise
        blob = heal_blob(self.resume, self.mask) if self.frame is None else self.frame.code
        self.site_orig = self.inj.read(site, HEAL_SIZE)
        self.site = site
        self.inj.write(site, blob)
        self.inj.use(site)
        self.inj.park(rip=site + SIGRETURN_PARK if self.frame else None)
        self._entered = True
        self.tracee.set_sigmask(INJECT_MASK)
        faults.point("inject-setup")
        size = SCRATCH_PAGES * PAGE_SIZE
        try:
            rwx = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
            addr = syscalls.mmap(
                self.inj, 0, size, rwx, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, (1 << 64) - 1, 0
            )
        except RemoteError as exc:
            self.close()  # the site's bytes, registers and mask back
            pid = self.tracee.pid
            why = os.strerror(exc.errno)
            if exc.errno == errno.EAGAIN:  # mlockall(MCL_FUTURE) locks it too
                why += " (its locked memory is at RLIMIT_MEMLOCK and new mappings are locked)"
            raise UnsupportedProcess(
                f"process {pid}: cannot map ckpt's {size // 1024} KiB scratch area: {why}",
                pid=pid,
            ) from exc
        self.scratch = Scratch(addr)
        self.inj.scratch = self.scratch
        self.inj.write(addr, blob)
        self.inj.use(addr)
        return self.inj

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._entered:
            self._cleanup_fd()
            return
        try:
            if self.scratch is not None and self.tracee.attached:
                self.inj.use(self.site)
                self.inj.raw(abi.NR_MUNMAP, self.scratch.addr, self.scratch.size)
                self.scratch = None
            if self.tracee.attached:
                # Park inside get_signal() first: the original registers, set
                # there verbatim, resume through the kernel's restart rules.
                self.tracee.stop_in_signal_path()
                self.tracee.set_sigmask(self.mask)
                self.tracee.setregs(self.regs)
                self.inj.write(self.site, self.site_orig)
                if self.frame is not None:
                    self.frame.restore(self.inj)
        finally:
            self._entered = False
            self._cleanup_fd()

    def _cleanup_fd(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1


class ThreadInjection:
    """An injection session on one more thread of a process already in a DumpInjection.

    Each thread gets its own heal blob (its own registers and signal mask) in
    `heal_area`, so a ckpt killed while this thread runs an injected syscall
    puts exactly this thread back where it was. The data pages of the leader's
    scratch area are shared: sessions run one after another.
    """

    def __init__(self, tracee: Tracee, regs: dict[str, int], mask: int, main: Injector,
                 blob_addr: int):  # fmt: skip
        from .ptrace import resume_regs

        self.tracee = tracee
        self.regs = regs
        self.mask = mask
        self.inj = Injector(tracee, resume_regs(regs), main.mem_fd)
        self.inj.scratch = main.scratch
        self.inj.sigreturn = main.sigreturn
        self.inj.filtered = main.filtered
        self.blob_addr = blob_addr
        self.frame: StackFrame | None = None
        self._entered = False

    def __enter__(self) -> Injector:
        t = self.inj.template
        self.frame = heal_frame(self.inj, self.tracee, t, self.mask, self.regs["rsp"])
        blob = heal_blob(t, self.mask) if self.frame is None else self.frame.code
        self.inj.write(self.blob_addr, blob)
        self.inj.use(self.blob_addr)
        self.inj.park(rip=self.blob_addr + SIGRETURN_PARK if self.frame else None)
        self._entered = True
        self.tracee.set_sigmask(INJECT_MASK)
        return self.inj

    def __exit__(self, *exc) -> None:
        if self._entered and self.tracee.attached:
            self._entered = False
            self.tracee.stop_in_signal_path()
            self.tracee.set_sigmask(self.mask)
            self.tracee.setregs(self.regs)
            if self.frame is not None:
                self.frame.restore(self.inj)


HEAL_STRIDE = 256  # one heal blob per thread in a heal area


def heal_area_size(nthreads: int) -> int:
    return max(1, (nthreads * HEAL_STRIDE + PAGE_SIZE - 1) // PAGE_SIZE) * PAGE_SIZE
