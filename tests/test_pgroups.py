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


def kept(w) -> dict[str, tuple[int, int, int, int]]:
    """READY's name=pid/ppid/pgid/sid of every kept process (zombies too)."""
    out = {}
    for key, value in w.ready.items():
        if key not in ("pid", "kept"):
            pid, ppid, pgid, sid = (int(x) for x in value.split("/"))
            out[key] = (pid, ppid, pgid, sid)
    assert len(out) == int(w.ready["kept"])
    return out


def reap_gone(pids: list[int], timeout: float = 30) -> None:
    """Killed members (and their zombies) are re-parented to us (the tests' subreaper):
    reap them so their PIDs, and the group and session ids they hold, are free."""
    end = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            assert time.monotonic() < end, f"process {pid} did not go away after the dump"
            time.sleep(0.01)


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
    reap_gone([p[0] for p in procs.values()])
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
    reap_gone([p[0] for p in procs.values()])
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
