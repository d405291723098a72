"""Process and thread attributes back (capture/attrs.py; docs/ARCHITECTURE.md "Process
attributes"), called by the Rebuilder at four points:

    before_finish   the pages are written: guard regions (installing one zaps its pages),
                    names of anonymous memory
    after_finish    every VMA has its protection and advice: mseal last (a sealed VMA
                    refuses mprotect, madvise and munmap)
    before_creds    injected, with ckpt's privileges still: per-thread prctl and
                    arch_prctl state, membarrier registrations, KSM
    after_creds     what a change of credentials resets (the parent-death signal), then
                    from ckpt: affinity, I/O priority, scheduling (per thread), and the
                    /proc knobs

Anything the restorer already has as it should (inherited from ckpt) is left alone.
"""

from __future__ import annotations

import functools
import os
import signal
from typing import TYPE_CHECKING

from ..errors import RestoreError, UsageError
from ..kernel import abi, syscalls
from ..kernel import attrs as K
from ..kernel.native import PAGE_SIZE
from ..kernel.remote import Injector, RemoteError
from ..model import ProcessImage, ThreadAttrs

if TYPE_CHECKING:
    from .rebuild import Rebuilder

NODEMASK_BITS = 1024


def check_detach(root: ProcessImage) -> None:
    """The root of the restore is ckpt's child: its parent-death signal watches ckpt,
    which stands in for the parent it had (outside the dump). `restore --detach` exits
    at once, and the kernel would send the signal right away: refused up front."""
    for t in root.threads:
        sig = t.attrs.pdeathsig if t.attrs is not None else 0
        if sig:
            who = f"process {root.pid}" + (f", thread {t.tid}," if t.tid != root.pid else "")
            raise UsageError(
                f"{who} has a parent-death signal ({_signame(sig)}, PR_SET_PDEATHSIG): with "
                "--detach it would get it as soon as ckpt exits; restore without --detach "
                "(ckpt then stays its parent)"
            )


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def exit_signal(p: ProcessImage) -> int:
    """The signal a tree member sends its parent when it exits (clone's exit_signal)."""
    return p.attrs.exit_signal if p.attrs is not None else abi.SIGCHLD


def _threads(rb: Rebuilder):
    """(image thread, restored tid, injector) of every thread, the leader first."""
    yield rb.proc.threads[0], rb.pid, rb.inj
    for t, tr, tinj in rb.threads:
        yield t, tr.pid, tinj


def before_finish(rb: Rebuilder) -> None:
    inj = rb.inj
    for v in rb.proc.vmas:
        for start, npages in v.guards:
            try:
                syscalls.madvise(inj, start, npages * PAGE_SIZE, K.MADV_GUARD_INSTALL)
            except RemoteError as exc:
                raise RestoreError(
                    f"cannot install the guard region {start:#x} ({npages} pages) of process "
                    f"{rb.proc.pid}: {exc.strerror}"
                ) from exc
        if v.kind == "anon" and v.name.startswith("[anon:") and v.name.endswith("]"):
            inj.reset_data()
            name = inj.cstr(v.name[6:-1])
            syscalls.prctl(inj, abi.PR_SET_VMA, abi.PR_SET_VMA_ANON_NAME, v.start, v.size, name)


def after_finish(rb: Rebuilder) -> None:
    for v in rb.proc.vmas:
        if "sl" in v.vmflags:
            syscalls.mseal(rb.inj, v.start, v.size, 0)


def before_creds(rb: Rebuilder) -> None:
    p = rb.proc.attrs
    if p is not None:
        inj = rb.inj
        if p.membarrier > 0:
            for cmd in abi.MEMBARRIER_REGISTER:
                if p.membarrier & cmd:
                    syscalls.membarrier(inj, cmd, 0, 0)
        if p.ksm_merge_any:
            syscalls.prctl(inj, abi.PR_SET_MEMORY_MERGE, 1, 0, 0, 0)
    lead = rb.proc.threads[0]
    if lead.attrs is not None:
        _thread_injected(rb.inj, lead.attrs)
    progs = rb.thread_programs(data=256)  # the others: one injected program each, at once
    for t, prog in progs:
        if t.attrs is not None:
            _thread_injected(prog, t.attrs)
    rb.run_thread_programs(progs)


def _thread_injected(inj: Injector, a: ThreadAttrs) -> None:
    """Per-thread prctl / arch_prctl state, set by the thread itself; only what differs
    from what the thread has now: what ckpt has (every restorer and thread inherited it
    from ckpt's thread, before anything here)."""
    have = _own()
    inj.reset_data()
    if a.timerslack is not None and a.timerslack != have["timerslack"]:
        syscalls.prctl(inj, abi.PR_SET_TIMERSLACK, a.timerslack, 0, 0, 0)
    if a.tsc is not None and a.tsc != have["tsc"]:
        syscalls.prctl(inj, abi.PR_SET_TSC, a.tsc, 0, 0, 0)
    if a.mce_kill is not None and a.mce_kill != have["mce_kill"]:
        if a.mce_kill == abi.PR_MCE_KILL_DEFAULT:
            syscalls.prctl(inj, abi.PR_MCE_KILL, abi.PR_MCE_KILL_CLEAR, 0, 0, 0)
        else:
            syscalls.prctl(inj, abi.PR_MCE_KILL, abi.PR_MCE_KILL_SET, a.mce_kill, 0, 0)
    if a.cpuid is not None and a.cpuid != have["cpuid"]:
        syscalls.arch_prctl(inj, abi.ARCH_SET_CPUID, a.cpuid)
    for k, state in enumerate(a.spec or ()):
        if state & abi.PR_SPEC_DISABLED:  # disabled by prctl (or forced, or until exec): again
            syscalls.prctl(inj, abi.PR_SET_SPECULATION_CTRL, k, state & abi.PR_SPEC_DISABLED, 0, 0)
    if a.io_flusher:
        syscalls.prctl(inj, abi.PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    if a.mempolicy is not None and a.mempolicy != have["mempolicy"]:
        mode, mask = a.mempolicy
        nodes = inj.put(mask.to_bytes(NODEMASK_BITS // 8, "little")) if mode else 0
        syscalls.set_mempolicy(inj, mode, nodes, NODEMASK_BITS if mode else 0)


@functools.cache
def _own() -> dict:
    return K.own_thread_state()


def after_creds(rb: Rebuilder) -> None:
    """The parent-death signal (a change of credentials clears it), then what ckpt sets
    from outside: with CAP_SYS_NICE, whatever credentials the process has now.
    The other threads' parent-death signals are one injected program each, run at
    once; a failure is raised in thread order, as one thread after the other would."""
    progs = rb.thread_programs()
    for t, prog in progs:
        if t.attrs is not None and t.attrs.pdeathsig:
            syscalls.prctl(prog, abi.PR_SET_PDEATHSIG, t.attrs.pdeathsig, 0, 0, 0)
    rb.run_thread_programs(progs, raise_first=False)
    of = {id(t): prog for t, prog in progs}
    for t, tid, tinj in _threads(rb):
        a = t.attrs
        if a is None:
            continue
        if id(t) in of:
            of[id(t)].raise_first()
        elif a.pdeathsig:
            syscalls.prctl(tinj, abi.PR_SET_PDEATHSIG, a.pdeathsig, 0, 0, 0)
        what = ""
        try:
            if a.affinity is not None and K.affinity(tid) != a.affinity:
                what = f"CPU affinity {a.affinity}"
                K.set_affinity(tid, a.affinity)
            if a.ioprio is not None and K.ioprio_get(tid) != a.ioprio:
                what = f"I/O priority {a.ioprio:#x}"
                K.ioprio_set(tid, a.ioprio)
            if a.sched is not None:
                s = a.sched
                want = (s.policy, s.flags, s.nice, s.priority, s.runtime, s.deadline, s.period,
                        s.util_min, s.util_max)  # fmt: skip
                have = K.sched_getattr(tid)
                if (have[0], have[1] & K.SCHED_KEEP, *have[2:]) != want:
                    what = f"scheduling policy {s.policy} (priority {s.priority}, nice {s.nice})"
                    K.sched_setattr(tid, want)
        except OSError as exc:
            raise RestoreError(
                f"cannot set the {what} of thread {t.tid} of process {rb.proc.pid}: "
                f"{os.strerror(exc.errno or 0)}"
            ) from exc
    p = rb.proc.attrs
    if p is not None:
        # the restorer is our traced child: its PID cannot be reused meanwhile
        _knob(rb, "coredump_filter", f"{p.coredump_filter:#x}")
        _knob(rb, "oom_score_adj", str(p.oom_score_adj))


def _knob(rb: Rebuilder, name: str, value: str) -> None:
    try:
        K.write_knob(rb.pid, name, value)
    except OSError as exc:
        raise RestoreError(
            f"cannot set {name} of process {rb.proc.pid} to {value}: {exc.strerror}"
        ) from exc
