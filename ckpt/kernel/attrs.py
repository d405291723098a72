"""Process and thread attributes read or set from outside the target (no injection):
scheduling, CPU affinity, I/O priority, /proc knobs, guard regions, syscall user
dispatch. The injected parts are in capture/attrs.py and restore/attrs.py."""

from __future__ import annotations

import errno
import os
import struct

from . import abi, procfs
from . import uffd as U
from .native import PAGE_SIZE, check, ffi, lib

NR_IOPRIO_SET, NR_IOPRIO_GET, NR_SCHED_SETATTR, NR_SCHED_GETATTR = 251, 252, 314, 315
NR_MADVISE = abi.NR_MADVISE
IOPRIO_WHO_PROCESS = 1
SCHED_ATTR = struct.Struct("<IIQiIQQQII")  # size 56 (SCHED_ATTR_SIZE_VER1)
SCHED_FLAG_RESET_ON_FORK, SCHED_FLAG_RECLAIM, SCHED_FLAG_DL_OVERRUN = 0x01, 0x02, 0x04
SCHED_FLAG_UTIL_CLAMP = 0x20 | 0x40
SCHED_KEEP = SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_RECLAIM | SCHED_FLAG_DL_OVERRUN
SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
FAIR = (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)
MADV_GUARD_INSTALL = 102
PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG = 0x4211
PF_MEMALLOC_NOIO, PF_LOCAL_THROTTLE = 0x00080000, 0x00100000
IO_FLUSHER = PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE

# (policy, flags, nice, priority, runtime, deadline, period, util_min, util_max)
Sched = tuple[int, int, int, int, int, int, int, int, int]


def sched_getattr(tid: int) -> Sched:
    """sched_getattr, with the nice value from getpriority: sched_getattr shows 0 for a
    real-time thread, which keeps the nice value it had (and gets it back on a fair
    policy, or in a child forked with SCHED_FLAG_RESET_ON_FORK)."""
    buf = ffi.new("char[]", SCHED_ATTR.size)
    addr = int(ffi.cast("uintptr_t", buf))
    check(lib.ck_syscall(NR_SCHED_GETATTR, tid, addr, SCHED_ATTR.size, 0, 0, 0), "sched_getattr",
          target=tid)  # fmt: skip
    _size, policy, flags, _nice, prio, rt, dl, per, umin, umax = SCHED_ATTR.unpack(
        ffi.buffer(buf)[:]
    )
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    return (policy, flags, nice, prio, rt, dl, per, umin, umax)


def sched_setattr(tid: int, want: Sched) -> None:
    """Set `want` on thread `tid` (from ckpt: needs CAP_SYS_NICE to raise anything).

    A real-time or deadline policy keeps the nice value it had under a fair one, so
    the nice value goes first; the utilization clamps only when they differ."""
    policy, flags, nice, prio, rt, dl, per, umin, umax = want
    have = sched_getattr(tid)
    if policy not in FAIR and have[2] != nice:
        _setattr(tid, (SCHED_OTHER, 0, nice, 0, 0, 0, 0, 0, 0))
    flags &= SCHED_KEEP
    if (have[7], have[8]) != (umin, umax):
        flags |= SCHED_FLAG_UTIL_CLAMP
    _setattr(tid, (policy, flags, nice, prio, rt, dl, per, umin, umax))


def _setattr(tid: int, a: Sched) -> None:
    raw = SCHED_ATTR.pack(SCHED_ATTR.size, *a)
    buf = ffi.new("char[]", raw)
    addr = int(ffi.cast("uintptr_t", buf))
    check(lib.ck_syscall(NR_SCHED_SETATTR, tid, addr, 0, 0, 0, 0), "sched_setattr", target=tid)


def ioprio_get(tid: int) -> int:
    return check(lib.ck_syscall(NR_IOPRIO_GET, IOPRIO_WHO_PROCESS, tid, 0, 0, 0, 0),
                 "ioprio_get", target=tid)  # fmt: skip


def ioprio_set(tid: int, value: int) -> None:
    check(lib.ck_syscall(NR_IOPRIO_SET, IOPRIO_WHO_PROCESS, tid, value, 0, 0, 0), "ioprio_set",
          target=tid)  # fmt: skip


def affinity(tid: int) -> list[int]:
    return sorted(os.sched_getaffinity(tid))


def set_affinity(tid: int, cpus: list[int]) -> None:
    os.sched_setaffinity(tid, cpus)


def read_knob(pid: int, name: str) -> str:
    """/proc/PID/<name>: oom_score_adj, coredump_filter."""
    return procfs.read_bytes(pid, name).decode().strip()


def write_knob(pid: int, name: str, value: str) -> None:
    with open(procfs.path(pid, name), "w") as f:
        f.write(value)


def sud_mode(tid: int) -> int:
    """Syscall user dispatch mode of a thread we hold stopped (0 off, 1 on); 0 on a
    kernel without PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG (added with it, in 6.4)."""
    cfg = ffi.new("uint64_t[4]")
    r = lib.ck_ptrace(PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG, tid, 32,
                      int(ffi.cast("uintptr_t", cfg)))  # fmt: skip
    if r in (-errno.EIO, -errno.EINVAL):
        return 0
    check(r, "PTRACE_GET_SYSCALL_USER_DISPATCH_CONFIG", target=tid)
    return int(cfg[0])


def guard_runs(pm_fd: int, start: int, end: int) -> list[list[int]]:
    """Guard regions (MADV_GUARD_INSTALL) of [start, end) as [vaddr, npages] runs, by
    PAGEMAP_SCAN PAGE_IS_GUARD (a walk of the page tables only: <1 ms per GiB)."""
    out: list[list[int]] = []
    pos = start
    while pos < end:
        scan = U.pagemap_scan(pm_fd, pos, end, mask=U.Category.GUARD,
                              return_mask=U.Category.GUARD, vec_len=256)  # fmt: skip
        for r in scan.regions:
            if out and out[-1][0] + out[-1][1] * PAGE_SIZE == r.start:
                out[-1][1] += r.pages
            else:
                out.append([r.start, r.pages])
        if scan.walk_end <= pos:
            break
        pos = scan.walk_end
    return out


def guard_supported() -> bool:
    """Can this kernel report guard regions (PAGEMAP_SCAN PAGE_IS_GUARD, Linux 6.14+)?"""
    from .features import probe

    return probe().pagemap_scan_guard


def own_thread_state() -> dict[str, int | list[int] | None]:
    """ckpt's own per-thread state that a restorer and its threads inherit (timer slack,
    TSC mode, machine-check policy, cpuid faulting, memory policy): what restore compares
    with instead of asking every restored thread."""
    out: dict[str, int | list[int] | None] = {}
    out["timerslack"] = lib.ck_syscall(157, 30, 0, 0, 0, 0, 0)  # PR_GET_TIMERSLACK
    val = ffi.new("int[2]")
    addr = int(ffi.cast("uintptr_t", val))
    out["tsc"] = val[0] if lib.ck_syscall(157, 25, addr, 0, 0, 0, 0) == 0 else None
    out["mce_kill"] = lib.ck_syscall(157, 34, 0, 0, 0, 0, 0)  # PR_MCE_KILL_GET
    out["cpuid"] = lib.ck_syscall(158, 0x1011, 0, 0, 0, 0, 0)  # ARCH_GET_CPUID
    nodes = ffi.new("uint64_t[16]")
    r = lib.ck_syscall(239, addr, int(ffi.cast("uintptr_t", nodes)), 1024, 0, 0, 0)
    if r == 0:
        mask = int.from_bytes(ffi.buffer(nodes)[:], "little")
        out["mempolicy"] = [val[0], mask if val[0] else 0]
    else:
        out["mempolicy"] = None
    return out
