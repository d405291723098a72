"""One point-in-time snapshot of a live process into a snapshot store.

The first snapshot of a process is full; later ones copy only the pages
written since the previous one. With uffd-wp the write-protect state lives in
the target's page tables for as long as the target holds the userfaultfd, so
ckpt leaves that fd in the target between runs (persistent tracking) and the
store remembers where it is (a tracking record per PID).

Never an incremental snapshot that misses writes: the record is marked
"dirty" before any page is re-armed and "clean" only once the snapshot is
committed, so a run that failed or was killed forces the next one to be full.
Tracking also counts as lost when the process was restarted under the same PID
(start time), closed the fd, or exec'd (the fd is close-on-exec).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .. import __version__, faults
from ..capture.shm import SharedMemory
from ..capture.sockets import SocketCapture
from ..capture.target import Target
from ..capture.tree import check_member, descendants
from ..capture.validate import check_target
from ..errors import DumpError, NoSuchProcess, as_error
from ..kernel import features, procfs
from ..precopy.arm import arm
from ..precopy.policy import Policy, RoundStats
from ..precopy.rounds import Member, Precopy
from ..present import PresentMap
from ..track.base import Tracker
from ..track.full import FullTracker
from ..track.uffd_wp import Handle, UffdWpTracker
from .freeze import capture_frozen, elapsed_ms, freeze_quiet, image_pages, thaw
from .preflight import preflight

# A snapshot run pre-copies a little (the process keeps running) and then
# freezes: the rounds are few because the written set since the last snapshot
# is usually small already.
SNAPSHOT_POLICY = Policy(max_rounds=3, target_downtime_ms=20.0, max_time=30.0)


@dataclass
class SnapshotResult:
    id: str
    pid: int
    full: bool
    reason: str
    freeze_ms: float
    seconds: float
    pages_written: int
    bytes_stored: int
    tracker: str


@dataclass
class SnapshotOptions:
    """How to take a snapshot (the CLI's flags; docs/API.md)."""

    wait: float = 0.0  # seconds to wait for the store's lock (another run, gc)
    policy: Policy | None = None  # pre-copy rounds (None: SNAPSHOT_POLICY)
    #: the process's descendants too, each tracked between runs like the root (its own
    #: persistent uffd and tracking record): one that was in the previous snapshot,
    #: with tracking intact, is incremental as well
    tree: bool = True
    tcp_established: bool = False  # also TCP connections to peers outside the tree
    shell_job: bool = False  # take fds on the terminal the job was started from


def snapshot(
    pid: int,
    store,
    options: SnapshotOptions | None = None,
    *,
    on_round: Callable[[RoundStats], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    **fields,
) -> SnapshotResult:
    """One snapshot of `pid` into `store` (a ckpt.store.Store, or the path of one,
    created if missing). Options as a SnapshotOptions, or its fields as keywords.
    on_status: one-line notes (why a snapshot is full); on_round: progress."""
    opts = replace(options or SnapshotOptions(), **fields)
    if isinstance(store, str):
        from ..store import Store

        store = Store.open(store, create=True)
    with as_error(DumpError):  # kernel/'s KernelError is this snapshot's failure (exit 12)
        return _take(pid, store, opts, on_round, on_status)


def _take(pid: int, store, opts: SnapshotOptions, on_round, on_status) -> SnapshotResult:
    wait, policy, tree = opts.wait, opts.policy, opts.tree
    tcp_established, shell_job = opts.tcp_established, opts.shell_job
    t0 = time.monotonic()
    say = on_status or (lambda _msg: None)
    with store.lock(wait=wait):
        # inside the lock: another snapshot run may have the target frozen (traced)
        st = check_target(pid)
        preflight(pid, tree=tree, tcp_established=tcp_established, shell_job=shell_job)
        target = Target(pid, st.starttime)
        rec = store.tracking_get(pid)
        parent = store.latest(pid)
        trk, full_reason = _attach_tracking(pid, st.starttime, rec, parent)
        if full_reason:
            say(f"full snapshot: {full_reason}")
        writer = store.begin(None if full_reason else parent)
        tracee = None
        frozen = None
        pre = None
        shm = None
        sockets = SocketCapture()
        try:
            if isinstance(trk, UffdWpTracker) and trk.ctx is None:
                tracee = target.freeze()
                faults.point("seized")
                arm(tracee, trk)
                tracee.detach()
                tracee = None
            if isinstance(trk, UffdWpTracker):
                # from here on pages get re-armed: the record must say "dirty" first
                store.tracking_put(pid, _record(trk.handle(st.starttime), None, "dirty"))
            faults.point("armed")
            parent_state = None if full_reason else _parent_state(store, parent)
            # shared memory continues from the parent's digests whatever the tracking
            # says: content comparison does not depend on it
            shm = SharedMemory((parent_state or {}).get("shm") or ())
            pre = Precopy(target, trk, writer, policy or SNAPSHOT_POLICY, on_round, shm=shm)
            pre.whole_next = bool(full_reason)
            if parent_state is not None:
                pre.present = _present_of(parent_state)
            if tree:
                _track_members(store, pid, parent, parent_state, pre, say)
            pre.run_rounds(t0)
            # frozen once no listener has a connection waiting to be accepted (new TCP
            # connections held meanwhile; the rules go with sockets.close() below)
            frozen, t_freeze, queues = freeze_quiet(pid, target.freeze, tree, sockets)
            tracee = frozen.members[0]
            if queues.unheld:
                say(f"no nft: new connections to {len(queues.unheld)} listening "
                    "address(es) could not be held during the freeze")  # fmt: skip
            cap = capture_frozen(
                frozen, trk, writer, pre, sockets=sockets, shm=shm,
                free_space=_free_space(parent_state, pre), skip_fds=_own_fds,
                tcp_established=tcp_established, shell_job=shell_job,
            )  # fmt: skip
            proc, final_pages, stored = cap.proc, cap.pages, cap.bytes_stored
            freeze_ms = elapsed_ms(t_freeze)
            frozen.detach()
            frozen = tracee = None
            sockets.close()  # the process runs on: its peers may talk again
            written = sum(r.pages_copied for r in pre.stats.rounds) + final_pages
            meta = {
                "ckpt_version": __version__, "pid": pid, "comm": proc.comm.decode(errors="replace"),
                "full": bool(full_reason), "reason": full_reason or "incremental",
                "pages_written": written, "bytes": stored + pre.bytes_stored, "freeze_ms": freeze_ms,
                "tracker": trk.name, "rounds": len(pre.stats.rounds) + 1,
                "pages": image_pages(proc),
                "processes": 1 + len(proc.tree),
            }  # fmt: skip
            faults.point("commit")
            info = store.commit(writer, proc.to_dict(), meta)
            if isinstance(trk, UffdWpTracker):
                store.tracking_put(pid, _record(trk.handle(st.starttime), info.id, "clean"))
            trk.disarm()  # persistent: closes only ckpt's copy; the target keeps tracking
            for m in pre.members:
                if isinstance(m.tracker, UffdWpTracker) and not m.gone:
                    handle = m.tracker.handle(m.target.starttime)
                    store.tracking_put(m.target.pid, _record(handle, info.id, "clean"))
                m.tracker.disarm()
        except BaseException:
            sockets.close()
            thaw(frozen, tracee)
            if isinstance(trk, UffdWpTracker):
                # keep the tracking in the target (recorded as dirty → next run is full)
                trk.disarm()
            else:
                try:
                    trk.cleanup_on_error()
                except Exception:
                    pass
            for m in pre.members if pre is not None else ():
                m.tracker.disarm()  # persistent ones stay in the member, recorded dirty
            store.abort(writer)
            raise
        finally:
            if pre is not None:
                pre.close()
            if shm is not None:
                shm.close()
    return SnapshotResult(
        id=info.id, pid=pid, full=bool(full_reason), reason=full_reason or "incremental",
        freeze_ms=freeze_ms, seconds=time.monotonic() - t0, pages_written=written,
        bytes_stored=meta["bytes"], tracker=trk.name,
    )  # fmt: skip


def _own_fds(trk: Tracker) -> set[int]:
    """ckpt's fd in a process: the persistent tracker's uffd, left there between runs."""
    return {trk.target_fd} if isinstance(trk, UffdWpTracker) else set()


def _parent_state(store, parent) -> dict:
    """The parent snapshot's process state: where incremental tracking starts from."""
    from ..image import ImageReader

    with ImageReader(store.path_of(parent)) as r:
        return r.state


def _present_of(state: dict) -> PresentMap:
    return PresentMap(tuple(run) for v in state["vmas"] for run in v.get("present", ()))


def _free_space(parent_state: dict | None, pre: Precopy) -> int:
    """A page-key space no member of this snapshot's chain has used."""
    used = {m.space for m in pre.members}
    for slot, sub in enumerate((parent_state or {}).get("tree", ()), 1):
        used.add(sub.get("space", -1) if sub.get("space", -1) >= 0 else slot)
    return max(used, default=0) + 1


def _track_members(store, root: int, parent, parent_state: dict | None, pre: Precopy, say) -> None:
    """Persistent tracking in each descendant, as for the root.

    A descendant is incremental when the parent snapshot holds it (same PID and start
    time) and its tracking record says the tracking went on since then; it keeps the
    key space it had there, so the parent's layers still answer for its pages. The
    record goes "dirty" before any page is re-armed, "clean" after the commit.
    """
    before = {}
    for slot, sub in enumerate((parent_state or {}).get("tree", ()), 1):
        space = sub.get("space", -1)
        before[(sub["pid"], sub.get("starttime", 0))] = (space if space >= 0 else slot, sub)
    free = _free_space(parent_state, pre)
    for mpid in descendants(root):
        try:
            if check_member(mpid, root):
                continue  # a zombie: nothing to track (recorded in the final freeze)
            mst = procfs.stat(mpid)
        except NoSuchProcess:
            continue
        mtrk, why = _attach_tracking(mpid, mst.starttime, store.tracking_get(mpid), parent)
        old = before.get((mpid, mst.starttime))
        if old is None and not why:
            why = "not in the previous snapshot"
        if old is not None and not why:
            space, present = old[0], _present_of(old[1])
        else:
            space, present, free = free, PresentMap(), free + 1
        member = Member(Target(mpid, mst.starttime), mtrk, space, present=present)
        member.whole_next = bool(why)
        try:
            if isinstance(mtrk, UffdWpTracker) and mtrk.ctx is None:
                tracee = member.target.freeze()
                try:
                    arm(tracee, mtrk)
                finally:
                    if tracee.attached:
                        tracee.detach()
            if isinstance(mtrk, UffdWpTracker):
                store.tracking_put(mpid, _record(mtrk.handle(mst.starttime), None, "dirty"))
        except (NoSuchProcess, DumpError):
            mtrk.disarm()
            continue  # exited meanwhile
        if why:
            say(f"descendant {mpid} copied whole: {why}")
        pre.add_member(member)


def _record(h: Handle, last: str | None, state: str) -> dict:
    return {
        "pid": h.pid,
        "starttime": h.starttime,
        "fd": h.fd,
        "ino": h.ino,
        "last": last,
        "state": state,
    }


def _attach_tracking(pid: int, starttime: int, rec: dict | None, parent) -> tuple[Tracker, str]:
    """The tracker for this run, and why the snapshot must be full ("" if incremental)."""
    f = features.probe()
    if not (f.uffd_wp_async and f.uffd_wp_unpopulated and f.pagemap_scan):
        return FullTracker(pid), "this kernel lacks uffd-wp tracking (WP_ASYNC + PAGEMAP_SCAN)"
    trk = UffdWpTracker(pid, persistent=True)
    if rec is None:
        return trk, "first snapshot of this process in this store"
    if rec.get("starttime") != starttime:
        return trk, "the process was restarted (same PID, new process): tracking lost"
    why = trk.reattach(Handle(pid, starttime, rec["fd"], rec["ino"]))
    if why:
        return trk, f"tracking lost: {why}"
    if rec.get("state") != "clean":
        return trk, "the previous snapshot run did not finish: tracking cannot be trusted"
    if parent is None or rec.get("last") != parent.id:
        return (
            trk,
            "the store's latest snapshot of this process is not the one tracking started from",
        )
    return trk, ""
