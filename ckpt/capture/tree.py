"""A process and its descendants: find them, freeze them all, link what they share.

The tree is frozen top-down and listed again until a pass finds nobody new: a
process that is still running can fork, a frozen one cannot, so once every
process found is frozen the tree is complete. The order (parents before their
children, breadth first) is the restore order; a process's index in it is its
"slot": page keys are `slot << 48 | vaddr` (vaddrs stay below 2^47).

Things two processes share are stored once, on the first process in slot order
that has them, and the others point at it: an open file description (an fd
inherited across fork: same offset and flags afterwards, found with kcmp), pipes,
sockets and memfds. Shared memory objects are stored once per object by
capture/shm.py.

A zombie descendant (exited, not waited for by its parent yet) is not frozen but
recorded (`zombie()`: PID, parent, group, session, wait status, ids); once its parent
is frozen nobody can reap it, so the zombies of the frozen tree are final.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import DumpError, NoSuchProcess, TraceeGone, UnsupportedProcess
from ..kernel import abi, procfs
from ..kernel.process import kcmp_file, same_fd_table
from ..kernel.ptrace import Tracee, seize_group
from ..model import Fd, ProcessImage, Zombie
from . import fd_kinds
from .locks import keep_on_peer
from .security import check_namespaces
from .sockets import SocketCapture, link_tree_sockets
from .unlinked import link_tree as link_unlinked
from .written import link_tree as link_written


def children(pid: int) -> list[int]:
    """Direct children of every thread of pid."""
    out: list[int] = []
    try:
        tids = os.listdir(procfs.path(pid, "task"))
    except FileNotFoundError:
        return out
    # every thread's file in one call into C (a third cheaper than a read each)
    try:
        texts = procfs.read_task_files(pid, [int(t) for t in tids], "children")
    except NoSuchProcess:
        return out
    for text in texts:
        if text:  # (None: a thread that exited)
            out += [int(x) for x in text.split()]
    return sorted(set(out))


def descendants(pid: int, kids_of: dict[int, list[int]] | None = None) -> list[int]:
    """pid's descendants, breadth first (parents before children). kids_of: filled with
    each process's children as listed."""
    order, queue = [], [pid]
    while queue:
        p = queue.pop(0)
        kids = children(p)
        if kids_of is not None:
            kids_of[p] = kids
        order += kids
        queue += kids
    return order


def check_member(pid: int, root: int, *, frozen: bool = False) -> bool:
    """Descendant states ckpt cannot bring back: refuse them by name. True for a zombie
    (it has exited and its parent has not waited for it yet): see zombie().

    frozen: pid is already seized by us (its "t" state and tracer are ours)."""
    try:
        st = procfs.stat(pid)
    except NoSuchProcess:
        return False
    what = f"process {pid} ({st.comm.decode(errors='replace')}), a descendant of {root},"
    if frozen:
        if st.state in ("Z", "X"):  # killed while we held it
            raise DumpError(f"{what} exited during the dump", pid=root)
        return False
    if st.state == "X":  # being released: gone in a moment
        return False
    dead = st.state == "Z"
    if dead and _tasks(pid) not in ([], [pid]):
        raise UnsupportedProcess(
            f"{what} has a main thread that has exited while other threads run: not supported",
            pid=root,
        )
    if st.state in ("T", "t"):
        raise UnsupportedProcess(
            f"{what} is stopped (job control or a debugger); continue it first, or dump "
            "with --no-tree",
            pid=root,
        )
    try:
        tracer = int(procfs.status(pid).get("TracerPid", "0"))
        if tracer and tracer != os.getpid():
            raise UnsupportedProcess(f"{what} is traced by process {tracer}", pid=root)
        check_namespaces(pid, root)
    except NoSuchProcess:
        return False
    return dead


def _tasks(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(procfs.path(pid, "task")))
    except FileNotFoundError:
        return []


def zombie(pid: int, root: int) -> Zombie | None:
    """A zombie descendant as the image keeps it (None if it is gone): its links and the
    status its parent's wait will read, /proc/PID/stat field 52 (the kernel's exit_code
    of the leader, what wait reports for it)."""
    try:
        raw = procfs.read_bytes(pid, "stat")
        st = procfs.parse_stat(raw)
        status = procfs.status(pid)
    except NoSuchProcess:
        return None
    if st.state != "Z":
        if st.state == "X":  # being released: gone in a moment
            return None
        raise DumpError(f"process {pid} appeared in the tree while it was frozen", pid=root)
    z = Zombie(
        pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session, comm=st.comm,
        status=int(raw[raw.rfind(b")") + 2 :].split()[49]), exit_signal=st.exit_signal,
        uids=[int(x) for x in status.get("Uid", "").split()],
        gids=[int(x) for x in status.get("Gid", "").split()],
    )  # fmt: skip
    if not z.status_ok():
        raise UnsupportedProcess(
            f"zombie {pid} ({st.comm.decode(errors='replace')}), a descendant of {root}, "
            f"has an exit status ckpt does not understand ({z.status:#x})",
            pid=root,
        )
    return z


@dataclass
class FrozenTree:
    """Every process of the tree stopped; members[0] is the root."""

    members: list[Tracee]
    #: descendants that had exited, not yet waited for by their (frozen) parents
    zombies: list[Zombie] = field(default_factory=list)
    #: each member's children, as the freeze listed them with every member frozen
    #: (fd_tables: one reading of every thread's children file less)
    kids: dict[int, list[int]] | None = None

    @property
    def pids(self) -> list[int]:
        return [t.pid for t in self.members]

    def detach(self) -> None:
        err: OSError | None = None
        for t in reversed(self.members):
            try:
                t.detach()
            except OSError as exc:
                err = err or exc
        if err is not None and not isinstance(err, NoSuchProcess):
            raise err

    def kill_and_reap(self) -> None:
        for t in self.members:
            try:
                os.kill(t.pid, 9)
            except ProcessLookupError:
                pass
        for t in reversed(self.members):
            t.reap_killed()


def freeze_tree(root: Tracee) -> FrozenTree:
    """With the root already frozen (and its threads), freeze every descendant.

    A zombie is not frozen (it runs nothing) but recorded: its parent, frozen, cannot
    reap it any more, so once every live process is held the zombies found are final."""
    held: dict[int, Tracee] = {root.pid: root}
    dead: set[int] = set()
    try:
        while True:
            # a pass that finds nobody new was made with every live member frozen: what
            # it found is the tree (frozen processes neither fork nor exit, and only they
            # could reap the zombies); no pass more to list it
            kids: dict[int, list[int]] = {}
            found = descendants(root.pid, kids)
            new = [p for p in found if p not in held and p not in dead]
            if not new:
                break
            for p in new:
                if check_member(p, root.pid):
                    dead.add(p)
                    continue
                try:
                    held[p] = seize_group(p, procfs.tasks)
                except (NoSuchProcess, TraceeGone):
                    continue  # exited meanwhile: not part of the tree any more (or a zombie)
        order = [root.pid, *found]
        for p in set(held) - set(order):  # left the tree (exited, re-parented)
            held.pop(p).detach()
        zombies = []
        for p in order[1:]:
            if p in held:
                check_member(p, root.pid, frozen=True)
            elif (z := zombie(p, root.pid)) is not None:
                if z.pid == z.ppid or z.ppid not in held:
                    raise DumpError(f"zombie {p} of the tree has no frozen parent", pid=root.pid)
                zombies.append(z)
        return FrozenTree([held[p] for p in order if p in held], zombies, kids)
    except BaseException:
        for p, t in held.items():
            if p != root.pid:
                try:
                    t.detach()
                except OSError:
                    pass
        raise


def fd_tables(pids: list[int], kids: dict[int, list[int]] | None = None) -> list[int]:
    """For each process of the dump (parents first), the index of the first one whose fd
    table it shares (clone(CLONE_FILES), found with kcmp(KCMP_FILES)); -1: its own.

    The restore forks such a process with CLONE_FILES from its parent, so the table
    must be its parent's (or shared with it); one shared with a process outside the
    dump — its parent when it is the root, a child that `--no-tree` leaves out —
    would be restored as a table of its own, and is refused like the rest. kids: the
    members' children, when listed already (FrozenTree.kids)."""
    out = [-1] * len(pids)
    for i, pid in enumerate(pids):
        out[i] = next((j for j in range(i) if same_fd_table(pids[j], pid)), -1)
    slot = {pid: i for i, pid in enumerate(pids)}
    for i, pid in enumerate(pids):
        ppid = procfs.stat(pid).ppid
        listed = kids.get(pid) if kids is not None else None
        outside = [c for c in (children(pid) if listed is None else listed) if c not in slot]
        if i == 0:
            outside.insert(0, ppid)
        other = next((q for q in outside if q > 0 and same_fd_table(pid, q)), None)
        if other is not None:
            raise UnsupportedProcess(
                f"process {pid} shares its fd table with process {other}, which is not "
                "dumped with it (clone with CLONE_FILES): its restored table would be "
                "its own",
                pid=pid,
            )
        if out[i] < 0 or i == 0:
            continue
        parent = slot.get(ppid, -1)
        if parent < 0 or out[i] not in (parent, out[parent]):
            raise UnsupportedProcess(
                f"process {pid} shares its fd table with process {pids[out[i]]}, which is "
                "not its parent (clone with CLONE_PARENT|CLONE_FILES, or re-parented): ckpt "
                "restores a shared fd table only between a parent and its child",
                pid=pid,
            )
    return out


def link_shared(procs: list[ProcessImage], sockets: SocketCapture) -> None:
    """Point what later processes share with earlier ones at its first holder.

    Runs on the captured images while the tree is still frozen (kcmp and
    /proc/PID/maps need the live processes).
    """
    _link_fds(procs)
    _link_epolls(procs)
    _link_memfds(procs)
    _link_pipes(procs)
    _link_sockets(procs, sockets)
    link_unlinked(procs)  # unlinked files: content once, on the first record (unlinked.py)
    link_written(procs)  # files written at their offset: content only if one member opened it


def _link_fds(procs: list[ProcessImage]) -> None:
    by_ident: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for slot, p in enumerate(procs):
        for i, fd in enumerate(p.fds):
            if fd.kind in ("dup", "memfd") or fd.fd < 0:  # memfds: _link_memfds
                continue
            try:
                st = os.stat(procfs.fd_path(p.pid, fd.fd))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            owner = next(
                (
                    (s, ofd)
                    for s, ofd in by_ident.get(key, [])
                    if kcmp_file(procs[s].pid, ofd, p.pid, fd.fd)
                ),
                None,
            )
            if owner is None:
                by_ident.setdefault(key, []).append((slot, fd.fd))
                continue
            p.fds[i] = Fd(
                fd=fd.fd, kind="peer", path=fd.path, flags=fd.flags, cloexec=fd.cloexec,
                pos=fd.pos, peer_slot=owner[0], peer_fd=owner[1],
                locks=keep_on_peer(fd.locks),  # its own POSIX locks (capture/locks.py)
            )  # fmt: skip


def _link_epolls(procs: list[ProcessImage]) -> None:
    """An epoll inherited across fork is one open file description, made by its first
    holder and taken by the others ("peer", _link_fds) with every registration. A
    registration names the (fd, file) pair of the process that added it, and only a
    process holding that file can add it again, once: the epoll's maker when it holds
    the file (at the registered number or another: restore/fds.py _epoll_entries), else
    the first later holder of the epoll that does, from its "peer" record (Fd.epoll
    there: added once that member has taken the epoll and made its own fds). Refused
    when no holder of the epoll holds the file (its only holders do not hold the epoll).
    """
    makers = {(s, f.fd): f for s, p in enumerate(procs) for f in p.fds if f.kind == "epoll"}
    takers: dict[tuple[int, int], list[tuple[int, Fd]]] = {}
    for slot, p in enumerate(procs):
        if p.files_of >= 0:  # restores no fds of its own (a shared table: its maker's)
            continue
        for f in p.fds:
            if f.kind == "peer" and (f.peer_slot, f.peer_fd) in makers:
                takers.setdefault((f.peer_slot, f.peer_fd), []).append((slot, f))
    for (slot, efd), ep in makers.items():
        if all(e.src_fd != fd_kinds.EPOLL_ELSEWHERE for e in ep.epoll):
            continue
        keep = []
        for e, toff in fd_kinds.epoll_slots(ep):
            if e.src_fd != fd_kinds.EPOLL_ELSEWHERE:
                keep.append(e)
                continue
            for tslot, rec in takers.get((slot, efd), []):
                mine = sorted(f.fd for f in procs[tslot].fds if f.fd >= 0)
                src = fd_kinds.epoll_source(procs[tslot].pid, procs[slot].pid, efd, e.tfd,
                                            toff, mine)  # fmt: skip
                if src is not None:
                    rec.epoll.append(dataclasses.replace(e, src_fd=src))
                    break
            else:
                raise UnsupportedProcess(
                    f"process {procs[slot].pid}: fd {efd} (epoll): the file registered as fd "
                    f"{e.tfd} is held only by processes of the dump that do not hold this "
                    "epoll (ckpt adds a registration again from a process holding both)",
                    pid=procs[0].pid,
                )
        ep.epoll = keep


def _link_memfds(procs: list[ProcessImage]) -> None:
    """A memfd several members hold (fd or mapping) is made once, by the first, with
    its content and seals; the others take that object (restore/fds.create_memfds). An
    fd that is the same open file description as an earlier member's (inherited across
    fork: kcmp) names it (peer_slot, peer_fd) and takes it at restore, offset and all."""
    first: dict[int, int] = {}
    held: dict[int, list[tuple[int, int]]] = {}  # memfd → (slot, fd) of the fds so far
    for slot, p in enumerate(procs):
        for f in p.fds:
            if f.kind != "memfd":
                continue
            if f.fd >= 0:
                same = next(((s, ofd) for s, ofd in held.get(f.obj_id, ())
                             if s != slot and kcmp_file(procs[s].pid, ofd, p.pid, f.fd)),
                            None)  # fmt: skip
                if same is not None:
                    f.peer_slot, f.peer_fd = same
                else:
                    held.setdefault(f.obj_id, []).append((slot, f.fd))
            if f.memfd is None:
                continue
            if f.obj_id not in first:
                first[f.obj_id] = slot
            elif first[f.obj_id] != slot:
                f.memfd.shared_from = first[f.obj_id]
                f.memfd.extents, f.memfd.seals = [], 0


def _link_pipes(procs: list[ProcessImage]) -> None:
    """A pipe or FIFO whose descriptions live in different processes (the usual fork +
    close pattern; a FIFO each opened by path; a pipe opened again through /proc): the
    first process holding it creates it (with its buffered data). In a later process,
    the first read-only and the first write-only description of a pipe that the creator
    does not hold itself become "pipe_end"s taken from it (its pipe2 ends); every other
    description (of a FIFO: all) is a "pipe_open", opened again at restore through
    /proc/<creator>/fd/<its first fd of it> (restore/fds.py)."""
    groups: dict[int, list[tuple[int, Fd]]] = {}
    for slot, p in enumerate(procs):
        if p.files_of >= 0:  # restores no fds of its own (a shared table: its maker's)
            continue
        for f in p.fds:
            if f.kind in ("pipe", "pipe_open", "fifo"):
                groups.setdefault(f.obj_id, []).append((slot, f))
    for recs in groups.values():
        slots = {slot for slot, _ in recs}
        if len(slots) < 2:
            continue
        creator = min(slots)
        first = next(f for slot, f in recs if slot == creator)
        taken = {
            f.flags & abi.O_ACCMODE
            for s, f in recs
            if s == creator and f.kind == "pipe" and fd_kinds.pipe2_end(f)
        }
        for slot, f in recs:
            if f.data and not first.data:
                first.data = f.data
            first.pipe_size = max(first.pipe_size, f.pipe_size)
            if slot == creator:
                continue
            f.data = b""  # the pipe's, kept once: on the creator's first record
            mode = f.flags & abi.O_ACCMODE
            if f.kind == "pipe" and fd_kinds.pipe2_end(f) and mode not in taken:
                taken.add(mode)
                f.kind, f.peer_slot = "pipe_end", creator
            else:
                f.kind, f.peer_slot, f.peer_fd = "pipe_open", creator, first.fd


def _link_sockets(procs: list[ProcessImage], sockets: SocketCapture) -> None:
    """Sockets connected across processes (socketpairs split by fork, a client and
    the listener it connected to, TCP on loopback): capture/sockets.py gives each
    such group to its first process; the others' records become "socket_end"."""
    link_tree_sockets(procs, sockets)
