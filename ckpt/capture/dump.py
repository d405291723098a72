"""Checkpoint one live process into an image directory.

Order matters and is spelled out here: validate, seize, stop, read state
(ptrace + /proc, then injected queries inside a heal-safe session), read
memory, write and commit the image, and only then kill or release the target.
Any failure before the commit leaves the target running as it was and no
complete-looking image.
"""

from __future__ import annotations

import os
import platform
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__, faults
from ..errors import UnsupportedProcess
from ..image import ImageWriter
from ..kernel import native, procfs
from ..kernel.memory import pagemap_runs, read_runs
from ..kernel.process import auxv_bytes, get_robust_list, personality, rlimits
from ..kernel.ptrace import Tracee
from ..kernel.remote import DumpInjection
from ..model import MmFields, ProcessImage, Rseq, Thread, Vma
from . import state
from .fds import capture_fds
from .validate import check_target
from .vmas import classify, file_ref, needs_pages

PAGE = native.PAGE_SIZE
BATCH_PAGES = 2048  # 8 MiB per process_vm_readv batch


@dataclass
class DumpResult:
    pid: int
    image: str
    freeze_ms: float
    seconds: float
    pages: int
    bytes_raw: int
    bytes_stored: int
    vmas: int


def dump(
    pid: int,
    directory: str,
    *,
    leave_running: bool = False,
    level: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> DumpResult:
    t0 = time.monotonic()
    st = check_target(pid)
    writer = ImageWriter(directory, level=level)
    tracee: Tracee | None = None
    try:
        tracee = Tracee.seize(pid)
        faults.point("seized")
        t_freeze = time.monotonic()
        tracee.interrupt()
        proc, stats = _capture(tracee, st, writer, progress)
        freeze_ms = (time.monotonic() - t_freeze) * 1000
        faults.point("write-image")
        meta = {
            "ckpt_version": __version__,
            "created": time.time(),
            "host": platform.node(),
            "kernel": platform.release(),
            "pid": pid,
            "comm": proc.comm.decode(errors="replace"),
            "freeze_ms": freeze_ms,
            "tracker": "none",
            "rounds": 1,
            "pages": stats["pages"],
        }
        faults.point("commit")
        writer.commit(proc.to_dict(), meta)
    except BaseException:
        writer.abort()
        if tracee is not None and tracee.attached:
            try:
                tracee.detach()
            except OSError:
                pass
        raise
    if leave_running:
        tracee.detach()
    else:
        os.kill(pid, signal.SIGKILL)
        try:
            tracee.wait()
        except OSError:
            pass
        tracee.attached = False
    return DumpResult(
        pid=pid,
        image=directory,
        freeze_ms=freeze_ms,
        seconds=time.monotonic() - t0,
        pages=stats["pages"],
        bytes_raw=stats["bytes_raw"],
        bytes_stored=stats["bytes_stored"],
        vmas=len(proc.vmas),
    )


def _capture(tracee: Tracee, st: procfs.Stat, writer: ImageWriter, progress) -> tuple[ProcessImage, dict]:
    pid = tracee.pid
    if len(procfs.tasks(pid)) != 1:
        raise UnsupportedProcess(
            f"process {pid} started a thread while being attached; multi-threaded processes "
            "are not supported yet",
            pid=pid,
        )
    regs = tracee.getregs()
    if regs["cs"] != 0x33:
        raise UnsupportedProcess(f"process {pid} is not a 64-bit process (cs={regs['cs']:#x})", pid=pid)
    mask = tracee.get_sigmask()
    xstate = tracee.get_xstate()
    rseq = tracee.rseq_config()
    pending = tracee.peek_siginfo(False)
    shared_pending = tracee.peek_siginfo(True)
    maps = procfs.smaps(pid)
    vmas = [v for v in (classify(pid, m) for m in maps) if v is not None]
    fds = capture_fds(pid)
    status = procfs.status(pid)
    robust = get_robust_list(pid)

    with DumpInjection(tracee, maps, regs, mask) as inj:
        acts = state.sigactions(inj)
        misc = state.misc(inj)
        its = state.itimers(inj)
        timers = state.posix_timers(inj, pid)

    st = procfs.stat(pid)  # mm fields are only visible to a tracer: read them now
    exe = procfs.readlink(pid, "exe")
    exe_st = os.stat(f"/proc/{pid}/exe")
    mm = MmFields(
        start_code=st.start_code, end_code=st.end_code, start_data=st.start_data,
        end_data=st.end_data, start_brk=st.start_brk, brk=misc["brk"],
        start_stack=st.start_stack, arg_start=st.arg_start, arg_end=st.arg_end,
        env_start=st.env_start, env_end=st.env_end,
        auxv=auxv_bytes(procfs.read_bytes(pid, "auxv")), exe=file_ref(exe, exe_st),
    )  # fmt: skip

    stats = _capture_memory(pid, vmas, writer, progress)

    thread = Thread(
        tid=pid, regs=regs, xstate=xstate, sigmask=mask, pending=pending,
        sigaltstack=misc["sigaltstack"],
        rseq=Rseq(rseq.ptr, rseq.size, rseq.signature) if rseq else None,
        robust_list=list(robust), clear_child_tid=misc["clear_child_tid"],
    )  # fmt: skip
    uids = [int(x) for x in status["Uid"].split()]
    gids = [int(x) for x in status["Gid"].split()]
    groups = [int(x) for x in status.get("Groups", "").split()]
    proc = ProcessImage(
        pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session, comm=st.comm,
        cmdline=procfs.read_bytes(pid, "cmdline"), exe=exe, cwd=procfs.readlink(pid, "cwd"),
        umask=int(status.get("Umask", "0022"), 8), personality=personality(pid),
        uids=uids, gids=gids, groups=groups, rlimits=rlimits(pid), mm=mm, vmas=vmas, fds=fds,
        sigactions=acts, shared_pending=shared_pending, itimers=its, posix_timers=timers,
        threads=[thread], no_new_privs=misc["no_new_privs"], dumpable=misc["dumpable"],
        child_subreaper=misc["child_subreaper"], thp_disable=misc["thp_disable"],
    )  # fmt: skip
    return proc, stats


def _capture_memory(pid: int, vmas: list[Vma], writer: ImageWriter, progress) -> dict:
    """Save every page that must be saved, in batches of runs; never page by page."""
    pm_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        zpfn = native.zero_pfn()
        plan: list[tuple[int, int]] = []
        for v in vmas:
            save, include_file = needs_pages(v)
            if not save:
                continue
            runs = pagemap_runs(pm_fd, v.start, v.end, include_file=include_file, zero_pfn=zpfn)
            v.present = [[a, n] for a, n in runs]
            plan.extend(runs)
        total_pages = sum(n for _, n in plan)
        layer = writer.begin_layer()
        done = 0
        half_reported = False
        for batch in _batches(plan, BATCH_PAGES):
            buf = read_runs(pid, mem_fd, batch)
            view = memoryview(buf)
            off = 0
            for a, n in batch:
                layer.add_run(a, view[off : off + n * PAGE])
                off += n * PAGE
            done += off // PAGE
            if not half_reported and done * 2 >= total_pages:
                half_reported = True
                faults.point("read-pages")
        lstats = layer.close()
    finally:
        os.close(pm_fd)
        os.close(mem_fd)
    return {
        "pages": total_pages,
        "bytes_raw": total_pages * PAGE,
        "bytes_stored": getattr(lstats, "bytes_stored", 0),
    }


def _batches(runs: list[tuple[int, int]], max_pages: int):
    """Group runs into batches of at most max_pages pages, splitting long runs."""
    batch: list[tuple[int, int]] = []
    size = 0
    for a, n in runs:
        while n:
            take = min(n, max_pages - size)
            batch.append((a, take))
            size += take
            a += take * PAGE
            n -= take
            if size == max_pages:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch
