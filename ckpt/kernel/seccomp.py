"""Seccomp: read a thread's filters (ptrace), judge what they do with a syscall, and
let ckpt's injected syscalls through them (PTRACE_O_SUSPEND_SECCOMP).

A filter is a classic BPF program over `struct seccomp_data` (nr, arch, ip, args).
PTRACE_SECCOMP_GET_FILTER gives a stopped tracee's programs one by one, index 0 the
oldest (kernel/seccomp.c get_nth_filter); PTRACE_SECCOMP_GET_METADATA their flags (only SECCOMP_FILTER_FLAG_LOG is
reported). Both need CAP_SYS_ADMIN and a tracer that is not itself under seccomp;
so does PTRACE_O_SUSPEND_SECCOMP, which makes the kernel skip the tracee's seccomp
checks while it is traced with that option (CRIU's way): ckpt's injected syscalls
are then neither filtered nor fatal in strict mode. The option goes with the tracer:
a ckpt killed mid-dump leaves a tracee whose filters apply again, so what the heal
trampoline runs (`remote.HEAL_CODE`) must be allowed by them (`heal_blocked`).
"""

from __future__ import annotations

import errno
import os
import struct

from ..errors import NoSuchProcess, UnsupportedProcess
from . import abi, procfs
from .native import check, ffi, lib

PTRACE_SETOPTIONS = 0x4200
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
PTRACE_O_SUSPEND_SECCOMP = 0x200000

SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_TSYNC, SECCOMP_FILTER_FLAG_LOG = 1, 2
NR_SECCOMP = abi.NR_SECCOMP
AUDIT_ARCH_X86_64 = 0xC000003E

# actions (the top 16 bits of a filter's return value; KILL_PROCESS is the most severe)
RET_KILL_PROCESS, RET_KILL_THREAD, RET_TRAP, RET_ERRNO = 0x80000000, 0, 0x00030000, 0x00050000
RET_USER_NOTIF, RET_TRACE, RET_LOG, RET_ALLOW = 0x7FC00000, 0x7FF00000, 0x7FFC0000, 0x7FFF0000
RET_ACTION_FULL, RET_DATA = 0xFFFF0000, 0x0000FFFF
#: syscalls strict mode allows (read, write, exit, rt_sigreturn)
STRICT_ALLOWED = frozenset({0, 1, 60, 15})


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


# ---------------------------------------------------------------- reading


def modes(pid: int) -> dict[int, tuple[int, int]]:
    """{tid: (Seccomp mode, Seccomp_filters)} of every thread of pid (/proc status)."""
    out = {}
    for tid in procfs.tasks(pid):
        try:
            st = procfs.parse_status(procfs.read_bytes(pid, "task", str(tid), "status"))
        except NoSuchProcess:
            continue  # a thread that just exited
        out[tid] = (int(st.get("Seccomp", "0")), int(st.get("Seccomp_filters", "0")))
    return out


def frozen_modes(tracee) -> dict[int, tuple[int, int]]:
    """modes() of a process ckpt froze as a group, from its threads' status read once
    per freeze (Tracee.status); modes() when the tracee does not hold every thread."""
    threads = tracee.threads
    if {t.pid for t in threads} != set(procfs.tasks(tracee.pid)):
        return modes(tracee.pid)
    out = {}
    for t in threads:
        st = t.status()
        out[t.pid] = (int(st.get("Seccomp", "0")), int(st.get("Seccomp_filters", "0")))
    return out


def own_mode() -> tuple[int, int]:
    """ckpt's own (mode, filters): under seccomp, ckpt can neither read filters nor
    suspend them (the kernel refuses both to a tracer that is itself filtered)."""
    st = procfs.status(os.getpid())
    return int(st.get("Seccomp", "0")), int(st.get("Seccomp_filters", "0"))


def filters(tid: int) -> list[tuple[bytes, int]]:
    """(program, flags) of every filter of a ptrace-stopped thread, OLDEST first."""
    out = []
    meta = ffi.new("uint64_t[2]")
    for i in range(1 << 16):
        n = lib.ck_ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i, 0)
        if n == -errno.ENOENT:
            break
        check(n, "PTRACE_SECCOMP_GET_FILTER", target=tid)
        buf = ffi.new("char[]", 8 * n)
        got = check(
            lib.ck_ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i, int(ffi.cast("uintptr_t", buf))),
            "PTRACE_SECCOMP_GET_FILTER",
            target=tid,
        )
        meta[0], meta[1] = i, 0
        r = lib.ck_ptrace(PTRACE_SECCOMP_GET_METADATA, tid, 16, int(ffi.cast("uintptr_t", meta)))
        flags = int(meta[1]) if r >= 0 else 0
        out.append((bytes(ffi.buffer(buf, 8 * got)), flags))
    return out


def suspend(tid: int, options: int) -> None:
    """PTRACE_SETOPTIONS(options | PTRACE_O_SUSPEND_SECCOMP) on a stopped tracee."""
    check(
        lib.ck_ptrace(PTRACE_SETOPTIONS, tid, 0, options | PTRACE_O_SUSPEND_SECCOMP),
        "PTRACE_SETOPTIONS(PTRACE_O_SUSPEND_SECCOMP)",
        target=tid,
    )


# ---------------------------------------------------------------- classic BPF


class BadFilter(ValueError):
    """A program the kernel would not have accepted (ckpt cannot judge it)."""


def run(prog: bytes, nr: int, args=(), ip: int = 0, arch: int = AUDIT_ARCH_X86_64) -> int:
    """The filter's return value for one syscall (the kernel's seccomp BPF subset)."""
    a6 = [int(x) & 0xFFFFFFFFFFFFFFFF for x in args] + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, ip & 0xFFFFFFFFFFFFFFFF, *a6)
    ins = [struct.unpack_from("<HBBI", prog, off) for off in range(0, len(prog) - 7, 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    m32 = 0xFFFFFFFF
    for _ in range(len(ins) + 1):  # jumps only go forward: at most len(ins) steps
        if pc >= len(ins):
            break
        code, jt, jf, k = ins[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode = code & 0xE0
            if mode == 0x20 and code & 0x18 == 0:  # ABS, W
                if k & 3 or k + 4 > len(data):
                    raise BadFilter(f"load at offset {k}")
                a = struct.unpack_from("<I", data, k)[0]
            elif mode == 0x80:  # LEN
                a = len(data)
            elif mode == 0x00:  # IMM
                a = k
            elif mode == 0x60:  # MEM
                a = mem[k & 15]
            else:
                raise BadFilter(f"opcode {code:#x}")
        elif cls == 0x01:  # BPF_LDX
            mode = code & 0xE0
            x = {0x00: k, 0x80: len(data), 0x60: mem[k & 15]}.get(mode, -1)
            if x < 0:
                raise BadFilter(f"opcode {code:#x}")
        elif cls == 0x02:  # BPF_ST
            mem[k & 15] = a
        elif cls == 0x03:  # BPF_STX
            mem[k & 15] = x
        elif cls == 0x04:  # BPF_ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                a = a + src
            elif op == 0x10:
                a = a - src
            elif op == 0x20:
                a = a * src
            elif op == 0x30:
                a = a // src if src else 0
            elif op == 0x90:
                a = a % src if src else 0
            elif op == 0x40:
                a = a | src
            elif op == 0x50:
                a = a & src
            elif op == 0xA0:
                a = a ^ src
            elif op == 0x60:
                a = a << src if src < 32 else 0
            elif op == 0x70:
                a = a >> src if src < 32 else 0
            elif op == 0x80:
                a = -a
            else:
                raise BadFilter(f"opcode {code:#x}")
            a &= m32
        elif cls == 0x05:  # BPF_JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
                continue
            taken = {
                0x10: a == src,
                0x20: a > src,
                0x30: a >= src,
                0x40: bool(a & src),
            }.get(op)
            if taken is None:
                raise BadFilter(f"opcode {code:#x}")
            pc += jt if taken else jf
        elif cls == 0x06:  # BPF_RET
            return (a if code & 0x18 == 0x10 else k) & m32
        elif cls == 0x07:  # BPF_MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
        else:  # pragma: no cover - cls is 3 bits
            raise BadFilter(f"opcode {code:#x}")
    raise BadFilter("ran off the end of the program")


def verdict(progs: list[bytes], nr: int, args=(), ip: int = 0) -> int:
    """What a chain of filters returns for a syscall: the most severe action of all
    of them (the kernel runs every filter and keeps the lowest signed action)."""
    best = RET_ALLOW
    for p in progs:
        r = run(p, nr, args, ip)
        if _s32(r & RET_ACTION_FULL) < _s32(best & RET_ACTION_FULL):
            best = r
    return best


def allows(progs: list[bytes], nr: int, args=(), ip: int = 0) -> bool:
    return verdict(progs, nr, args, ip) & RET_ACTION_FULL in (RET_ALLOW, RET_LOG)


def action_name(ret: int) -> str:
    act = ret & RET_ACTION_FULL
    names = {
        RET_KILL_PROCESS: "kills the process", RET_KILL_THREAD: "kills the thread",
        RET_TRAP: "raises SIGSYS", RET_USER_NOTIF: "asks a supervisor",
        RET_TRACE: "asks a tracer", RET_LOG: "allows (logged)", RET_ALLOW: "allows",
    }  # fmt: skip
    if act == RET_ERRNO:
        return f"fails with errno {ret & RET_DATA}"
    return names.get(act, f"returns {ret:#x}")


def returns_user_notif(prog: bytes) -> bool:
    """Can the program hand a syscall to a user-space supervisor (SECCOMP_RET_USER_NOTIF)?
    Its listener fd cannot be restored with it."""
    for off in range(0, len(prog) - 7, 8):
        code, _, _, k = struct.unpack_from("<HBBI", prog, off)
        if code & 0x07 == 0x06 and code & 0x18 == 0 and k & RET_ACTION_FULL == RET_USER_NOTIF:
            return True
    return False


# ---------------------------------------------------------------- the dump's gate

#: syscalls a thread runs on its own if ckpt dies mid-injection: the parked one
#: (getpid: its result is thrown away, so failing is fine) and the heal trampoline's
#: rt_sigprocmask(SIG_SETMASK, &mask, NULL, 8), which must run
PARK_CALL, HEAL_CALL = (39, ()), (14, (2, 0x1000, 0, 8))
NR_RT_SIGRETURN = 15


def heal_blocked(progs: list[bytes]) -> str | None:
    """Why a filter chain would stop the heal trampoline of a thread whose ckpt died,
    or None when it lets it through."""
    park = verdict(progs, *PARK_CALL)
    if park & RET_ACTION_FULL not in (RET_ALLOW, RET_LOG, RET_ERRNO, RET_TRACE):
        return f"its seccomp filter {action_name(park)} for getpid"
    if not allows(progs, *HEAL_CALL):
        return f"its seccomp filter {action_name(verdict(progs, *HEAL_CALL))} for rt_sigprocmask"
    return None


def heal_kind(tid: int) -> str | None:
    """How a thread is put back should ckpt die while it injects into it (remote.py):
    "classic" (the heal trampoline: rt_sigprocmask, then a jump back), "sigreturn"
    (one rt_sigreturn with a frame on the thread's stack: strict mode allows only
    read, write, exit and rt_sigreturn; or a filter that stops the classic path), or
    None when its filters stop both."""
    st = procfs.parse_status(procfs.read_bytes(tid, "status"))
    mode = int(st.get("Seccomp", "0"))
    if mode == 0 or own_mode()[0]:  # ckpt under seccomp: only filters it shares (its own)
        return "classic"
    if mode == SECCOMP_MODE_STRICT:
        return "sigreturn"
    progs = [p for p, _ in filters(tid)]
    if heal_blocked(progs) is None:
        return "classic"
    return "sigreturn" if allows(progs, NR_RT_SIGRETURN) else None


def prepare_dump(tracee, options: int) -> frozenset[int]:
    """Before ckpt injects anything into a frozen process: make its threads' seccomp
    state (filters, strict mode) let the injected syscalls through, or refuse it.
    Returns the threads to heal by rt_sigreturn (heal_kind).

    options: the ptrace options the threads were seized with. Refused (exit 5, one
    line naming the process and thread): filters that would also stop every way back
    of a thread whose ckpt died mid-dump (heal_kind); any filter beyond ckpt's own, or
    strict mode, while ckpt itself runs under seccomp (it can then neither read nor
    suspend them: only filters it shares, a container's, pass).
    """
    pid = tracee.pid
    found = {t: m for t, m in frozen_modes(tracee).items() if m[0]}
    if not found:
        return frozenset()
    comm = procfs.stat(pid).comm.decode(errors="replace")
    mine = own_mode()
    sigreturn = set()
    for tid, (mode, n) in sorted(found.items()):
        who = f"process {pid} ({comm})" + (f", thread {tid}" if tid != pid else "")
        if mine[0]:
            if mode == SECCOMP_MODE_STRICT or n > mine[1]:
                what = "runs in seccomp strict mode" if mode == 1 else f"has {n} seccomp filters"
                raise UnsupportedProcess(
                    f"{who} {what}, and ckpt itself runs under seccomp (mode {mine[0]}, "
                    f"{mine[1]} filters): it can neither read nor suspend them",
                    pid=pid,
                )
            continue  # only ckpt's own (inherited) filters: the restorer has them too
        kind = heal_kind(tid)
        if kind == "sigreturn":
            sigreturn.add(tid)
        if kind is None:
            progs = [p for p, _ in filters(tid)]
            why = heal_blocked(progs)
            ret = action_name(verdict(progs, NR_RT_SIGRETURN))
            raise UnsupportedProcess(
                f"{who}: {why} and {ret} for rt_sigreturn: ckpt could not put the thread "
                "back should it be killed mid-dump; not supported",
                pid=pid,
            )
    if mine[0]:
        return frozenset()
    for t in tracee.threads:
        if t.attached and t.pid in found:
            suspend(t.pid, options)
    return frozenset(sigreturn)
