"""Read one frozen process into the model: registers and thread state by ptrace,
signal/timer/attribute state by injected queries, security context, fds, mm fields
and VMAs. No pages: the final round copies those (precopy/final.py)."""

from __future__ import annotations

import os
import struct

from ..errors import UnsupportedProcess
from ..kernel import inject_batch, procfs
from ..kernel.process import auxv_bytes, get_robust_list, personality, rlimits
from ..kernel.procfs import Mapping
from ..kernel.ptrace import Tracee, read_states
from ..kernel.remote import DumpInjection
from ..model import MmFields, ProcessImage, Rseq, Thread
from . import attrs, state
from .fds import capture_fds
from .security import capture as capture_security
from .security import finish as finish_security
from .security import securebits
from .shm import SHM_KINDS, SharedMemory
from .sockets import SocketCapture
from .vmas import classify, file_ref


def check_arch(pid: int, regs: dict[str, int]) -> None:
    if regs["cs"] != 0x33:
        raise UnsupportedProcess(
            f"process {pid} is not a 64-bit process (cs={regs['cs']:#x})", pid=pid
        )


def _threads_regs(threads: list[Tracee]) -> list[Thread]:
    """The non-leader threads' state readable by ptrace (read in one call for all of
    them: kernel/ptrace.read_states); the injected parts come later."""
    out = []
    for t, s in zip(threads, read_states(threads), strict=True):
        check_arch(t.pid, s.regs)
        rseq = s.rseq
        out.append(Thread(
            tid=t.pid, regs=s.regs, xstate=s.xstate, sigmask=s.sigmask, pending=s.pending,
            sigaltstack=[0, 2, 0],
            rseq=Rseq(rseq.ptr, rseq.size, rseq.signature) if rseq else None,
            robust_list=list(s.robust_list), clear_child_tid=0,
            comm=t.stat().comm,  # stat's (comm) is /proc/TID/comm's text
        ))  # fmt: skip
    return out


def capture_process(
    tracee: Tracee,
    *,
    sockets: SocketCapture,
    shm: SharedMemory,
    skip_fds: frozenset[int] | set[int] = frozenset(),
    prior_maps: list | None = None,
    tree: frozenset[int] = frozenset(),
    tcp_established: bool = False,
    shell_job: bool = False,
) -> tuple[ProcessImage, list[Mapping]]:
    """Everything but the pages, read while frozen: registers, injected queries,
    security context, fds, mm fields, the VMAs (present runs filled by the caller
    along with the last pages: precopy/final.py). Returns the image and the
    mappings it was built from.

    skip_fds: ckpt's own fds in the target (persistent tracking) — not part of
    the process. sockets: the run's socket capture (network lock, held TCP
    duplicates). shm: the run's shared memory objects; each shared VMA is linked
    to its object (copied once for the whole tree by the freeze step).
    """
    pid = tracee.pid
    regs = tracee.getregs()
    check_arch(pid, regs)
    mask = tracee.get_sigmask()
    others = _threads_regs(tracee.others)
    xstate = tracee.get_xstate()
    rseq = tracee.rseq_config()
    pending = tracee.peek_siginfo(False)
    shared_pending = tracee.peek_siginfo(True)
    maps = procfs.maps_with_flags(pid, prior_maps)
    # classify() refuses unsupported kinds
    vmas = [v for v in (classify(pid, m) for m in maps) if v is not None]
    by_start = {m.start: m for m in maps}
    for v in vmas:
        if v.kind in SHM_KINDS or (v.kind == "file" and v.shared):
            v.shm = shm.ref(pid, by_start[v.start], v)
    status = procfs.status(pid)
    robust = get_robust_list(pid)
    tattrs = {t.pid: attrs.thread_outside(t.pid, t.stat()) for t in tracee.threads}

    with DumpInjection(tracee, maps, regs, mask) as inj:
        state.close_leftover_uffds(inj, pid)
        acts = state.sigactions(inj)
        misc = state.misc(inj)
        its = state.itimers(inj)
        timers = state.posix_timers(inj, pid)
        pattrs = attrs.process_attrs(inj, pid)
        attrs.thread_injected(inj, tattrs[pid])
        bits = {pid: securebits(inj)}  # per thread, no /proc view

        def per_thread(tid: int, tinj) -> None:
            attrs.thread_injected(tinj, tattrs[tid])
            bits[tid] = securebits(tinj)

        # a signal the process ignores and nobody has pending: the threads' batch then
        # runs as one injected program each (kernel/inject_batch.py)
        pend = {struct.unpack_from("<i", i)[0] for t in (pending, shared_pending,
                *(o.pending for o in others)) for i in t}  # fmt: skip
        blocked = 0
        for o in others:
            blocked |= o.sigmask
        marker = inject_batch.ignored_marker({a.signo: a.handler for a in acts}, pend, blocked)
        others_misc = state.other_threads_misc(
            inj,
            tracee.others,
            [o.regs for o in others],
            [o.sigmask for o in others],
            also=per_thread,
            marker=marker,
        )
    sec = capture_security(tracee, bits)  # still frozen: filters by ptrace
    fds = capture_fds(pid, skip_fds, sockets=sockets, tcp_established=tcp_established,
                      tree=tree - {pid}, shell_job=shell_job, maps=maps)  # fmt: skip

    st = procfs.stat(pid)  # mm fields are only visible to a tracer
    exe = procfs.readlink(pid, "exe")
    mm = MmFields(
        start_code=st.start_code, end_code=st.end_code, start_data=st.start_data,
        end_data=st.end_data, start_brk=st.start_brk, brk=misc["brk"],
        start_stack=st.start_stack, arg_start=st.arg_start, arg_end=st.arg_end,
        env_start=st.env_start, env_end=st.env_end,
        auxv=auxv_bytes(procfs.read_bytes(pid, "auxv")),
        exe=file_ref(exe, os.stat(procfs.path(pid, "exe"))),
    )  # fmt: skip

    attrs.guards(pid, vmas)

    thread = Thread(
        tid=pid, regs=regs, xstate=xstate, sigmask=mask, pending=pending,
        sigaltstack=misc["sigaltstack"],
        rseq=Rseq(rseq.ptr, rseq.size, rseq.signature) if rseq else None,
        robust_list=list(robust), clear_child_tid=misc["clear_child_tid"],
    )  # fmt: skip
    for o, (altstack, ctid) in zip(others, others_misc):
        o.sigaltstack, o.clear_child_tid = altstack, ctid
    for t in (thread, *others):
        t.attrs = tattrs[t.tid]
    pattrs.exit_signal = st.exit_signal
    proc = ProcessImage(
        pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session, comm=st.comm,
        cmdline=procfs.read_bytes(pid, "cmdline"), exe=exe, cwd=procfs.readlink(pid, "cwd"),
        umask=int(status.get("Umask", "0022"), 8), personality=personality(pid),
        uids=[int(x) for x in status["Uid"].split()], gids=[int(x) for x in status["Gid"].split()],
        groups=[int(x) for x in status.get("Groups", "").split()], rlimits=rlimits(pid), mm=mm,
        vmas=vmas, fds=fds, sigactions=acts, shared_pending=shared_pending, itimers=its,
        posix_timers=timers, threads=[thread, *others], no_new_privs=misc["no_new_privs"],
        dumpable=misc["dumpable"], child_subreaper=misc["child_subreaper"],
        thp_disable=misc["thp_disable"], starttime=st.starttime,
    )  # fmt: skip
    proc.attrs = pattrs
    finish_security(proc, sec)
    return proc, maps
