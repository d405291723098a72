"""The dump's refusal of process groups and sessions that the restore could not make
again exactly (restore/sessions.py plan: a session or group led by a live process
outside the dump, two groups led from outside, shapes no order of births makes):
one line naming the process, before the first pre-copy round (the preflight) and
again at the freeze, on the frozen tree."""

from __future__ import annotations

from ..capture.tree import FrozenTree, descendants
from ..errors import NoSuchProcess, UnsupportedProcess
from ..kernel import procfs
from ..restore.sessions import Link, ShapeError, plan


def preflight_sessions(root: int, members: list[int], *, shell_job: bool = False) -> None:
    """On the running tree: the root, its live descendants `members` and the zombies
    among its descendants (a process that exits meanwhile is left to the freeze, which
    looks again)."""
    try:
        zombies = [p for p in descendants(root) if p not in members and _zombie(p)]
        links = [_link(p, procfs.stat(p), False) for p in [root, *members]]
        links += [_link(p, procfs.stat(p), True) for p in zombies]
    except NoSuchProcess:
        return
    _check(links, shell_job)


def frozen_sessions(frozen: FrozenTree, tables: list[int], *, shell_job: bool) -> None:
    """On the frozen tree; tables: capture/tree.py fd_tables (CLONE_FILES members)."""
    links = [_link(t.pid, t.stat(), False, tables[i] >= 0) for i, t in enumerate(frozen.members)]
    for z in frozen.zombies:
        name = z.comm.decode(errors="replace")
        links.append(Link(z.pid, z.ppid, z.pgid, z.sid, z.exit_signal, False, True, name))
    _check(links, shell_job)


def _link(pid: int, st: procfs.Stat, zombie: bool, shares_table: bool = False) -> Link:
    return Link(pid, st.ppid, st.pgrp, st.session, st.exit_signal, shares_table, zombie,
                st.comm.decode(errors="replace"))  # fmt: skip


def _check(links: list[Link], shell_job: bool) -> None:
    try:
        plan(links, shell_job=shell_job, alive=_alive)
    except ShapeError as exc:
        raise UnsupportedProcess(str(exc), pid=links[0].pid) from None


def _zombie(pid: int) -> bool:
    try:
        return procfs.stat(pid).state == "Z"
    except NoSuchProcess:
        return False


def _alive(pid: int) -> bool:
    """A process with that PID runs (or is a zombie): its session or group is not gone."""
    try:
        procfs.stat(pid)
    except NoSuchProcess:
        return False
    return True
