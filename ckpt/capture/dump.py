"""Checkpoint one live process into an image directory, plain or with pre-copy.

Order matters and is spelled out here: validate, (arm tracking and pre-copy
while the target runs), freeze, read state (ptrace + /proc, then injected
queries inside a heal-safe session), copy the last pages, write and commit the
image, and only then kill or release the target. Any failure before the
commit leaves the target running as it was (tracking disarmed, injected fds
closed) and no complete-looking image.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from .. import __version__, faults
from ..errors import DumpError, NoSuchProcess, UnsupportedProcess
from ..image import ImageWriter
from ..kernel import features, native, procfs
from ..kernel.memory import present_runs
from ..kernel.process import auxv_bytes, get_robust_list, personality, rlimits, zombie_parent
from ..kernel.ptrace import Tracee, seize_group
from ..kernel.remote import DumpInjection
from ..model import MmFields, ProcessImage, Rseq, Thread, slot_base
from ..precopy import Member, Policy, Precopy, RoundStats, collect, exact_kind
from ..present import PresentMap
from ..track import make_tracker
from ..track.base import Tracker
from ..track.full import FullTracker
from . import attrs, state
from .cow import link_cow
from .fds import capture_fds
from .pages import PageCopier
from .security import capture as capture_security
from .security import check_tree_namespaces, securebits
from .security import finish as finish_security
from .shm import SHM_KINDS, SharedMemory, project_onto
from .sockets import take_net_lock
from .target import Target
from .tree import FrozenTree, check_member, descendants, freeze_tree, link_shared
from .validate import check_target
from .vmas import classify, file_ref, needs_pages

PAGE = native.PAGE_SIZE
ZOMBIE_WAIT = 0.05  # s for the killed process's parent to reap it (on SIGCHLD: a few ms)


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
    tracker: str = "none"
    rounds: list[dict] = field(default_factory=list)
    final_pages: int = 0
    stop_reason: str = ""
    layers: int = 1
    processes: int = 1  # the root and its descendants
    net_lock: str = ""  # nftables table holding outside TCP peers until the restore
    unlocked_tcp: int = 0  # outside TCP connections dumped without a lock (no nft)
    zombie_parent: str = ""  # "PPID (comm)" keeping the killed process's PID as a zombie

    def stats(self) -> dict:
        return {
            "tracker": self.tracker,
            "rounds": self.rounds,
            "final": {
                "round": len(self.rounds),
                "pages_copied": self.final_pages,
                "freeze_ms": self.freeze_ms,
            },
            "total_seconds": self.seconds,
            "bytes_stored": self.bytes_stored,
            "layers": self.layers,
            "stop_reason": self.stop_reason,
            "pages": self.pages,
        }


def dump(
    pid: int,
    directory: str,
    *,
    leave_running: bool = False,
    level: int | None = None,
    iterative: bool = False,
    tracker: str = "auto",
    policy: Policy | None = None,
    on_round: Callable[[RoundStats], None] | None = None,
    stats_json: str | None = None,
    sink=None,
    after_commit: Callable[[], None] | None = None,
    tcp_established: bool = False,
    tree: bool = True,
    shell_job: bool = False,
    staged: bool = False,
) -> DumpResult:
    """Checkpoint `pid` into `directory` (or into `sink`, an object with ImageWriter's
    interface, e.g. a network stream).

    `after_commit` runs while the target is still frozen, after the image is
    complete: migration waits there for the destination to report the process
    running. If it raises, the target is thawed and keeps running.

    tree: take the process's descendants too (frozen with it, restored as its
    children). Their pages are copied in the final freeze.
    shell_job: take fds on the terminal the job was started from (capture/tty.py).
    staged: the sink's destination builds the process while the rounds arrive and
    places pages by address (shared memory is keyed by its one mapping: capture/shm.py).
    """
    t0 = time.monotonic()
    st = check_target(pid)
    if tree:  # the descendants' namespaces too, before anything is injected
        check_tree_namespaces(pid)
    target = Target(pid, st.starttime)
    trk: Tracker = make_tracker(tracker, pid) if iterative else FullTracker(pid)
    writer = sink if sink is not None else ImageWriter(directory, level=level)
    tracee: Tracee | None = None
    frozen: FrozenTree | None = None
    pre: Precopy | None = None
    lock, unlocked = None, 0
    shm = SharedMemory(project=staged)
    try:
        if iterative:
            ta = time.monotonic()
            tracee = target.freeze()
            faults.point("seized")
            _arm(tracee, trk)
            tracee.detach()
            tracee = None
            faults.point("armed")
            pre = Precopy(target, trk, writer, policy or Policy(), on_round, shm=shm)
            pre.stats.base_freeze_ms = (time.monotonic() - ta) * 1000
            if tree:
                _arm_members(pre, tracker, pid)
            pre.whole_next = True  # round 0 copies everything, whatever arming did
            pre.run_rounds(t0)
            t_freeze = time.monotonic()
            tracee = target.freeze()
        else:
            t_freeze = time.monotonic()
            tracee = seize_group(pid, procfs.tasks)
            faults.point("seized")
        frozen = freeze_tree(tracee) if tree else FrozenTree([tracee])
        attrs.refuse_frozen(frozen.members)
        proc, final_pages, bytes_stored = _capture_final(
            tracee,
            trk,
            writer,
            prior_maps=pre.last_maps if pre else None,
            present=pre.present if pre else None,
            tcp_established=tcp_established,
            tree=frozenset(frozen.pids),
            shell_job=shell_job,
            shm=shm,
        )
        # page-key spaces: a pre-copied member keeps its own, the others get new ones
        free_space = 1 + max((m.space for m in pre.members), default=0) if pre else 1
        for member in frozen.members[1:]:
            m = pre.member(member.pid, procfs.stat(member.pid).starttime) if pre else None
            if m is not None:
                space = m.space
            else:
                space, free_space = free_space, free_space + 1
            sub, sub_pages, sub_bytes = _capture_final(
                member, m.tracker if m else FullTracker(member.pid), writer,
                base=slot_base(space), prior_maps=m.last_maps if m else None,
                present=m.present if m else None, tcp_established=tcp_established,
                tree=frozenset(frozen.pids), shell_job=shell_job, shm=shm,
            )  # fmt: skip
            sub.space = space
            proc.tree.append(sub)
            final_pages += sub_pages
            bytes_stored += sub_bytes
        proc.zombies = frozen.zombies
        shm_pages, shm_bytes = capture_shared(proc, shm, writer)
        final_pages += shm_pages
        bytes_stored += shm_bytes
        link_shared([proc, *proc.tree])
        link_cow([proc, *proc.tree])  # pages still shared since a fork
        lock, unlocked = take_net_lock()
        # kept until the restore only when this host's copy is killed and restored here
        if lock is not None and not leave_running and sink is None:
            proc.net_lock = lock.name
        freeze_ms = (time.monotonic() - t_freeze) * 1000
        faults.point("write-image")
        rounds = [asdict(r) for r in pre.stats.rounds] if pre else []
        if pre:
            bytes_stored += pre.bytes_stored
        pages = image_pages(proc)
        meta = {
            "ckpt_version": __version__, "created": time.time(), "host": platform.node(),
            "kernel": platform.release(), "pid": pid, "comm": proc.comm.decode(errors="replace"),
            "freeze_ms": freeze_ms, "tracker": trk.name if iterative else "none",
            "rounds": len(rounds) + 1, "pages": pages, "bytes_stored": bytes_stored,
            "stop_reason": pre.stats.stop_reason if pre else "",
            "round_stats": rounds, "processes": 1 + len(proc.tree),
        }  # fmt: skip
        faults.point("commit")
        writer.commit(proc.to_dict(), meta)
        # Disarm after the commit: unregistering walks every page table (~13 ms per GiB),
        # and a migration's destination needs the state first (a failure until here is
        # cleaned up by _fail_cleanup, as before).
        trk.disarm()
        for m in pre.members if pre else ():
            m.tracker.disarm()
        if after_commit is not None:
            after_commit()
    except BaseException:
        _release_lock(lock or take_net_lock()[0])  # taken, or still with the capture
        _fail_cleanup(trk, writer, tracee)
        for m in pre.members if pre else ():
            try:
                m.tracker.cleanup_on_error()
            except Exception:
                pass
        if frozen is not None:
            try:
                frozen.detach()
            except OSError:
                pass
        raise
    finally:
        if pre is not None:
            pre.close()
        shm.close()
    if leave_running:
        frozen.detach()
    else:
        frozen.kill_and_reap()
    # a restore reuses the PID: say who holds it when its parent has not reaped it
    held = "" if leave_running else zombie_parent(pid, st.starttime, ZOMBIE_WAIT)
    if not proc.net_lock:
        _release_lock(lock)
    result = DumpResult(
        pid=pid, image=directory, freeze_ms=freeze_ms, seconds=time.monotonic() - t0,
        pages=pages, bytes_raw=pages * PAGE, bytes_stored=bytes_stored, vmas=len(proc.vmas),
        tracker=meta["tracker"], rounds=rounds, final_pages=final_pages,
        stop_reason=meta["stop_reason"], layers=len(rounds) + 1, processes=1 + len(proc.tree),
        net_lock=proc.net_lock, unlocked_tcp=unlocked, zombie_parent=held,
    )  # fmt: skip
    if stats_json:
        with open(stats_json, "w") as f:
            json.dump(result.stats(), f, indent=2)
    return result


def capture_shared(proc: ProcessImage, shm: SharedMemory, writer) -> tuple[int, int]:
    """The freeze's copy of the tree's shared memory objects, in a layer of its own;
    their records go on the root. Returns (pages stored, bytes stored)."""
    if not shm.order:
        return 0, 0
    layer = writer.begin_layer()
    records, pages = shm.final(layer)
    if shm.project:
        project_onto([proc, *proc.tree], records)
    else:
        proc.shm = records
    return pages, getattr(layer.close(), "bytes_stored", 0)


def image_pages(proc: ProcessImage) -> int:
    """Pages the image holds for the process, its tree and their shared memory."""
    own = sum(n for p in (proc, *proc.tree) for v in p.vmas for _, n in v.present)
    return own + sum(n for o in proc.shm for _, n in o.present)


def _release_lock(lock) -> None:
    if lock is not None:
        lock.remove()


def _arm_members(pre: Precopy, tracker: str, root: int) -> None:
    """Arm tracking in each descendant, so the tree's pages are pre-copied too.

    Each is frozen only for its own arming. One that exits meanwhile is skipped;
    one that appears later is copied whole in the final freeze.
    """
    for space, pid in enumerate(descendants(root), 1):
        try:
            if check_member(pid, root):
                continue  # a zombie: nothing to track (recorded in the final freeze)
            st = procfs.stat(pid)
            member = Member(Target(pid, st.starttime), make_tracker(tracker, pid), space)
            tracee = member.target.freeze()
        except (NoSuchProcess, DumpError):
            continue
        try:
            _arm(tracee, member.tracker)
        except BaseException:
            member.tracker.cleanup_on_error()
            if tracee.attached:
                tracee.detach()
            raise
        tracee.detach()
        pre.add_member(member)


def _fail_cleanup(trk: Tracker, writer: ImageWriter, tracee: Tracee | None) -> None:
    for step in (trk.cleanup_on_error, writer.abort):
        try:
            step()
        except Exception:
            pass
    if tracee is not None and tracee.attached:
        try:
            tracee.detach()
        except OSError:
            pass


def _arm(tracee: Tracee, trk: Tracker) -> None:
    regs = tracee.getregs()
    _check_arch(tracee.pid, regs)
    mask = tracee.get_sigmask()
    maps = procfs.maps(tracee.pid)
    attrs.refuse_frozen([tracee])  # a descendant is armed before the final freeze
    with DumpInjection(tracee, maps, regs, mask) as inj:
        state.close_leftover_uffds(inj, tracee.pid)
        trk.arm(inj)


def _thread_regs(t: Tracee) -> Thread:
    """A non-leader thread's state readable by ptrace; the injected parts come later."""
    regs = t.getregs()
    _check_arch(t.pid, regs)
    rseq = t.rseq_config()
    return Thread(
        tid=t.pid, regs=regs, xstate=t.get_xstate(), sigmask=t.get_sigmask(),
        pending=t.peek_siginfo(False), sigaltstack=[0, 2, 0],
        rseq=Rseq(rseq.ptr, rseq.size, rseq.signature) if rseq else None,
        robust_list=list(get_robust_list(t.pid)), clear_child_tid=0,
        comm=procfs.read_bytes(t.pid, "comm").rstrip(b"\n"),
    )  # fmt: skip


def _check_arch(pid: int, regs: dict[str, int]) -> None:
    if regs["cs"] != 0x33:
        raise UnsupportedProcess(
            f"process {pid} is not a 64-bit process (cs={regs['cs']:#x})", pid=pid
        )


def _capture_final(
    tracee: Tracee,
    trk: Tracker,
    writer,
    *,
    skip_fds=frozenset(),
    whole: bool = False,
    prior_maps: list | None = None,
    present: PresentMap | None = None,
    base: int = 0,
    tree: frozenset[int] = frozenset(),
    tcp_established: bool = False,
    shell_job: bool = False,
    shm: SharedMemory,
) -> tuple[ProcessImage, int, int]:
    """Everything read while frozen: state, the last pages, the present map.

    skip_fds: ckpt's own fds in the target (persistent tracking) — not part of
    the process. whole: copy every page in this round (full snapshot).
    present: the pre-copy rounds' present map; with a tracker that reports zapped
    pages it is updated by this round and used instead of re-reading pagemap.
    shm: the run's shared memory objects; each shared VMA is linked to its object
    (copied once for the whole tree by capture_shared).
    """
    pid = tracee.pid
    regs = tracee.getregs()
    _check_arch(pid, regs)
    mask = tracee.get_sigmask()
    others = [_thread_regs(t) for t in tracee.others]
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
    tattrs = {t: attrs.thread_outside(t) for t in [pid, *(o.tid for o in others)]}

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

        others_misc = state.other_threads_misc(
            inj,
            tracee.others,
            [o.regs for o in others],
            [o.sigmask for o in others],
            also=per_thread,
        )
    sec = capture_security(tracee, bits)  # still frozen: filters by ptrace
    fds = capture_fds(pid, skip_fds, tcp_established=tcp_established, tree=tree - {pid},
                      shell_job=shell_job)  # fmt: skip

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

    # the last pages: written since the previous round (everything, without pre-copy)
    pm_fd = procfs.open_file(pid, "pagemap", os.O_RDONLY)
    copier = PageCopier(pid, base)
    try:
        zpfn = native.zero_pfn()
        use_scan = features.probe().pagemap_scan
        exact = present is not None and trk.exact_present
        runs, _ = collect(
            pid, trk, pm_fd, zpfn, whole=whole, mappings=maps, present=present if exact else None
        )
        layer = writer.begin_layer()
        final_pages = copier.copy(runs, layer, on_half=lambda: faults.point("read-pages"))
        for v in vmas:
            save, include_file = needs_pages(v)
            if save:
                runs = (
                    present.within(v.start, v.end)
                    if exact and exact_kind(v)
                    else present_runs(
                        pm_fd,
                        v.start,
                        v.end,
                        include_file=include_file,
                        zero_pfn=zpfn,
                        use_scan=use_scan,
                    )
                )
                v.present = [[a, n] for a, n in runs]
        lstats = layer.close()
    finally:
        os.close(pm_fd)
        copier.close()
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
    return proc, final_pages, getattr(lstats, "bytes_stored", 0)
