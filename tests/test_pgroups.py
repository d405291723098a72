"""Process groups and sessions of a dumped tree (issue 14: `setpgid` failing at restore
for a session with process groups). They come back exactly, in the shapes real
programs make, or the dump refuses them in one line before anything else.

The workload (tests/workloads/pgroups.c) records, before READY, every kept process's
PID, parent, group and session; after the restore each live process checks, for
itself and all its relatives, that one bijection maps every recorded id to the id
it sees now, the identity unless the PIDs changed (--new-pid): a group whose leader
exited is the same group again, with its old id. READY lists them as
name=pid/ppid/pgid/sid, which the tests compare from outside too.
"""

from __future__ import annotations

import os
import time

import pytest
from helpers import assert_error, proc_status, wait_until
from test_tree import reap_orphans


def kept(w) -> dict[str, tuple[int, int, int, int]]:
    """READY's name=pid/ppid/pgid/sid of every kept process (zombies too)."""
    out = {}
    for key, value in w.ready.items():
        if key not in ("pid", "kept"):
            pid, ppid, pgid, sid = (int(x) for x in value.split("/"))
            out[key] = (pid, ppid, pgid, sid)
    assert len(out) == int(w.ready["kept"])
    return out


def ids(pid: int) -> tuple[int, int, int]:
    st = proc_status(pid)
    assert st is not None, pid
    return int(st["PPid"]), os.getpgid(pid), os.getsid(pid)


def assert_same_ids(procs: dict[str, tuple[int, int, int, int]], root: int) -> None:
    """As the kernel sees it from outside: every kept process has its parent, group and
    session again (the root's parent is ckpt now)."""
    for name, (pid, ppid, pgid, sid) in procs.items():
        now = ids(pid)
        want = (now[0] if pid == root else ppid, pgid, sid)
        assert now == want, f"{name} ({pid}): parent/group/session {now}, want {want}"


def round_trip(e2e, mode: str, *extra: str):
    w = e2e.spawn("pgroups", mode)
    procs = kept(w)
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    reap_orphans([p[0] for p in procs.values()])
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    for pid, *_ in procs.values():
        e2e.adopt(pid)
    wait_until(lambda: all(ids(p[0]) for p in procs.values()), 30, "the tree")
    for name, (pid, *_) in procs.items():
        if name != "root":
            wait_until(lambda pid=pid: (proc_status(pid) or {}).get("TracerPid") == "0", 30,
                       f"{name} to run untraced")  # fmt: skip
    assert_same_ids(procs, w.pid)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert v.fields["newpid"] == "0"
    assert bg.wait(60).returncode == 0
    return w, procs, bg


def test_daemon_groups(e2e):
    """A daemon's workers make groups of their own; a sibling joins a sibling's group,
    a cousin a cousin's, a grandchild the root's."""
    round_trip(e2e, "daemon")


def test_job_control_shell(e2e):
    """A job-control shell's pipelines: one whose leader exited and was reaped (its group
    id is a PID nobody has: a helper process with that PID makes the group again, the
    members join, the helper goes), one led by a zombie, one alive, and a group whose
    leader moved to another group."""
    round_trip(e2e, "jobs")


def test_sessions_of_gone_and_zombie_leaders(e2e):
    """Under a subreaper root: children in a session whose leader exited (made again by
    a helper with its PID, the members forked from it as the root's children), in a
    zombie's session, in a live sibling's session, and a child left in the session its
    parent had before its setsid."""
    round_trip(e2e, "session")


def test_sessions_iterative(e2e):
    round_trip(e2e, "session", "--iterative", "--max-rounds", "3")


def find_copy(e2e, w, bg, timeout: float = 60) -> int:
    """The restored root (--new-pid): ckpt's child, running w's program, untraced."""
    end = time.monotonic() + timeout
    while True:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            st = proc_status(int(entry)) or {}
            if (
                st.get("PPid") == str(bg.pid)
                and st.get("TracerPid") == "0"
                and w.ident.matches(int(entry))
            ):
                e2e.adopt(int(entry))
                return int(entry)
        assert bg.poll() is None, f"ckpt exited before the copy came back:\n{bg.result()}"
        assert time.monotonic() < end, "no restored copy"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["jobs", "session"])
def test_new_pid_beside_the_original(e2e, mode):
    """--new-pid while the original runs on: every group and session id, those of gone
    leaders too, maps to a new one (the old ids are all still in use)."""
    w = e2e.spawn("pgroups", mode)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    copy = find_copy(e2e, w, bg)
    v = e2e.verify(w, copy)
    assert v.ok, f"the copy failed its own checks: {v.line}"
    assert v.fields["newpid"] == "1"
    assert bg.wait(60).returncode == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke: {v0.line}"
    assert v0.fields["newpid"] == "0"


def test_outside_session_and_group_are_ckpts(e2e):
    """A root in a session and group led from outside the dump (no --shell-job): the
    restored tree is in the restoring ckpt's session, and what was in that outside
    group is in ckpt's group; the groups and the session made inside are exact."""
    w = e2e.spawn("pgroups", "outside")
    procs = kept(w)
    launcher = w.popen.pid
    assert procs["root"][2:] == (launcher, launcher)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert res.returncode == 0, str(res)
    reap_orphans([p[0] for p in procs.values()])
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    for pid, *_ in procs.values():
        e2e.adopt(pid)
    ckpt_group, ckpt_session = os.getpgid(bg.pid), os.getsid(bg.pid)
    for name, (pid, _, pgid, sid) in procs.items():
        want_pgid = ckpt_group if pgid == launcher else pgid
        want_sid = ckpt_session if sid == launcher else sid
        assert ids(pid)[1:] == (want_pgid, want_sid), name
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("outside2", ["process group", "outside the dump"]),
        ("outlead", ["process group", "outside the dump"]),
    ],
)
def test_refused_at_the_dump(e2e, mode, needles):
    """Shapes that cannot come back exactly are refused by the dump's first look, in
    one line, and the tree runs on."""
    w = e2e.spawn("pgroups", mode)
    procs = kept(w)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--iterative")
    assert_error(res, 5, *needles)
    assert "round" not in res.stderr.lower(), res.stderr
    for name, (pid, *_) in procs.items():
        assert (proc_status(pid) or {}).get("TracerPid") == "0", name
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line


# ---------------------------------------------------------------- the plan, unit


def link(pid, ppid, pgid, sid, sig=17, zombie=False, shares=False):
    """A process as plan() reads it (shares: forked with CLONE_FILES)."""
    from ckpt.restore.sessions import Link

    return Link(pid, ppid, pgid, sid, sig, shares, zombie)


def test_plan_births_and_groups():
    """How each shape is born: a double-forked daemon (gone leader 50: a helper with
    its PID, the root its parent), a child kept in its parent's old session, siblings in
    a live sibling's and in a zombie's session, a pipeline whose leader is gone, a
    leader that moved to another group, and the root's outside group."""
    from ckpt.restore.sessions import DOOR, HELPER, OLD, PARENT, plan

    links = [
        link(10, 1, 10, 10),  # root, a session leader
        link(51, 10, 50, 50),  # daemon: session and group of the gone 50
        link(52, 10, 52, 50),  # its sibling, a group of its own in that session
        link(60, 10, 60, 60),  # p: setsid after forking 61
        link(70, 10, 70, 70),  # l: a session leader; 72 came from its session
        link(72, 10, 70, 70),
        link(80, 10, 81, 10),  # a pipeline whose leader 81 is gone
        link(82, 10, 81, 10),
        link(90, 10, 83, 10),  # m: made group 90, moved to 83's
        link(83, 10, 83, 10),
        link(61, 60, 10, 10),  # left in p's old session (the root's)
        link(91, 90, 90, 10),  # in m's group
        link(40, 10, 40, 40, zombie=True),  # a zombie session leader...
        link(41, 10, 40, 40, zombie=True),  # ...and a zombie that came from its session
    ]
    p = plan(links)
    assert p.forker[51] == p.forker[52] == (HELPER, 50)
    assert p.session_helpers == {50: (10, 17)}
    assert p.forker[61] == (OLD, 60) and p.deferred == {60} and p.old_doors == {60: 17}
    assert p.forker[72] == (DOOR, 70) and p.forker[41] == (DOOR, 40)
    assert p.session_doors == {70, 40}
    assert p.forker[60] == p.forker[80] == (PARENT, 10)
    assert p.group_helpers == {81: 80}  # group 50: the session helper's setsid makes it
    assert p.group_makers == [90]
    assert p.helper_ids() == [50, 81]
    assert p.outside_session is None and p.outside_group is None


def test_plan_outside():
    """The root's session and its one group led from outside are ckpt's; --shell-job
    makes the root's own session ckpt's."""
    from ckpt.restore.sessions import plan

    p = plan([link(10, 1, 5, 5), link(11, 10, 5, 5), link(12, 10, 12, 5)])
    assert (p.outside_session, p.outside_group) == (5, 5)
    assert not p.group_helpers
    p = plan([link(10, 1, 10, 10), link(11, 10, 3, 10)], shell_job=True)
    assert (p.outside_session, p.outside_group) == (10, 3)
    # session 0, the kernel's (a CI runner's or service manager's children that never
    # called setsid), led from outside like any other: its group, live, is ckpt's
    p = plan([link(10, 1, 7, 0), link(11, 10, 7, 0)], alive=lambda pid: pid == 7)
    assert (p.outside_session, p.outside_group) == (0, 7)
    assert not p.group_helpers and not p.session_helpers


@pytest.mark.parametrize(
    ("links", "alive", "needle"),
    [
        # two groups of the root's outside session
        ([link(10, 1, 5, 5), link(11, 10, 6, 5)], None, "two process groups"),
        # a group led by a live process outside, in a session made inside
        ([link(10, 1, 10, 10), link(11, 10, 99, 10)], {99}, "led by process 99 outside the dump"),
        # a session led by a live process outside that is not the root's
        ([link(10, 1, 10, 10), link(11, 10, 11, 99)], {99}, "session led from outside the dump"),
        # a gone leader's session entered from two parents
        (
            [link(10, 1, 10, 10), link(11, 10, 11, 11), link(12, 10, 50, 50), link(13, 11, 50, 50)],
            None,
            "another parent",
        ),
        # a sibling's session entered with another exit signal
        (
            [link(10, 1, 10, 10), link(11, 10, 11, 11), link(12, 10, 11, 11, sig=10)],
            None,
            "exit signal",
        ),
        # ... or from a PID forked before the sibling's
        ([link(10, 1, 10, 10), link(12, 10, 11, 11), link(11, 10, 11, 11)], None, "forked before"),
        # a grandchild in a session its parent was never in, led by an uncle
        (
            [link(10, 1, 10, 10), link(11, 10, 11, 11), link(12, 10, 12, 10), link(13, 12, 11, 11)],
            None,
            "came to its parent from elsewhere",
        ),
        # a leader that kept a child in its old session, and a sibling came into its new
        (
            [link(10, 1, 10, 10), link(11, 10, 11, 11), link(12, 11, 10, 10), link(13, 10, 11, 11)],
            None,
            "no order of births",
        ),
    ],
)
def test_plan_refusals(links, alive, needle):
    from ckpt.restore.sessions import ShapeError, plan

    with pytest.raises(ShapeError, match=needle):
        plan(links, alive=(lambda pid: pid in alive) if alive is not None else None)
