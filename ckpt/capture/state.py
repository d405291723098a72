"""Per-process and per-thread state read inside the target by injected syscalls.

Some state has no /proc or ptrace interface (signal actions, brk, the
alternate signal stack, itimers, POSIX timer values, clear_child_tid): ask the
target itself, through the heal-safe Injector.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .. import faults
from ..kernel import abi, inject_batch, procfs, syscalls
from ..kernel.ptrace import Tracee
from ..kernel.remote import HEAL_STRIDE, Injector, ThreadInjection, heal_area_size
from ..model import ITimer, PosixTimer, SigAction

# /proc/PID/timers names sigev_notify without SIGEV_THREAD_ID (4), shown as "/tid.N"
SIGEV = {"signal": 0, "none": 1, "thread": 2}
BATCH_MIN = 3  # threads besides the leader from which their injections are batched


def sigactions(inj: Injector) -> list[SigAction]:
    inj.reset_data()
    buf = inj.alloc(32 * 64)
    for sig in range(1, 65):
        if sig in (9, 19):
            continue
        syscalls.rt_sigaction(inj, sig, 0, buf + 32 * (sig - 1), 8)
        if sig == 32:
            faults.point("inject")
    raw = inj.read(buf, 32 * 64)
    out = []
    for sig in range(1, 65):
        if sig in (9, 19):
            continue
        handler, flags, restorer, mask = struct.unpack_from("<QQQQ", raw, 32 * (sig - 1))
        if handler or flags or mask:
            out.append(SigAction(sig, handler, flags, restorer, mask))
    return out


def thread_misc(inj: Injector) -> tuple[list[int], int]:
    """The calling thread's (sigaltstack, clear_child_tid): per-thread, no /proc view."""
    inj.reset_data()
    ss = inj.alloc(24)
    syscalls.sigaltstack(inj, 0, ss)
    sp, flags, _pad, size = struct.unpack("<QiiQ", inj.read(ss, 24))
    tid_addr = inj.alloc(8)
    syscalls.prctl(inj, abi.PR_GET_TID_ADDRESS, tid_addr, 0, 0, 0)
    ctid = struct.unpack("<Q", inj.read(tid_addr, 8))[0]
    return [sp, flags & ~1, size], ctid  # SS_ONSTACK is status, not a setting


def other_threads_misc(
    inj: Injector,
    threads: list[Tracee],
    regs: list[dict[str, int]],
    masks: list[int],
    also: Callable[[int, Injector], None] | None = None,
    marker: int = 0,
) -> list[tuple[list[int], int]]:
    """thread_misc() of each non-leader thread, each in its own heal-safe session;
    also(tid, injector) runs in that session too.

    The first thread runs them recorded; when its calls only read state, the others
    run the same calls all at once (kernel/inject_batch.py: ~10 injected syscalls per
    thread cost ~0.6 ms each thread one after the other), and a thread whose replay
    takes another path runs on its own after. marker: a signal the process ignores
    (inject_batch.ignored_marker), 0 if none: with one, and no thread of the batch
    under seccomp, each thread runs its calls as one injected program."""
    if not threads:
        return []
    size = heal_area_size(len(threads))
    rwx = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
    area = syscalls.mmap(inj, 0, size, rwx, abi.MAP_PRIVATE | abi.MAP_ANONYMOUS, (1 << 64) - 1, 0)
    out: dict[int, tuple[list[int], int]] = {}

    def work(tid: int, tinj) -> None:
        out[tid] = thread_misc(tinj)
        if also is not None:
            also(tid, tinj)

    def one(i: int, t: Tracee, wrap=None) -> None:
        with ThreadInjection(t, regs[i], masks[i], inj, area + i * HEAL_STRIDE) as tinj:
            if wrap is None and i == len(threads) // 2:
                faults.point("inject-thread")  # mid-way, inside one thread's session
            work(t.pid, tinj if wrap is None else wrap(tinj))

    try:
        rest = list(range(len(threads)))
        if len(threads) >= BATCH_MIN:
            rec: list[inject_batch.Recorder] = []
            one(0, threads[0], lambda tinj: rec.append(inject_batch.Recorder(tinj)) or rec[0])
            rest = rest[1:]
            batch = [i for i in rest if threads[i].pid not in inj.sigreturn]
            if rec[0].ok and rec[0].calls and batch:
                filtered = any(threads[i].pid in inj.filtered for i in batch)
                diverged = inject_batch.run_batch(
                    rec[0], inj, [threads[i] for i in batch], [regs[i] for i in batch],
                    [masks[i] for i in batch], [area + i * HEAL_STRIDE for i in batch], work,
                    checkpoint=lambda: faults.point("inject-thread"),
                    marker=0 if filtered else marker,
                )  # fmt: skip
                again = {t.pid for t in diverged}
                rest = [i for i in rest if i not in batch or threads[i].pid in again]
        for i in rest:
            one(i, threads[i])
    finally:
        syscalls.munmap(inj, area, size)
    return [out[t.pid] for t in threads]


def misc(inj: Injector) -> dict:
    inj.reset_data()
    out: dict = {}
    out["brk"] = syscalls.brk(inj, 0)
    out["sigaltstack"], out["clear_child_tid"] = thread_misc(inj)
    inj.reset_data()
    out["dumpable"] = syscalls.prctl(inj, abi.PR_GET_DUMPABLE, 0, 0, 0, 0)
    out["no_new_privs"] = bool(syscalls.prctl(inj, abi.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
    out["thp_disable"] = syscalls.prctl(inj, abi.PR_GET_THP_DISABLE, 0, 0, 0, 0)
    sub = inj.alloc(4)
    syscalls.prctl(inj, abi.PR_GET_CHILD_SUBREAPER, sub, 0, 0, 0)
    out["child_subreaper"] = struct.unpack("<i", inj.read(sub, 4))[0]
    return out


def itimers(inj: Injector) -> list[ITimer]:
    inj.reset_data()
    buf = inj.alloc(32 * 3)
    out = []
    for which in range(3):
        syscalls.getitimer(inj, which, buf + 32 * which)
    raw = inj.read(buf, 96)
    for which in range(3):
        isec, iusec, vsec, vusec = struct.unpack_from("<qqqq", raw, 32 * which)
        if isec or iusec or vsec or vusec:
            out.append(ITimer(which, isec * 1_000_000 + iusec, vsec * 1_000_000 + vusec))
    return out


def posix_timers(inj: Injector, pid: int) -> list[PosixTimer]:
    try:
        listed = procfs.parse_timers(procfs.read_bytes(pid, "timers"))
    except FileNotFoundError:
        return []
    out = []
    inj.reset_data()
    buf = inj.alloc(32)
    threads = set(procfs.tasks(pid)) if any(t.by_tid for t in listed) else set()
    for t in listed:
        syscalls.timer_gettime(inj, t.id, buf)
        isec, insec, vsec, vnsec = struct.unpack("<qqqq", inj.read(buf, 32))
        notify = SIGEV.get(t.notify, 0)
        if t.by_tid:  # to one thread (glibc's SIGEV_THREAD helper); gone: delivers nothing
            notify = notify | abi.SIGEV_THREAD_ID if t.notify_tid in threads else SIGEV["none"]
        out.append(
            PosixTimer(
                id=t.id, clock_id=t.clock_id, signo=t.signo, sigev_value=t.sigev_value,
                notify=notify,
                notify_tid=t.notify_tid,
                interval_ns=isec * 1_000_000_000 + insec, value_ns=vsec * 1_000_000_000 + vnsec,
            )
        )  # fmt: skip
    return out


def close_leftover_uffds(inj: Injector, pid: int) -> list[int]:
    """Close uffds a killed ckpt may have left in the target (never handshaken, ours)."""
    closed = []
    for fd in procfs.fds(pid):
        try:
            if procfs.readlink(pid, "fd", str(fd)) != "anon_inode:[userfaultfd]":
                continue
            info = procfs.parse_fdinfo(procfs.read_bytes(pid, "fdinfo", str(fd)))
        except Exception:
            continue
        if info.extra.get("API", "").split(":")[1:2] == ["0"]:
            syscalls.close(inj, fd)
            closed.append(fd)
    return closed
