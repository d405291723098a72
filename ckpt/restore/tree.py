"""Restore a process tree: fork the members from their restored parents, then
rebuild them in phases so that what they share exists before it is taken.

    fork and  parents first: each member is forked (clone3, its PID) from its
    memory    parent's restorer once the parent's address space is built (the private
              pages they shared copy-on-write at the dump are inherited again:
              restore/cow.py), then builds its own; a session leader calls setsid
              before its children are forked, so they inherit the session (a member
              whose session its parent is not in is forked by a stand-in of it:
              restore/sessions.py); a shared memory object is made by the first VMA
              that maps it and mapped by the others (restore/shm.py), then filled once
    groups    every process group made and joined, the stand-ins gone
    files     fds (a shared open file description is taken from its first holder
              by pidfd_getfd) and process attributes; then the zombies exit (each
              forked from its parent, most before the parent's memory,
              restore/zombies.py)
    rest      threads, signals, timers, rlimits, credentials (after: they drop
              ckpt's privileges), rseq
    leave     children first, the root last

Any failure kills every member (they are all traced with PTRACE_O_EXITKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from .. import faults
from ..errors import ImageCorrupt, RestoreError, as_error
from ..kernel import abi, syscalls, sysvshm
from ..model import ProcessImage
from . import attrs, cow, sessions, zombies
from .checks import check_files, check_pidfds, wait_pid_free
from .fds import check_owners, table_holder_bases
from .fill import Fill, open_fill
from .rebuild import Rebuilder, RestoreContext
from .security import check as check_security
from .shm import SharedObjects, check_not_in_use, check_objects
from .sockets import RebuiltConnections
from .tty import Ptys, Terminal, foreground, job_modes
from .unlinked import UnlinkedFiles


def members(root: ProcessImage) -> list[ProcessImage]:
    return [root, *root.tree]


def check_tree(root: ProcessImage, new_pid: bool) -> None:
    procs = members(root)
    slot = {p.pid: i for i, p in enumerate(procs)}
    for i, p in enumerate(procs[1:], 1):
        if slot.get(p.ppid, i) >= i:
            raise ImageCorrupt(f"tree member {p.pid}: its parent {p.ppid} is not before it")
    check_objects(root)
    check_not_in_use(root)
    zombies.check(root, set(slot))
    image_pids = set(slot) | {z.pid for z in root.zombies}
    for p in procs:
        check_files(p)
        check_pidfds(p, image_pids)  # a pidfd of a process outside the image: still there
        check_security(p)  # capabilities ckpt lacks, a cgroup or root gone (exit 11)
        if not new_pid:  # every PID and TID must be free before anything is built
            for t in [p.pid, *(t.tid for t in p.threads[1:])]:
                wait_pid_free(t)
    for z in root.zombies if not new_pid else ():
        wait_pid_free(z.pid)
    # groups and sessions: an order of births that makes them (restore/sessions.py); the
    # ids of gone leaders, which helpers take, must be free too (without --shell-job:
    # every one a --shell-job restore takes, and those of the root's session)
    for pid in sessions.check(root, False).helper_ids() if not new_pid else ():
        wait_pid_free(pid)
    _check_fd_state(procs, new_pid)


def _check_fd_state(procs: list[ProcessImage], new_pid: bool) -> None:
    """A member sharing a table (clone(CLONE_FILES)) is forked from its parent with
    CLONE_FILES: the parent must hold that table. SIGIO owners (restore/fds.py)."""
    for i, p in enumerate(procs):
        parent = next((j for j in range(i) if procs[j].pid == p.ppid), -1)
        if p.files_of >= 0 and p.files_of not in (parent, procs[parent].files_of):
            raise ImageCorrupt(
                f"tree member {p.pid} shares the fd table of slot {p.files_of}, not its parent's"
            )
    ids = {t.tid for p in procs for t in p.threads} | {p.pid for p in procs}
    check_owners(procs, ids | {z.pid for z in procs[0].zombies}, new_pid)


@as_error(RestoreError)  # a kernel failure inside is the restore's (exit 11)
def build_tree(
    root_pid: int,
    root: ProcessImage,
    new_pid: bool,
    write_pages: Callable[[int, ProcessImage, int, Fill], None],
    terminal: Terminal | None = None,
    fill_shared: Callable[[SharedObjects], None] | None = None,
    externals: dict[int, int] | None = None,
    reattach_tty: bool = False,
) -> list[Rebuilder]:
    """Turn the parked restorer `root_pid` and its forks into the tree; returns the
    Rebuilders (closed by the caller). write_pages(slot, image, mem_fd, fill); then
    fill_shared(objects) once every member has mapped the shared memory objects.
    terminal: restore --shell-job (restore/tty.py): the tree is a job of ckpt's terminal.
    externals: fds 0-2 that led outside the dump → the fd of this ckpt they get.
    reattach_tty: restore --reattach-tty (a session's terminal outside the image)."""
    procs = members(root)
    slot = {p.pid: i for i, p in enumerate(procs)}
    bases = table_holder_bases(procs)  # members sharing a table (clone(CLONE_FILES))
    rbs: list[Rebuilder] = []
    made: list[zombies.Made] = []  # the zombies, until they exit (restore/zombies.py)
    tcp = RebuiltConnections()  # if the restore fails, its TCP connections go silently
    inflight = inflight_files(procs)  # files in flight: sent once every member has its fds
    sess = sessions.Sessions(sessions.check(root, terminal is not None), root, new_pid)
    parked: dict[tuple[int, int], tuple[int, int]] = {}
    memfds: dict[int, tuple[int, int]] = {}
    pids: dict[int, int] = {}  # PID at the dump → restored, members and zombies (pidfds)
    unlinked = UnlinkedFiles(procs)  # made once for the tree (restore/unlinked.py)
    shared = SharedObjects(root.shm)
    ptys = Ptys(procs, reattach_tty)  # pty pairs made again; ckpt holds the masters
    tree = len(procs) > 1

    def context(i: int) -> RestoreContext:
        """Member i's share of the tree: the members restored before it, the registries."""
        return RestoreContext(
            holder_base=bases.get(i, -1),  # a table shared with an earlier member's
            inflight=inflight,  # the tree's files in flight (restore/inflight.py)
            peers={j: rbs[j].pid for j in range(i)},
            peer_images={j: procs[j] for j in range(i)},
            parked=parked if tree else None,
            memfds=memfds if tree else None,
            shared=shared,
            externals=externals or {},  # fds 0-2 that led outside (restore/fds.py)
            terminal=terminal,
            shell_job=i == 0 and terminal is not None,
            pids=pids,
            unlinked=unlinked,
            ptys=ptys,
        )

    try:
        rbs.append(Rebuilder(root_pid, root, new_pid, context(0)))
        pids[root.pid] = root_pid
        for i, p in enumerate(procs):
            if i:
                # forked once the parent's pages are in: what they shared copy-on-write
                # at the dump is inherited again, not written twice (restore/cow.py)
                parent = rbs[slot[p.ppid]]
                cow.check(p, slot[p.ppid], parent.proc)
                flags = abi.CLONE_FILES if p.files_of >= 0 else 0  # the parent's table
                forker = sess.forker(p.pid, parent)  # or a stand-in of its session
                tr = forker.fork_child(None if new_pid else p.pid, attrs.exit_signal(p), flags)
                rbs.append(Rebuilder(tr.pid, p, new_pid, context(i), tracee=tr))
                pids[p.pid] = tr.pid
                rbs[i].inj.use(parent.inj.scratch.addr)  # the parent's, inherited
            rb = rbs[i]
            made += sess.born(rb)  # its session, and the zombies forked before its memory
            pids.update((m.image.pid, m.pid) for m in made)
            rb.prepare_memory()
            rb.map_vmas()
            fill = open_fill(rb.pid, rb.inj, rb.proc)  # UFFDIO_COPY where it can (fill.py)
            try:
                write_pages(i, rb.proc, rb.mem_fd, fill)
            finally:
                fill.close()
            made += sess.built(rb)  # a setsid put off, stand-ins forked from its memory
            pids.update((m.image.pid, m.pid) for m in made)
        sess.groups(rbs, made)  # every group made and joined; the stand-ins go
        if shared.objects:
            if fill_shared is None:
                raise ImageCorrupt("the image has shared memory objects but no way to fill them")
            fill_shared(shared)
        for rb in rbs:  # before a shared table's fds are made: its other members' memfds
            rb.close_table_holders()
        for rb in rbs:
            rb.state_files()
        by_pid = {rb.pid: rb for rb in rbs}
        for pid, fd in parked.values():  # taken (duplicated) by now, or closed in the image
            syscalls.close(by_pid[pid].inj, fd)
        faults.fail("restore-files")
        _process_groups(rbs, made)
        foreground(rbs, made)  # each session's pty: its foreground group (restore/tty.py)
        ptys.finish()  # then their locks: no slave is opened after this
        zombies.exit_all(made)  # before the parents' signals: their SIGCHLD is taken back
        for rb in rbs:
            rb.state_rest()
        ids = {tid: now for rb in rbs for tid, now in rb.tid_map.items()}
        ids.update((m.image.pid, m.pid) for m in made)
        for rb in rbs:  # SIGIO owners: once every process and thread exists, creds set
            rb.restore_fd_owners(ids)
        for rb in reversed(rbs):
            rb.leave()
    except BaseException:
        tcp.silence()  # before the kill: no FIN or RST (restore/sockets.py)
        sess.kill_all()
        zombies.kill_all(made)
        kill_members(rbs)
        for rb in rbs:
            for shmid in rb.sysv_created:  # made for this restore: not left behind
                with contextlib.suppress(OSError):
                    sysvshm.remove(shmid)
            rb.close()
        raise
    finally:
        tcp.close()
        ptys.close()
    _remove_doomed_segments(procs)
    return rbs


def _remove_doomed_segments(procs: list[ProcessImage]) -> None:
    """Segments that were marked for deletion (IPC_RMID while attached) are marked
    again once every member is attached: they go when the last one detaches."""
    for p in procs:
        for v in p.vmas:
            if v.sysv is not None and v.sysv.mode & sysvshm.SHM_DEST:
                sysvshm.remove(v.sysv.shmid)


def _process_groups(rbs: list[Rebuilder], made: list[zombies.Made]) -> None:
    """A shell job's group gets the terminal, with the job's modes, before anything runs.
    Every group and session is made by then (restore/sessions.py): the root of a shell
    job leads a group of its own, in ckpt's session, which the members of a group led
    from outside the tree joined."""
    job = rbs[0] if rbs[0].ctx.shell_job else None
    if job is not None:
        job.ctx.terminal.hand_over(job.pid, job_modes(members(job.proc)))


def kill_members(rbs: list[Rebuilder]) -> None:
    """SIGKILL every restorer of the tree; reap what we may (the root is our child)."""
    for rb in reversed(rbs):
        with contextlib.suppress(ProcessLookupError):
            os.kill(rb.pid, signal.SIGKILL)
    for rb in reversed(rbs):
        for tr in [*(t for _, t, _ in rb.threads), rb.tracee]:
            if tr.attached:
                with contextlib.suppress(OSError):
                    tr.wait()
                tr.attached = False


def inflight_files(procs: list[ProcessImage]):
    """The tree's files in flight in unix sockets (restore/inflight.py InflightFiles)."""
    from .inflight import InflightFiles

    return InflightFiles(procs)
