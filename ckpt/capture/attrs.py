"""Process and thread attributes (docs/ARCHITECTURE.md "Process attributes").

What the kernel shows from outside is read from outside (scheduling, affinity, I/O
priority, /proc knobs, guard regions); the rest (prctl and arch_prctl getters, the
membarrier registrations) by injected syscalls in each thread's own session. What
ckpt can detect but not restore is refused by refuse() / refuse_traced() before
anything is injected (exit 5, one line naming the process and thread).
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import os
import struct
import subprocess

from ..errors import NoSuchProcess, UnsupportedProcess
from ..kernel import abi, procfs, syscalls
from ..kernel import attrs as K
from ..kernel.ptrace import Tracee
from ..kernel.remote import Injector, RemoteError
from ..model import ProcAttrs, SchedAttr, ThreadAttrs, Vma
from ..units import PAGE_SIZE

NODEMASK_BITS = 1024
SPEC_KINDS = 3  # PR_SPEC_STORE_BYPASS, PR_SPEC_INDIRECT_BRANCH, PR_SPEC_L1D_FLUSH
ALL_ONES = (1 << 64) - 1
NO_GUARDS = ("vdso", "vvar", "vvar_vclock")


# -- refused up front ---------------------------------------------------------------------


def refuse(pid: int, frozen: Tracee | None = None) -> None:
    """What /proc shows that ckpt cannot bring back: refuse before anything is injected
    (called when the dump starts, and again on every member of the frozen tree).
    frozen: the process's threads, stopped by ckpt: their files are read through the
    Tracee, once per freeze (Tracee.status, Tracee.stat: capture reads them too)."""
    own_caps = int(procfs.status(os.getpid()).get("CapEff", "0"), 16)
    # the flags (stat) matter only without CAP_SYS_RESOURCE: not read otherwise
    need_flags = not own_caps >> abi.CAP_SYS_RESOURCE & 1
    for tid, status_of, stat_of in _thread_views(pid, frozen, need_flags):
        try:
            status = status_of()
            flags = stat_of().flags if need_flags else 0
        except NoSuchProcess:
            continue  # a thread that just exited
        mask = status.get("untag_mask", "")
        if mask and int(mask, 16) != ALL_ONES:
            raise UnsupportedProcess(
                f"{_who(pid, tid)} uses linear address masking (LAM, untag_mask {mask}): "
                "not supported",
                pid=pid,
            )
        feats = status.get("x86_Thread_features", "").strip()
        if feats:
            raise UnsupportedProcess(
                f"{_who(pid, tid)} has x86 thread features enabled ({feats}: a shadow "
                "stack): not supported",
                pid=pid,
            )
        if need_flags and flags & K.IO_FLUSHER == K.IO_FLUSHER:
            raise UnsupportedProcess(
                f"{_who(pid, tid)} is an I/O flusher (PR_SET_IO_FLUSHER): setting it again "
                "needs CAP_SYS_RESOURCE, which ckpt lacks",
                pid=pid,
            )
        if not own_caps >> abi.CAP_SYS_NICE & 1:
            try:
                s = K.sched_getattr(tid)
            except OSError:
                continue
            if s[0] not in K.FAIR or s[2] < os.getpriority(os.PRIO_PROCESS, 0):
                raise UnsupportedProcess(
                    f"{_who(pid, tid)} has scheduling policy {s[0]}, nice {s[2]}: setting "
                    "it again needs CAP_SYS_NICE, which ckpt lacks",
                    pid=pid,
                )
    _refuse_oom(pid)


# The status lines refuse() reads (the frozen view's dict holds every line).
_REFUSE_KEYS = ("untag_mask", "x86_Thread_features")


def _thread_views(pid: int, frozen: Tracee | None, stats: bool = True):
    """(tid, status(), stat()) of each thread: through the frozen Tracees, else read
    (each file of all threads in one call; stat only when `stats`)."""
    if frozen is not None:
        frozen.read_proc()  # every thread's status and stat in one call each
        return [(t.pid, t.status, t.stat) for t in frozen.threads]

    def view(tid: int, raw: bytes | None, raw_stat: bytes | None):
        def status() -> dict[str, str]:
            if raw is None:
                raise NoSuchProcess(f"thread {tid} exited", pid=pid)
            return procfs.status_values(raw, _REFUSE_KEYS)

        def stat() -> procfs.Stat:
            if raw_stat is None:
                raise NoSuchProcess(f"thread {tid} exited", pid=pid)
            return procfs.parse_stat(raw_stat)

        return tid, status, stat

    tids = procfs.tasks(pid)
    texts = procfs.read_task_files(pid, tids, "status")
    st = procfs.read_task_files(pid, tids, "stat") if stats else [None] * len(tids)
    return [view(*v) for v in zip(tids, texts, st)]


def refuse_traced(tracee: Tracee) -> None:
    """What only ptrace shows (the threads are stopped by us): syscall user dispatch
    would turn ckpt's injected syscalls into SIGSYS in the target."""
    for t in [tracee, *tracee.others]:
        try:
            mode = K.sud_mode(t.pid)
        except OSError:
            continue
        if mode:
            raise UnsupportedProcess(
                f"{_who(tracee.pid, t.pid)} uses syscall user dispatch "
                "(PR_SET_SYSCALL_USER_DISPATCH): not supported (ckpt's injected syscalls "
                "would be dispatched to its SIGSYS handler)",
                pid=tracee.pid,
            )


def _refuse_oom(pid: int) -> None:
    """oom_score_adj is written for the restored process by ckpt, which (without
    CAP_SYS_RESOURCE) cannot go below the floor it inherited (oom_score_adj_min; a
    restorer inherits ckpt's). The floor has no /proc view: a value below ckpt's own
    is tried in a child of ckpt."""
    value = int(K.read_knob(pid, "oom_score_adj"))
    if value >= int(K.read_knob(os.getpid(), "oom_score_adj")) or _own_cap(abi.CAP_SYS_RESOURCE):
        return
    probe = subprocess.run(
        ["/bin/sh", "-c", f"echo {value} > {procfs.in_target('self', 'oom_score_adj')}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        raise UnsupportedProcess(
            f"process {pid} has oom_score_adj {value}, below what ckpt may set "
            "(lowering it needs CAP_SYS_RESOURCE)",
            pid=pid,
        )


def _who(pid: int, tid: int) -> str:
    try:
        comm = procfs.stat(pid).comm.decode(errors="replace")
    except NoSuchProcess:
        comm = "?"
    return f"process {pid} ({comm})" + (f", thread {tid}," if tid != pid else "")


def _own_cap(cap: int) -> bool:
    return bool(int(procfs.status(os.getpid()).get("CapEff", "0"), 16) >> cap & 1)


# -- captured -----------------------------------------------------------------------------


def thread_outside(tid: int, st: procfs.Stat | None = None) -> ThreadAttrs:
    """The parts of a thread's attributes read from outside (scheduling, affinity, I/O
    priority, the I/O flusher flags). st: its stat, when read already (Tracee.stat)."""
    policy, flags, nice, prio, rt, dl, per, umin, umax = K.sched_getattr(tid)
    if st is None:
        st = procfs.parse_stat(procfs.read_bytes(tid, "stat"))
    return ThreadAttrs(
        sched=SchedAttr(policy, flags & K.SCHED_KEEP, nice, prio, rt, dl, per, umin, umax),
        affinity=K.affinity(tid), ioprio=K.ioprio_get(tid),
        io_flusher=st.flags & K.IO_FLUSHER == K.IO_FLUSHER,
    )  # fmt: skip


def thread_injected(inj: Injector, a: ThreadAttrs) -> None:
    """The calling thread's prctl / arch_prctl state (no view from outside), into `a`."""
    inj.reset_data()
    buf = inj.alloc(8)
    syscalls.prctl(inj, abi.PR_GET_PDEATHSIG, buf, 0, 0, 0)
    a.pdeathsig = struct.unpack("<i", inj.read(buf, 4))[0]
    a.timerslack = syscalls.prctl(inj, abi.PR_GET_TIMERSLACK, 0, 0, 0, 0)
    syscalls.prctl(inj, abi.PR_GET_TSC, buf, 0, 0, 0)
    a.tsc = struct.unpack("<i", inj.read(buf, 4))[0]
    a.mce_kill = syscalls.prctl(inj, abi.PR_MCE_KILL_GET, 0, 0, 0, 0)
    if _cpuid_faulting():
        a.cpuid = syscalls.arch_prctl(inj, abi.ARCH_GET_CPUID, 0)
    try:  # the thread's memory policy (set_mempolicy); ENOSYS without CONFIG_NUMA
        nodes = inj.alloc(NODEMASK_BITS // 8)
        syscalls.get_mempolicy(inj, buf, nodes, NODEMASK_BITS, 0, 0)
        mode = struct.unpack("<i", inj.read(buf, 4))[0]
        mask = int.from_bytes(inj.read(nodes, NODEMASK_BITS // 8), "little")
        a.mempolicy = [mode, mask if mode else 0]
    except RemoteError:
        a.mempolicy = None
    ctl = spec_controls()
    if any(ctl):
        a.spec = [
            syscalls.prctl(inj, abi.PR_GET_SPECULATION_CTRL, k, 0, 0, 0) if ctl[k] else 0
            for k in range(SPEC_KINDS)
        ]


def process_attrs(inj: Injector, pid: int) -> ProcAttrs:
    """Per-process attributes: /proc knobs from outside, the rest injected (leader)."""
    a = ProcAttrs(
        oom_score_adj=int(K.read_knob(pid, "oom_score_adj")),
        coredump_filter=int(K.read_knob(pid, "coredump_filter"), 16),
    )
    inj.reset_data()
    try:
        a.membarrier = syscalls.membarrier(inj, abi.MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0)
    except RemoteError:
        a.membarrier = -1  # before Linux 6.3: registrations cannot be read
    try:
        a.ksm_merge_any = bool(syscalls.prctl(inj, abi.PR_GET_MEMORY_MERGE, 0, 0, 0, 0))
    except RemoteError:
        a.ksm_merge_any = False  # before Linux 6.4: no such thing
    return a


def guards(pid: int, vmas: list[Vma]) -> None:
    """Each VMA's guard regions (pagemap PM_GUARD_REGION, via PAGEMAP_SCAN): one scan
    over each stretch of VMAs between the vDSO's (not one per VMA: a process with many
    threads has thousands), its runs cut at the VMAs' bounds."""
    if not K.guard_supported():
        return
    fd = os.open(procfs.path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        stretch: list[Vma] = []
        for v in [*vmas, None]:
            if v is not None and v.kind not in NO_GUARDS:
                v.guards = []
                stretch.append(v)
                continue
            if stretch:
                _cut(K.guard_runs(fd, stretch[0].start, stretch[-1].end), stretch)
            stretch = []
    finally:
        os.close(fd)


def _cut(runs: list[list[int]], vmas: list[Vma]) -> None:
    """Hand [vaddr, npages] runs to the VMAs (sorted, disjoint) they fall in."""
    starts = [v.start for v in vmas]
    for addr, npages in runs:
        end = addr + npages * PAGE_SIZE
        i = max(bisect.bisect_right(starts, addr) - 1, 0)
        while i < len(vmas) and vmas[i].start < end:
            lo, hi = max(addr, vmas[i].start), min(end, vmas[i].end)
            if lo < hi:
                vmas[i].guards.append([lo, (hi - lo) // PAGE_SIZE])
            i += 1


@functools.cache
def spec_controls() -> tuple[bool, ...]:
    """Which speculation controls this system lets prctl set (PR_SPEC_PRCTL): a boot-time
    choice, the same for every process, so ckpt asks itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    out = []
    for k in range(SPEC_KINDS):
        r = libc.prctl(abi.PR_GET_SPECULATION_CTRL, k, 0, 0, 0)
        out.append(r >= 0 and bool(r & abi.PR_SPEC_PRCTL))
    return tuple(out)


@functools.cache
def _cpuid_faulting() -> bool:
    """ARCH_SET_CPUID works only where the CPU can fault on cpuid."""
    try:
        with open(procfs.system("cpuinfo")) as f:
            for line in f:
                if line.startswith("flags"):
                    return "cpuid_fault" in line.split()
    except OSError:
        pass
    return False


def refuse_frozen(members: list[Tracee]) -> None:
    """refuse() and refuse_traced() for every process of a frozen tree, before the
    first injection into any of them."""
    for t in members:
        refuse(t.pid, t)
        refuse_traced(t)
