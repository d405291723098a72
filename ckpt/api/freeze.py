"""The freeze step shared by dump, snapshot and migration, and its thaw.

With the root frozen (and, for a tree, every descendant): run the final round of
each process, copy the tree's shared memory objects once, link what processes
share (fds, pipes, sockets, copy-on-write pages). Nothing here decides whether
the target dies or runs on; the orchestrator does (dump.py, snapshot.py).

Page-key spaces: the root is space 0; a member that pre-copy followed keeps the
space its pages were stored under; any other member gets a fresh one (from
`free_space` up), so no two processes of one image chain share keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..capture import attrs
from ..capture.backlog import AcceptQueues
from ..capture.cow import link_cow
from ..capture.shm import SharedMemory, project_onto
from ..capture.sockets import SocketCapture
from ..capture.tree import FrozenTree, fd_tables, freeze_tree, link_shared
from ..kernel import procfs
from ..kernel.ptrace import Tracee
from ..model import ProcessImage, slot_base
from ..precopy.final import final_round
from ..precopy.rounds import Precopy
from ..track.base import Tracker
from ..track.full import FullTracker
from .sessions import frozen_sessions


@dataclass
class Captured:
    """What the freeze read: the image state (root with its tree and shared objects)
    and what this step copied."""

    proc: ProcessImage
    pages: int  # pages copied while frozen (the final round of every process + shm)
    bytes_stored: int


def freeze_members(root: Tracee, tree: bool) -> FrozenTree:
    """The root is frozen already; with `tree`, freeze its descendants too. The caller
    holds the result at once, so a failure from here on can thaw every member."""
    return freeze_tree(root) if tree else FrozenTree([root])


def freeze_quiet(
    pid: int, freeze_root: Callable[[], Tracee], tree: bool, sockets: SocketCapture
) -> tuple[FrozenTree, float, AcceptQueues]:
    """Freeze the root (freeze_root) and, with `tree`, its descendants, at a moment no
    listening socket of the tree has a connection waiting to be accepted: new TCP
    connections are held by rules in the run's network lock (`sockets.lock`), the
    queues drained while the target runs, and a freeze that still finds one is undone
    and tried again (capture/backlog.py). Returns the frozen tree, the monotonic time
    its freeze started, and the queues (which listeners could not be held). A failure
    leaves nothing frozen; the lock's rules are the caller's, as for connections."""

    def freeze() -> FrozenTree:
        tracee = freeze_root()
        try:
            return freeze_members(tracee, tree)
        except BaseException:
            thaw(None, tracee)
            raise

    queues = AcceptQueues(pid, tree, sockets)
    frozen, t = queues.freeze(freeze, lambda f: f.pids, thaw)
    return frozen, t, queues


def capture_frozen(
    frozen: FrozenTree,
    trk: Tracker,
    writer,
    pre: Precopy | None,
    *,
    sockets: SocketCapture,
    shm: SharedMemory,
    free_space: int,
    skip_fds: Callable[[Tracker], set[int]] = lambda _t: set(),
    tcp_established: bool = False,
    shell_job: bool = False,
) -> Captured:
    """The final round of every frozen process, then the tree-wide parts.

    pre: the pre-copy rounds (None without pre-copy): their present maps and last
    smaps, and the members they followed. skip_fds: ckpt's own fds in a process,
    by its tracker (a persistent tracker's uffd)."""
    attrs.refuse_frozen(frozen.members)
    # a table shared with an outsider: refused before fds
    tables = fd_tables(frozen.pids, frozen.kids)
    # groups and sessions that could not come back exactly (restore/sessions.py)
    frozen_sessions(frozen, tables, shell_job=shell_job)
    pids = frozenset(frozen.pids)
    root = frozen.members[0]
    fr = final_round(
        root, trk, writer, sockets=sockets, shm=shm, skip_fds=skip_fds(trk),
        prior_maps=pre.last_maps if pre else None, present=pre.present if pre else None,
        tree=pids, tcp_established=tcp_established, shell_job=shell_job,
    )  # fmt: skip
    proc, pages, stored = fr.proc, fr.pages, fr.bytes_stored
    for member in frozen.members[1:]:
        m = pre.member(member.pid, procfs.stat(member.pid).starttime) if pre else None
        if m is not None:
            space = m.space
        else:  # not followed by pre-copy (or appeared since): copied whole, a new space
            space, free_space = free_space, free_space + 1
        mtrk = m.tracker if m is not None else FullTracker(member.pid)
        sub = final_round(
            member, mtrk, writer, sockets=sockets, shm=shm, skip_fds=skip_fds(mtrk),
            base=slot_base(space), prior_maps=m.last_maps if m else None,
            present=m.present if m else None, tree=pids, tcp_established=tcp_established,
            shell_job=shell_job,
        )  # fmt: skip
        sub.proc.space = space
        proc.tree.append(sub.proc)
        pages += sub.pages
        stored += sub.bytes_stored
    proc.zombies = frozen.zombies
    shm_pages, shm_stored = _capture_shared(proc, shm, writer)
    for p, files_of in zip([proc, *proc.tree], tables, strict=True):
        p.files_of = files_of  # clone(CLONE_FILES): restored forked into that table
    link_shared([proc, *proc.tree], sockets)
    link_cow([proc, *proc.tree])  # pages still shared since a fork
    return Captured(proc, pages + shm_pages, stored + shm_stored)


def _capture_shared(proc: ProcessImage, shm: SharedMemory, writer) -> tuple[int, int]:
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


def thaw(frozen: FrozenTree | None, tracee: Tracee | None = None) -> None:
    """Let a failed run's target go on as it was: detach every frozen member (or the
    lone tracee when the tree was not frozen yet). Errors are not raised: the run's
    own error is the one to report."""
    try:
        if frozen is not None:
            frozen.detach()
        elif tracee is not None and tracee.attached:
            tracee.detach()
    except OSError:
        pass


def elapsed_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000
