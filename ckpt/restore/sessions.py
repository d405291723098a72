"""Process groups and sessions of a tree: made again exactly, or refused at the dump.

The kernel's rules decide the order. A process enters a session only by birth (fork
copies the session) or by making one of its own (setsid, which fails for a process
whose PID is a group's id), and never leaves a session it is the leader of. A group
is made by its leader (setpgid(0, 0)) and joined (setpgid(0, G)) only from the same
session, and only while it has a member.

`plan()` decides, from each process's PID, parent, group, session and exit signal
(members and zombies, parents first), how each one is born into its session:

- from its parent, when the parent is in that session by then (the common case; a
  session leader makes its session at birth, before its children are forked);
- from an "old-session door", when the parent made its session of its own after
  forking it (the child stays in the parent's old session): the parent forks the
  door before its setsid, which is put off until the parent's memory is built;
- from a "session door", when it is in the session of a sibling (live or zombie) that
  leads it, which it came to its parent from (re-parented to a child subreaper):
  the sibling's restorer, or the zombie-to-be itself, forks with CLONE_PARENT;
- from a "session helper", when the session's leader is gone (a PID nobody has: the
  classic double fork of a daemon under a subreaper): a helper with exactly that PID,
  a child of the parent, calls setsid and forks the members with CLONE_PARENT.

Every door has the parent's built address space (copy-on-write pages stay shared,
restore/cow.py) and the members' exit signal (CLONE_PARENT takes the caller's).

Groups, once every process exists (restore/tree.py `_process_groups`): a process
that leads a group it is not in makes its group first; then every process joins its
group (the makers last, each after those that join its group), a group whose leader
is gone through a "group helper" with that PID that makes the group and goes. The
helpers are killed and reaped by their parents (the exit signal taken back) before
anything of the tree runs.

Outside the dump: the root's session when the root does not lead one (or the job's,
--shell-job) is the restoring ckpt's, and the one group of that session led from
outside is ckpt's group (the root's job group with --shell-job) — as fds 0-2 that
led outside get ckpt's. Refused at the dump (`plan(alive=...)`), in one line: a
session or group led by a live process outside the dump other than those, two
groups led from outside, and the shapes no birth order makes (see `plan`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import RestoreError
from ..kernel import abi, procfs, syscalls
from ..kernel.ptrace import PTRACE_O_EXITKILL, PTRACE_O_TRACESYSGOOD, Tracee
from ..kernel.remote import Injector, RemoteError
from ..model import ProcessImage
from . import zombies
from .rebuild import Rebuilder, clone_traced

PARENT, OLD, DOOR, HELPER = "parent", "old", "door", "helper"


@dataclass(frozen=True)
class Link:
    """One process's place: what plan() reads (capture: /proc/PID/stat; restore: the image)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    exit_signal: int = abi.SIGCHLD
    shares_table: bool = False  # forked with CLONE_FILES (its parent's fd table)
    zombie: bool = False
    comm: str = ""


class ShapeError(Exception):
    """Sessions or groups no birth order makes again: one line, naming the process."""

    def __init__(self, message: str, pid: int):
        super().__init__(message)
        self.pid = pid


@dataclass
class Plan:
    #: the root's session when it is led from outside the dump (or --shell-job): ckpt's.
    #: None when the root leads its own; 0 is a session (the kernel's: a service
    #: manager's or CI runner's children that never called setsid are in it)
    outside_session: int | None = None
    #: the one group of that session led from outside: ckpt's (the job's)
    outside_group: int | None = None
    #: pid → (how, whose): PARENT (its parent), OLD (parent's old-session door), DOOR
    #: (the session door of the sibling that leads its session), HELPER (session id)
    forker: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: session leaders whose setsid waits for their old-session door (after memory)
    deferred: set[int] = field(default_factory=set)
    #: parent → exit signal of its old-session door
    old_doors: dict[int, int] = field(default_factory=dict)
    #: session leaders (members or zombies) that fork siblings into their session
    session_doors: set[int] = field(default_factory=set)
    #: session id whose leader is gone → (the parent that forks its helper, exit signal)
    session_helpers: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: group id whose leader is gone → the process that forks its helper
    group_helpers: dict[int, int] = field(default_factory=dict)
    #: processes that make a group they are not in, in the order they leave it
    group_makers: list[int] = field(default_factory=list)

    def helper_ids(self) -> list[int]:
        """The PIDs helpers take (without --new-pid): they must be free."""
        return sorted({*self.session_helpers, *self.group_helpers})


def _name(p: Link) -> str:
    return f"process {p.pid}" + (f" ({p.comm})" if p.comm else "")


def plan(
    links: list[Link], *, shell_job: bool = False, alive: Callable[[int], bool] | None = None
) -> Plan:
    """How each process of the tree (links[0] the root, parents before children, then
    the zombies) is born into its session and put in its group; ShapeError when no
    order does it. alive(id): at the dump, whether a process with that PID runs (a
    session or group of a live process outside the dump is refused); at the restore
    None: an id of nobody in the image is one whose leader was gone."""
    root = links[0]
    by = {p.pid: p for p in links}
    slot = {p.pid: i for i, p in enumerate(links) if not p.zombie}
    out = Plan()
    if root.sid != root.pid or shell_job:
        out.outside_session = root.sid
    for p in links:
        if p.sid == p.pid and p.pgid != p.pid:
            raise ShapeError(f"{_name(p)} leads session {p.sid} but is in group {p.pgid}", p.pid)
    for p in links[1:]:
        _session(p, by, slot, root, out, alive)
    for q in out.deferred & out.session_doors:
        raise ShapeError(
            f"{_name(by[q])} made its session after forking a child that stays in its old "
            "session, and a sibling of it came into its new session from elsewhere: no "
            "order of births makes both",
            q,
        )
    _groups(links, by, out, alive)
    return out


def _born_in(q: Link, by: dict[int, Link], root: Link, out: Plan) -> int | None:
    """The session q is born into at restore (its parent's, made by then); None: unknown
    (the root's, when the root leads a session of its own: its old one was outside)."""
    if q is root:
        return out.outside_session
    return by[q.ppid].sid


def _session(p, by, slot, root, out: Plan, alive) -> None:
    s = p.sid
    q = by.get(p.ppid)
    if q is None or q.zombie:
        raise ShapeError(
            f"{_name(p)}: its parent {p.ppid} is not a live process of the tree", p.pid
        )
    if s == p.pid or s == q.sid:
        out.forker[p.pid] = (PARENT, q.pid)
        return
    if q.sid == q.pid and s == _born_in(q, by, root, out):
        # q made its session after forking p: p is born from a door q forks before
        have = out.old_doors.setdefault(q.pid, p.exit_signal)
        if have != p.exit_signal or p.shares_table:
            raise ShapeError(
                f"{_name(p)} stayed in its parent's old session, as did a sibling, with "
                "another exit signal or sharing the parent's fd table: ckpt forks them from "
                "one stand-in of that session",
                p.pid,
            )
        out.deferred.add(q.pid)
        out.forker[p.pid] = (OLD, q.pid)
        return
    lead = by.get(s)
    if lead is not None and lead.sid == s and lead.ppid == q.pid:
        # p came to its parent from the session of a sibling that leads it
        why = ""
        if p.exit_signal != lead.exit_signal:
            why = f"another exit signal than {lead.pid}'s"
        elif p.shares_table:
            why = "its parent's fd table"
        elif not lead.zombie and not p.zombie and slot[lead.pid] > slot[p.pid]:
            why = f"a PID below {lead.pid}'s (it is forked before it)"
        if why:
            raise ShapeError(
                f"{_name(p)} is in the session of its sibling {lead.pid}, which forks it "
                f"(CLONE_PARENT) at restore, but it has {why}",
                p.pid,
            )
        out.session_doors.add(s)
        out.forker[p.pid] = (DOOR, s)
        return
    if lead is not None or s == out.outside_session or (alive is not None and alive(s)):
        where = (
            "a session led from outside the dump" if lead is None else f"the session of process {s}"
        )
        raise ShapeError(
            f"{_name(p)} is in {where} (session {s}), which its parent, process {q.pid}, is "
            "not in: it came to its parent from elsewhere (re-parented), and a session is "
            "entered only by birth, so ckpt cannot make it a member again; dump the tree "
            f"of a process that holds the session (its leader {s})",
            p.pid,
        )
    have = out.session_helpers.setdefault(s, (q.pid, p.exit_signal))
    if have != (q.pid, p.exit_signal):
        raise ShapeError(
            f"{_name(p)} is in session {s}, whose leader is gone, as is a process with "
            f"another parent ({have[0]}) or exit signal: ckpt makes that session again in "
            "one helper process with its PID, a child of one parent",
            p.pid,
        )
    out.forker[p.pid] = (HELPER, s)


def _groups(links: list[Link], by: dict[int, Link], out: Plan, alive) -> None:
    outside: dict[int, Link] = {}
    makers: set[int] = set()
    for p in links:
        g = p.pgid
        if g == p.pid:
            continue
        lead = by.get(g)
        if lead is not None:
            if lead.sid != p.sid:
                raise ShapeError(
                    f"{_name(p)} is in group {g}, of another session ({lead.sid}, not {p.sid})",
                    p.pid,
                )
            if lead.pgid != g:
                makers.add(g)
            continue
        if out.outside_session is not None and p.sid == out.outside_session:
            outside.setdefault(g, p)
            if len(outside) > 1:
                a, b = outside.values()
                raise ShapeError(
                    f"{_name(a)} and {_name(b)} are in two process groups ({a.pgid} and "
                    f"{b.pgid}) led from outside the dump, in the session the root came "
                    "from: restored, the tree is in ckpt's session, and only one group of "
                    "it (ckpt's, or the job's with --shell-job) stands for those",
                    b.pid,
                )
            continue
        if alive is not None and alive(g):
            raise ShapeError(
                f"{_name(p)} is in process group {g}, led by process {g} outside the dump "
                f"(in session {p.sid}, made inside it): restored, the group would be "
                "without its leader; dump the tree of a process that holds them both",
                p.pid,
            )
        if g in out.session_helpers:
            continue  # the session helper's setsid makes the group too
        first = out.group_helpers.get(g)
        if first is None or (by[first].zombie and not p.zombie):
            out.group_helpers[g] = p.pid  # a live member forks its helper if it can
    out.outside_group = next(iter(outside), None)
    # a maker leaves its group after those that join it (a group lives while it has a
    # member): each maker after every maker whose final group is its own
    order: list[int] = []
    state: dict[int, int] = {}

    def visit(m: int) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise ShapeError(f"{_name(by[m])}: its group and another's hold each other", m)
        state[m] = 1
        for j in sorted(makers):
            if by[j].pgid == m:
                visit(j)
        state[m] = 2
        order.append(m)

    for m in sorted(makers):
        visit(m)
    out.group_makers = order


def links_of(root: ProcessImage, *, shared_tables: bool = True) -> list[Link]:
    """The image's processes as plan() reads them: members, then zombies."""
    out = []
    for p in [root, *root.tree]:
        sig = p.attrs.exit_signal if p.attrs is not None else abi.SIGCHLD
        out.append(Link(p.pid, p.ppid, p.pgid, p.sid, sig, shared_tables and p.files_of >= 0,
                        False, p.comm.decode(errors="replace")))  # fmt: skip
    for z in root.zombies:
        out.append(Link(z.pid, z.ppid, z.pgid, z.sid, z.exit_signal, False, True,
                        z.comm.decode(errors="replace")))  # fmt: skip
    return out


def check(root: ProcessImage, shell_job: bool) -> Plan:
    """At restore, before anything is built (an image from before the dump's check)."""
    try:
        return plan(links_of(root), shell_job=shell_job)
    except ShapeError as exc:
        raise RestoreError(f"the tree's sessions cannot be made again: {exc}") from exc


# ---------------------------------------------------------------- the restore


@dataclass
class Helper:
    """A stopped copy of a restorer that lives only while the tree is built: a door
    (forks members as its parent's children) or a helper with a gone leader's PID."""

    what: str
    tracee: Tracee
    inj: Injector
    mem_fd: int
    reaper: Injector  # its parent's: reaps it
    exit_signal: int  # what its exit sends the parent (taken back)

    @property
    def pid(self) -> int:
        return self.tracee.pid

    def fork_child(self, want: int | None, exit_signal: int, flags: int = 0) -> Tracee:
        """A child of this helper's parent (CLONE_PARENT), with this helper's session."""
        return _fork_sibling(self.tracee, self.inj, want, exit_signal, flags, self.exit_signal)


@dataclass
class _ZombieDoor:
    """A zombie-to-be that leads a session forks its siblings into it."""

    made: zombies.Made

    def fork_child(self, want: int | None, exit_signal: int, flags: int = 0) -> Tracee:
        m = self.made
        return _fork_sibling(m.tracee, m.inj, want, exit_signal, flags, m.image.exit_signal)


def _fork_sibling(tracee, inj, want, exit_signal: int, flags: int, own: int) -> Tracee:
    if exit_signal != own:  # CLONE_PARENT: the child takes the caller's (plan() checks)
        raise RestoreError(f"a member would get exit signal {own}, not {exit_signal}")
    return clone_traced(tracee, inj, want, 0, flags | abi.CLONE_PARENT)


class Sessions:
    """restore/tree.py's build, step by step: born(rb) once a member is forked, built(rb)
    once its memory is in, groups() after the last member (before the fds: no stand-in
    ever holds a restored file)."""

    def __init__(self, plan_: Plan, root: ProcessImage, new_pid: bool):
        self.plan = plan_
        self.new_pid = new_pid
        self.rbs: dict[int, Rebuilder] = {}  # image PID → restorer
        self.made: dict[int, zombies.Made] = {}
        self.doors: dict[tuple[str, int], object] = {}
        self.helpers: list[Helper] = []
        self.ids: dict[int, int] = {}  # a gone leader's id → its helper's PID now
        self.zombies = list(root.zombies)

    def forker(self, pid: int, parent: Rebuilder):
        how, who = self.plan.forker.get(pid, (PARENT, 0))
        return parent if how == PARENT else self.doors[(how, who)]

    def _late(self, z) -> bool:
        """Forked once its parent's memory is in (the rest before, as ever)."""
        how, _ = self.plan.forker.get(z.pid, (PARENT, 0))
        return z.ppid in self.plan.deferred or z.pid in self.plan.session_doors or how != PARENT

    def _fork_zombie(self, z) -> zombies.Made:
        parent = self.rbs[z.ppid]
        how, who = self.plan.forker.get(z.pid, (PARENT, 0))
        fk = None if how == PARENT else self.doors[(how, who)]
        m = zombies.fork(parent, z, self.new_pid, fk)
        self.made[z.pid] = m
        if z.pid in self.plan.session_doors:
            self.doors[(DOOR, z.pid)] = _ZombieDoor(m)
        return m

    def born(self, rb: Rebuilder) -> list[zombies.Made]:
        """rb was just forked: its session (unless put off), its door for siblings into
        it, and the zombies forked before its memory. Returns the zombies made."""
        p = rb.proc
        self.rbs[p.pid] = rb
        if p.pid not in self.plan.deferred:
            rb.early_session()
        out = []
        if p.pid in self.plan.session_doors:  # before its memory: its parent's, built
            parent = self.rbs[p.ppid]
            sig = p.attrs.exit_signal if p.attrs is not None else abi.SIGCHLD
            tr = rb.fork_child(None, 0, abi.CLONE_PARENT)
            self.doors[(DOOR, p.pid)] = self._helper(f"door of session {p.pid}", tr, rb.inj,
                                                     parent.inj, sig)  # fmt: skip
            out += [
                self._fork_zombie(z)
                for z in self.zombies
                if self.plan.forker.get(z.pid) == (DOOR, p.pid)
            ]
        out += [self._fork_zombie(z) for z in self.zombies if z.ppid == p.pid and not self._late(z)]
        return out

    def built(self, rb: Rebuilder) -> list[zombies.Made]:
        """rb's memory is in: its old-session door and setsid if put off, the helpers of
        gone sessions it is the parent in, its remaining zombies (session leaders first)."""
        p = rb.proc
        if p.pid in self.plan.deferred:
            tr = rb.fork_child(None, self.plan.old_doors[p.pid], abi.CLONE_FILES)
            self.doors[(OLD, p.pid)] = self._helper(f"old session of {p.pid}", tr, rb.inj,
                                                    rb.inj, self.plan.old_doors[p.pid])  # fmt: skip
            rb.early_session()
        for s, (q, sig) in self.plan.session_helpers.items():
            if q != p.pid:
                continue
            tr = rb.fork_child(None if self.new_pid else s, sig, abi.CLONE_FILES)
            h = self._helper(f"session {s}", tr, rb.inj, rb.inj, sig)
            h.inj.reset_data()
            syscalls.setsid(h.inj)
            self.ids[s] = h.pid
            self.doors[(HELPER, s)] = h
        zpids = {z.pid for z in self.zombies}
        late = [
            z
            for z in self.zombies
            if z.ppid == p.pid
            and self._late(z)
            # one in a live sibling's session: forked from its door, at its birth
            and not (self.plan.forker.get(z.pid, (PARENT, 0))[0] == DOOR and z.sid not in zpids)
        ]
        late.sort(key=lambda z: z.pid not in self.plan.session_doors)  # doors first
        return [self._fork_zombie(z) for z in late]

    def groups(self, rbs: list[Rebuilder], made: list[zombies.Made]) -> None:
        """After the last member: a helper for each group whose leader is gone, every
        group made and joined, then the helpers go."""
        self.helpers_for_groups()
        self.make_groups(rbs, made, rbs[0] if rbs[0].ctx.shell_job else None)
        self.release()

    def helpers_for_groups(self) -> None:
        """After the last member: a helper for each group whose leader is gone, forked
        from one of its members (in its session), that makes the group."""
        for g, pid in self.plan.group_helpers.items():
            owner = self.rbs.get(pid) or self.made[pid]
            if isinstance(owner, Rebuilder):
                tr = owner.fork_child(None if self.new_pid else g, abi.SIGCHLD)
            else:
                tr = clone_traced(owner.tracee, owner.inj, None if self.new_pid else g,
                                  abi.SIGCHLD, 0)  # fmt: skip
            h = self._helper(f"group {g}", tr, owner.inj, owner.inj, abi.SIGCHLD)
            h.inj.reset_data()
            syscalls.setpgid(h.inj, 0, 0)
            self.ids[g] = h.pid

    def _helper(self, what: str, tr: Tracee, forker: Injector, reaper: Injector, sig: int):
        mem_fd = -1
        try:
            tr.set_options(PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL)
            mem_fd = procfs.open_file(tr.pid, "mem", os.O_RDWR)
            inj = Injector(tr, tr.getregs(), mem_fd)
            inj.scratch = forker.scratch  # inherited at the same address
            inj.use(forker.scratch.addr)
        except BaseException:
            _kill(tr)
            if mem_fd >= 0:
                os.close(mem_fd)
            raise
        h = Helper(what, tr, inj, mem_fd, reaper, sig)
        self.helpers.append(h)
        return h

    def make_groups(self, rbs: list[Rebuilder], made: list[zombies.Made], job) -> None:
        """Every member and zombie in its group: the leaders make theirs (the root of a
        --shell-job restore, `job`, the job's, in ckpt's session), so do the makers,
        then everyone joins (the makers last). restore_process_misc's setpgid(0, 0)
        finds them made."""
        restored = {rb.proc.pid: rb.pid for rb in rbs} | {m.image.pid: m.pid for m in made}
        restored.update(self.ids)
        outside = job.pid if job is not None else os.getpgrp()
        handles = {rb.proc.pid: (rb.proc, rb.pid, rb.inj) for rb in rbs if rb is not job}
        handles.update((m.image.pid, (m.image, m.pid, m.inj)) for m in made)
        makers = self.plan.group_makers
        leads = [(job.proc, job.pid, job.inj)] if job is not None else []
        leads += [h for p, h in handles.items() if h[0].pgid == p and h[0].sid != p]
        leads += [handles[p] for p in makers]
        for _, now, inj in leads:
            if os.getpgid(now) != now:
                inj.reset_data()
                syscalls.setpgid(inj, 0, 0)
        order = [p for p in handles if p not in makers] + makers
        for pid in order:
            p, now, inj = handles[pid]
            if p.pgid == p.pid or p.sid == p.pid:
                continue
            want = restored.get(p.pgid)
            if want is None:  # the group led from outside the dump: ckpt's, the job's
                if p.sid != self.plan.outside_session:
                    raise RestoreError(f"process {p.pid}: its group {p.pgid} was not made")
                want = outside
            if os.getpgid(now) != want:
                inj.reset_data()
                syscalls.setpgid(inj, 0, want)

    def release(self) -> None:
        """The helpers go (their groups and sessions have members now), reaped by their
        parents, whose exit signal is taken back: nothing of it reaches the tree."""
        while self.helpers:
            h = self.helpers.pop()
            _kill(h.tracee)
            if h.mem_fd >= 0:
                os.close(h.mem_fd)
                h.mem_fd = -1
            _reap(h)

    def kill_all(self) -> None:
        """A failed restore: the helpers go with the rest."""
        for h in self.helpers:
            _kill(h.tracee)
            if h.mem_fd >= 0:
                os.close(h.mem_fd)
                h.mem_fd = -1
        self.helpers.clear()


def _kill(tr: Tracee) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(tr.pid, signal.SIGKILL)
    while tr.attached:  # ckpt, its tracer, collects the exit first; then its parent may
        try:
            st = tr.wait()
        except OSError:
            tr.attached = False
            break
        if os.WIFEXITED(st) or os.WIFSIGNALED(st):
            tr.attached = False


def _reap(h: Helper) -> None:
    r = h.reaper
    r.reset_data()
    info = r.alloc(128)
    try:
        syscalls.waitid(r, abi.P_PID, h.pid, info, abi.WEXITED | abi.WNOHANG | abi.WALL, 0)
    except RemoteError as exc:
        if exc.errno != 10:  # ECHILD: reaped already (the parent ignores SIGCHLD)
            raise
        return
    si_pid = struct.unpack_from("<i", r.read(info + 16, 4))[0]
    if si_pid != h.pid:
        raise RestoreError(f"the {h.what} helper ({h.pid}) did not go away")
    if h.exit_signal:
        ts = r.put(bytes(16))
        sigset = r.put(struct.pack("<Q", 1 << (h.exit_signal - 1)))
        try:
            syscalls.rt_sigtimedwait(r, sigset, 0, ts, 8)
        except RemoteError as exc:
            if exc.errno != 11:  # EAGAIN: not queued (ignored)
                raise
