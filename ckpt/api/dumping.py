"""Checkpoint one live process (and its descendants) into an image, plain or with
pre-copy.

Order matters and is spelled out here: validate, (arm tracking and pre-copy
while the target runs), freeze, the final round of every process (api/freeze.py),
write and commit the image, and only then kill or release the target. Any failure
before the commit leaves the target running as it was (tracking disarmed,
injected fds closed) and no complete-looking image.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from .. import __version__, faults
from ..capture.security import check_tree_namespaces
from ..capture.shm import SharedMemory
from ..capture.sockets import SocketCapture
from ..capture.target import Target
from ..capture.tree import FrozenTree, descendants
from ..capture.validate import check_target
from ..errors import (
    CkptError,
    DumpError,
    KernelError,
    KernelUnsupported,
    TraceeGone,
    UnsupportedProcess,
    as_error,
)
from ..image import ImageWriter
from ..kernel import procfs
from ..kernel.native import PAGE_SIZE
from ..kernel.process import zombie_parent
from ..kernel.ptrace import Tracee, seize_group
from ..precopy.arm import arm, arm_members
from ..precopy.policy import ONCE_MIN_BYTES, Policy, RoundStats
from ..precopy.rounds import Precopy
from ..track import make_tracker
from ..track.base import Tracker
from ..track.full import FullTracker
from .freeze import capture_frozen, elapsed_ms, freeze_quiet, image_pages, thaw
from .preflight import preflight

ZOMBIE_WAIT = 0.05  # s for the killed process's parent to reap it (on SIGCHLD: a few ms)


@dataclass
class DumpOptions:
    """How to dump (the CLI's flags; docs/API.md)."""

    leave_running: bool = False  # keep the target running after the dump
    level: int | None = None  # zstd level (0: no compression; None: the default)
    iterative: bool = False  # pre-copy rounds while the target runs
    # every page copied frozen: no round while running even for a large process
    # (by default a plain dump of more than precopy.policy.ONCE_MIN_BYTES copies once first)
    no_precopy: bool = False
    tracker: str = "auto"  # dirty-page tracker for the rounds: auto | uffd-wp | soft-dirty
    policy: Policy = field(default_factory=Policy)  # when pre-copy stops
    tcp_established: bool = False  # also dump TCP connections to peers outside the tree
    tree: bool = True  # take the process's descendants too
    shell_job: bool = False  # take fds on the terminal the job was started from
    stats_json: str | None = None  # write the run's statistics there (also on failure)


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
    precopy: str = "none"  # "iterative", "once" (a plain dump's one round while running), "none"
    precopy_skipped: str = ""  # why a large process's plain dump could not pre-copy
    rounds: list[dict] = field(default_factory=list)
    final_pages: int = 0
    stop_reason: str = ""
    layers: int = 1
    processes: int = 1  # the root and its descendants
    net_lock: str = ""  # nftables table holding outside TCP peers, new connections: to the restore
    unlocked_tcp: int = 0  # outside TCP connections dumped without a lock (no nft)
    locked_tcp: int = 0  # outside TCP connections net_lock holds
    held_listeners: int = 0  # listening addresses whose new connections net_lock holds
    unheld_listeners: int = 0  # TCP listening addresses whose SYNs could not be held (no nft)
    zombie_parent: str = ""  # "PPID (comm)" keeping the killed process's PID as a zombie

    def stats(self) -> dict:
        return {
            "outcome": "dumped",
            "precopy": self.precopy,
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


@dataclass
class DumpHooks:
    """What migration plugs into a dump (api/migrate.py)."""

    sink: object | None = None  # an object with ImageWriter's interface (the network)
    after_commit: Callable[[], None] | None = None  # runs frozen, after the commit
    staged: bool = False  # the destination places pages by address (capture/shm.py)


def dump(
    pid: int,
    directory: str,
    options: DumpOptions | None = None,
    *,
    on_round: Callable[[RoundStats], None] | None = None,
    **fields,
) -> DumpResult:
    """Checkpoint `pid` into `directory`. Options as a DumpOptions, or its fields as
    keywords (`dump(pid, d, iterative=True)`); on_round: called after each pre-copy
    round (progress)."""
    opts = replace(options or DumpOptions(), **fields)
    return run_dump(pid, directory, opts, on_round=on_round)


def run_dump(
    pid: int,
    directory: str,
    opts: DumpOptions,
    *,
    on_round: Callable[[RoundStats], None] | None = None,
    hooks: DumpHooks | None = None,
) -> DumpResult:
    """dump() with migration's hooks; --stats-json is written on failure too."""
    t0 = time.monotonic()
    run = _DumpRun(pid, directory, opts, hooks or DumpHooks(), on_round, t0)
    try:
        with as_error(DumpError):  # kernel/'s KernelError is this dump's failure (exit 12)
            result = run.execute()
    except CkptError as exc:
        if opts.stats_json:
            _write_json(opts.stats_json, run.failure_stats(exc))
        raise
    if opts.stats_json:
        _write_json(opts.stats_json, result.stats())
    return result


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


class _DumpRun:
    """One dump's state while it runs (so a failure can report how far it got)."""

    def __init__(self, pid, directory, opts: DumpOptions, hooks: DumpHooks, on_round, t0: float):
        self.pid, self.directory, self.opts, self.hooks = pid, directory, opts, hooks
        self.on_round, self.t0 = on_round, t0
        self.pre: Precopy | None = None
        self.trk: Tracker | None = None
        self.mode = "iterative" if opts.iterative else "none"  # "once": see _plain_mode
        self.fallback = ""  # why a plain dump of a large process copied every page frozen

    def failure_stats(self, exc: CkptError) -> dict:
        pre = self.pre
        return {
            "outcome": "failed",
            "error": str(exc),
            "exit_code": exc.exit_code,
            "precopy": self.mode,
            "tracker": self.trk.name if self.trk and self.mode != "none" else "none",
            "rounds": [asdict(r) for r in pre.stats.rounds] if pre else [],
            "total_seconds": time.monotonic() - self.t0,
            "stop_reason": pre.stats.stop_reason if pre else "",
        }

    def execute(self) -> DumpResult:
        pid, opts, hooks = self.pid, self.opts, self.hooks
        st = check_target(pid)
        if opts.tree:  # the descendants' namespaces too, before anything is injected
            check_tree_namespaces(pid)
        trk: Tracker = FullTracker(pid)
        if opts.iterative:
            trk = make_tracker(opts.tracker, pid)
        elif (once := self._plain_mode(pid)) is not None:
            trk, self.mode = once, "once"
        if self.mode != "none":  # refuse now, not after the rounds (a plain dump freezes at once)
            preflight(pid, tree=opts.tree, tcp_established=opts.tcp_established,
                      shell_job=opts.shell_job, consume_errors=not opts.leave_running)  # fmt: skip
        target = Target(pid, st.starttime)
        self.trk = trk
        sink = hooks.sink
        writer = (
            sink
            if sink is not None
            else ImageWriter(self.directory, level=opts.level, runs_ckpt=procfs.runs_ckpt)
        )
        tracee: Tracee | None = None
        frozen: FrozenTree | None = None
        lock, unlocked = None, 0
        shm = SharedMemory(project=hooks.staged)
        sockets = SocketCapture(consume_errors=not opts.leave_running)  # (killed after)
        gc_was = gc.isenabled()
        try:
            if self.mode == "iterative":
                self.pre = self._precopy(target, trk, writer, shm, opts.policy)
            elif self.mode == "once":
                self.pre = self._precopy_once(target, writer, shm)
                trk = self.trk  # a full tracker again when arming was not possible
            # frozen once no listener of the tree has a connection waiting to be
            # accepted; new TCP connections are held by the run's lock meanwhile
            # No cyclic GC from the freeze to the commit: each collection walks the
            # growing capture (records per thread), ~15 ms a dump at 1024 threads; nothing
            # relies on cycles being freed meanwhile (enabled again below).
            gc.disable()
            frozen, t_freeze, queues = freeze_quiet(
                pid, lambda: self._freeze_root(target), opts.tree, sockets
            )
            tracee = frozen.members[0]
            pre = self.pre
            free_space = 1 + max((m.space for m in pre.members), default=0) if pre else 1
            cap = capture_frozen(
                frozen, trk, writer, pre, sockets=sockets, shm=shm, free_space=free_space,
                tcp_established=opts.tcp_established, shell_job=opts.shell_job,
            )  # fmt: skip
            proc = cap.proc
            lock, unlocked = sockets.take_net_lock()
            # kept until the restore only when this host's copy is killed and restored here
            if lock is not None and not opts.leave_running and sink is None:
                proc.net_lock = lock.name
            freeze_ms = elapsed_ms(t_freeze)
            faults.point("write-image")
            rounds = [asdict(r) for r in pre.stats.rounds] if pre else []
            bytes_stored = cap.bytes_stored + (pre.bytes_stored if pre else 0)
            pages = image_pages(proc)
            meta = {
                "ckpt_version": __version__, "created": time.time(), "host": platform.node(),
                "kernel": platform.release(), "pid": pid, "comm": proc.comm.decode(errors="replace"),
                "freeze_ms": freeze_ms, "tracker": trk.name if self.pre else "none",
                "rounds": len(rounds) + 1, "pages": pages, "bytes_stored": bytes_stored,
                "stop_reason": pre.stats.stop_reason if pre else "",
                "round_stats": rounds, "processes": 1 + len(proc.tree),
            }  # fmt: skip
            faults.point("commit")
            writer.commit(proc.to_dict(), meta)
            # Disarm after the commit: unregistering walks every page table (~13 ms per
            # GiB), and a migration's destination needs the state first (a failure until
            # here is cleaned up below, as before).
            trk.disarm()
            for m in pre.members if pre else ():
                m.tracker.disarm()
            if hooks.after_commit is not None:
                hooks.after_commit()
        except BaseException:
            if lock is not None:
                lock.remove()
            sockets.close()  # removes a lock not taken yet; drops the held TCP duplicates
            _fail_cleanup(trk, writer, self.pre)
            thaw(frozen, tracee)
            raise
        finally:
            if gc_was:
                gc.enable()
            if self.pre is not None:
                self.pre.close()
            shm.close()
        if opts.leave_running:
            frozen.detach()
        else:
            frozen.kill_and_reap()
        sockets.close()  # after the kill: the dumped connections close without a word
        # a restore reuses the PID: say who holds it when its parent has not reaped it
        held = "" if opts.leave_running else zombie_parent(pid, st.starttime, ZOMBIE_WAIT)
        if not proc.net_lock and lock is not None:
            lock.remove()
        return DumpResult(
            pid=pid, image=self.directory, freeze_ms=freeze_ms,
            seconds=time.monotonic() - self.t0, pages=pages, bytes_raw=pages * PAGE_SIZE,
            bytes_stored=bytes_stored, vmas=len(proc.vmas), tracker=meta["tracker"],
            precopy=self.mode, precopy_skipped=self.fallback,
            rounds=rounds, final_pages=cap.pages, stop_reason=meta["stop_reason"],
            layers=len(rounds) + 1, processes=1 + len(proc.tree), net_lock=proc.net_lock,
            unlocked_tcp=unlocked, zombie_parent=held, unheld_listeners=len(queues.unheld),
            locked_tcp=lock.connections if proc.net_lock and lock is not None else 0,
            held_listeners=len(lock.listeners) if proc.net_lock and lock is not None else 0,
        )  # fmt: skip

    def _plain_mode(self, pid: int) -> Tracker | None:
        """A tracker when a plain dump should copy memory once while the process runs:
        more private memory than the freeze can copy quickly, --no-precopy not given,
        and a tracker this kernel has. None: every page is copied frozen."""
        if self.opts.no_precopy or self.hooks.sink is not None:
            return None
        pids = [pid, *descendants(pid)] if self.opts.tree else [pid]
        if sum(procfs.private_resident(p) for p in pids) < ONCE_MIN_BYTES:
            return None
        try:
            return make_tracker(self.opts.tracker, pid)
        except KernelUnsupported:
            return None

    def _precopy_once(self, target: Target, writer, shm: SharedMemory) -> Precopy | None:
        """A plain dump's one round while the target runs. Where tracking cannot be armed
        (a registration the kernel refuses, a member that cannot be armed…), the dump
        copies every page frozen instead, as without the round; the target is left as
        it was by the failed arming (trackers clean up after themselves). A target
        that went away fails the dump as it would anyway."""
        try:
            pre = self._precopy(target, self.trk, writer, shm, Policy(max_rounds=1), rounds=False)
        except (UnsupportedProcess, KernelError, KernelUnsupported, DumpError) as exc:
            if isinstance(exc, TraceeGone):
                raise
            _fail_cleanup(self.trk, None, self.pre)
            if self.pre is not None:
                self.pre.close()
            self.pre, self.mode, self.trk = None, "none", FullTracker(self.pid)
            self.fallback = str(exc)
            return None
        pre.run_rounds(self.t0)  # (_precopy set whole_next: round 0 copies everything)
        pre.stats.stop_reason = "once"
        return pre

    def _freeze_root(self, target: Target) -> Tracee:
        """Every thread of the root stopped (a plain dump seizes it for the first time)."""
        if self.pre is not None:
            return target.freeze()
        tracee = seize_group(self.pid, procfs.tasks)
        try:
            faults.point("seized")
        except BaseException:
            thaw(None, tracee)
            raise
        return tracee

    def _precopy(
        self, target: Target, trk: Tracker, writer, shm: SharedMemory, policy: Policy,
        *, rounds: bool = True,
    ) -> Precopy:  # fmt: skip
        """Arm tracking (a brief freeze), then the rounds while the target runs."""
        ta = time.monotonic()
        tracee = target.freeze()
        try:
            faults.point("seized")
            arm(tracee, trk)
        finally:
            if tracee.attached:
                tracee.detach()
        faults.point("armed")
        pre = Precopy(target, trk, writer, policy, self.on_round, shm=shm)
        self.pre = pre
        pre.stats.base_freeze_ms = elapsed_ms(ta)
        if self.opts.tree:
            arm_members(pre, self.opts.tracker, target.pid)
        pre.whole_next = True  # round 0 copies everything, whatever arming did
        if rounds:
            pre.run_rounds(self.t0)
        return pre


def _fail_cleanup(trk: Tracker | None, writer, pre: Precopy | None) -> None:
    steps = [] if writer is None else [writer.abort]
    steps = steps if trk is None else [trk.cleanup_on_error, *steps]
    steps += [m.tracker.cleanup_on_error for m in pre.members] if pre else []
    for step in steps:
        try:
            step()
        except Exception:
            pass
