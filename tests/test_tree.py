"""Process trees (issue "Real programs"): `ckpt dump PID` takes the process and its
descendants, with their parent/child links, process groups and sessions, the
memory they share and the open files they share; restore rebuilds the tree with
the same PIDs. The workload (tests/workloads/tree.c) checks all of it from
inside every member after the restore.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (
    RoundHook,
    assert_error,
    assert_no_process,
    dir_digest,
    image_complete,
    proc_state,
    proc_status,
    wait_until,
)

from ckpt.image import ImageReader
from ckpt.kernel.spawn import spawn_restorer


def reap_orphans(pids: list[int], timeout: float = 30) -> None:
    """Killed members are re-parented to us (the tests' subreaper): reap them so
    their PIDs are free for the restore."""
    end = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"tree member {pid} did not go away after the dump")
            time.sleep(0.01)


def restore_tree(e2e, w, kids: list[int], *source: str):
    """Reap the killed members, restore (source: "-D", IMAGE or "--store", STORE) and
    wait until the root is back; the members are tracked for cleanup."""
    reap_orphans(kids)
    bg = e2e.ckpt_bg("restore", *source)
    e2e.wait_restored(w.pid, w.ident, bg)
    for pid in kids:
        e2e.adopt(pid)
    return bg


def wait_untraced(pids: list[int], what: str = "run untraced") -> None:
    for pid in pids:
        wait_until(lambda pid=pid: (proc_status(pid) or {}).get("TracerPid") == "0", 30,
                   f"member {pid} to {what}")  # fmt: skip


def members(w) -> list[int]:
    return [int(w.ready[k]) for k in ("a", "a1", "b")]


def tree_round_trip(e2e, w, *extra):
    kids = members(w)
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    bg = restore_tree(e2e, w, kids, "-D", str(image))
    wait_untraced(kids, "run")
    # parent links, as the kernel sees them
    assert int(proc_status(kids[0])["PPid"]) == w.pid
    assert int(proc_status(kids[1])["PPid"]) == kids[0]
    assert int(proc_status(kids[2])["PPid"]) == w.pid
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert v.fields["offset"] == "16"
    assert bg.wait(60).returncode == 0


def test_tree_round_trip(e2e):
    w = e2e.spawn("tree")
    tree_round_trip(e2e, w)


def test_tree_iterative(e2e):
    w = e2e.spawn("tree")
    tree_round_trip(e2e, w, "--iterative", "--max-rounds", "3")


def test_tree_leave_running_then_restore_elsewhere(e2e):
    """--leave-running keeps the whole tree working; the image restores later."""
    w = e2e.spawn("tree")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_untraced([w.pid, *members(w)])
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert w.reap() == 0
    bg = restore_tree(e2e, w, members(w), "-D", str(image))
    # same PID, same log: wait for the restored root's own (second) VERIFY line
    os.kill(w.pid, signal.SIGUSR2)
    wait_until(lambda: len(w.find("VERIFY", w.pid)) >= 2, 60, "the restored tree to verify")
    words, fields = w.find("VERIFY", w.pid)[-1]
    assert words[1] == "OK", fields
    assert bg.wait(60).returncode == 0


def test_no_tree_refuses_shared_children_cleanly(e2e):
    """--no-tree dumps the root alone; the children are left running untouched."""
    w = e2e.spawn("tree")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running", "--no-tree")
    assert res.returncode == 0, str(res)
    out = e2e.ckpt("show", str(image), "--json")
    assert out.returncode == 0, str(out)
    for pid in members(w):
        assert (proc_status(pid) or {}).get("TracerPid") == "0"
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


ZOMBIES = ("zexit", "zsig", "zlead", "za")  # tree.c's zombies at READY (zlate runs)


def zombies_of(w) -> list[int]:
    return [int(w.ready[k]) for k in ZOMBIES]


def core_dump_possible() -> bool:
    """ckpt restores a zombie that dumped core by dumping one (restore/zombies.py): only
    with a core_pattern that is a plain file name and a hard RLIMIT_CORE above 1 MiB."""
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            pattern = f.read().strip()
    except OSError:
        return False
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    return (
        bool(pattern)
        and pattern[0] not in "|@"
        and "/" not in pattern
        and (hard == resource.RLIM_INFINITY or hard >= 1 << 20)
    )


def image_zombies(e2e, source: str) -> dict[int, tuple[int, int]]:
    """{pid: (parent, wait status)} of the zombies an image holds (`ckpt show --json`)."""
    res = e2e.ckpt("show", source, "--json")
    assert res.returncode == 0, str(res)
    zombies = json.loads(res.stdout)["process"]["zombies"]
    return {z["pid"]: (z["ppid"], z["status"]) for z in zombies}


def assert_zombies_back(w, want: dict[int, tuple[int, int]]) -> None:
    """Each zombie is one again, at its PID, child of its parent; zlead leads its group
    and a is in it."""
    for pid, (ppid, _) in want.items():
        st = proc_status(pid) or {}
        assert st.get("State", "")[:1] == "Z", (pid, st.get("State"))
        assert int(st["PPid"]) == ppid, (pid, st["PPid"], ppid)
    zlead, a = int(w.ready["zlead"]), int(w.ready["a"])
    assert os.getpgid(zlead) == zlead
    assert os.getpgid(a) == zlead


@pytest.mark.parametrize("core", [False, True], ids=["exit-and-signals", "core-dumped"])
def test_zombies_restored(e2e, core):
    """A tree holding zombies: the root's (exit 42, killed by SIGTERM, a process group
    leader that a member's group still is) and a's (killed by SIGUSR1, or by SIGABRT
    with a core dump). They come back as zombies at their PIDs; after the restore their
    parents reap them and find the exact status (WIFEXITED/WEXITSTATUS, WIFSIGNALED/
    WTERMSIG/WCOREDUMP: tree.c checks)."""
    if core and not core_dump_possible():
        pytest.skip("core_pattern is not a plain file name (or RLIMIT_CORE is too low)")
    w = e2e.spawn("tree", "zombie", *(["core"] if core else []))
    zs = zombies_of(w)
    kids = [*members(w), int(w.ready["zlate"])]
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    with ImageReader(str(image)) as r:
        # a 4.x reader would drop the zombies: it must refuse (6.0: the members' memfd is
        # the description they inherited, which a 5.x reader would reopen)
        assert r.version == (6, 0)
    want = image_zombies(e2e, str(image))
    zexit, zsig, zlead, za = zs
    a = int(w.ready["a"])
    assert want == {
        zexit: (w.pid, 42 << 8),
        zsig: (w.pid, signal.SIGTERM),
        zlead: (w.pid, 7 << 8),
        za: (a, signal.SIGABRT | 0x80 if core else signal.SIGUSR1),
    }
    bg = restore_tree(e2e, w, [*kids, *zs], "-D", str(image))
    wait_untraced(kids, "run")
    assert_zombies_back(w, want)
    assert not list(Path(tempfile.gettempdir()).glob(f"ckpt-core-{za}-*")), "a core left"
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0
    for pid in zs:
        assert_no_process(pid)  # reaped by their parents


def test_zombie_between_precopy_rounds(e2e):
    """--iterative: zlate, pre-copied in round 0 as a live member, is killed by SIGUSR1
    before round 1: the final freeze finds a zombie, and it comes back as one."""
    w = e2e.spawn("tree", "zombie")
    zlate = int(w.ready["zlate"])
    kids = members(w)

    rounds = []

    def kill_zlate(k: int, _pid: int) -> None:
        rounds.append(k)
        if k == 0:  # zlate dies between rounds 0 and 1
            os.kill(zlate, signal.SIGUSR1)
            wait_until(lambda: proc_state(zlate) == "Z", 30, "zlate to be a zombie")

    image = e2e.path("img")
    stats = e2e.path("stats.json")
    res = e2e.dump(w.pid, image, "--iterative", "--max-rounds", "3", "--stats-json", str(stats),
                   env=e2e.env(**RoundHook(e2e, kill_zlate).env()))  # fmt: skip
    assert res.returncode == 0, str(res)
    assert rounds[:1] == [0], f"the round hook ran after rounds {rounds}"
    assert w.reap() == -signal.SIGKILL
    assert len(json.loads(stats.read_text())["rounds"]) >= 1
    want = image_zombies(e2e, str(image))
    assert want[zlate] == (w.pid, signal.SIGUSR1), want
    zs = [*zombies_of(w), zlate]
    bg = restore_tree(e2e, w, [*kids, *zs], "-D", str(image))
    wait_untraced(kids, "run")
    assert_zombies_back(w, want)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def test_zombie_snapshots(e2e):
    """Snapshots of a tree with zombies; zlate, tracked as a live member by the first,
    is a zombie at the second; the latest restores with every zombie."""
    w = e2e.spawn("tree", "zombie")
    zlate = int(w.ready["zlate"])
    store = e2e.path("store")
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert res.returncode == 0, str(res)
    wait_untraced([w.pid, *members(w), zlate])
    os.kill(zlate, signal.SIGUSR1)
    wait_until(lambda: proc_state(zlate) == "Z", 30, "zlate to become a zombie")
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert res.returncode == 0, str(res)
    want = image_zombies(e2e, str(store))
    assert want[zlate] == (w.pid, signal.SIGUSR1), want
    wait_untraced([w.pid, *members(w)])
    os.kill(w.pid, signal.SIGKILL)
    for pid in members(w):
        os.kill(pid, signal.SIGKILL)
    assert w.reap() == -signal.SIGKILL
    zs = [*zombies_of(w), zlate]
    bg = restore_tree(e2e, w, [*members(w), *zs], "--store", str(store))
    wait_untraced(members(w), "run")
    assert_zombies_back(w, want)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def test_zombie_root_refused(e2e):
    """The dumped process itself a zombie: refused (only descendants are kept as zombies)."""
    p = subprocess.Popen(["true"], cwd=e2e.base)
    try:
        wait_until(lambda: proc_state(p.pid) == "Z", 30, "the child to exit")
        res = e2e.dump(p.pid, e2e.path("img"))
        assert_error(res, 5, "zombie")
    finally:
        p.wait()


def pipeline_round_trip(e2e, *extra):
    w = e2e.spawn("pipeline")
    kids = [int(w.ready["producer"]), int(w.ready["filter"])]
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    bg = restore_tree(e2e, w, kids, "-D", str(image))
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert int(v.fields["records"]) > 120000
    assert bg.wait(60).returncode == 0


def test_pipeline_no_byte_lost_or_duplicated(e2e):
    """Parent + two children streaming through two pipes that are full at the dump."""
    pipeline_round_trip(e2e)


def test_pipeline_iterative(e2e):
    pipeline_round_trip(e2e, "--iterative", "--max-rounds", "3")


def test_tree_snapshots(e2e):
    """Two snapshots of a running tree (the second incremental for the root); the
    original keeps running; the latest restores as the whole tree."""
    w = e2e.spawn("tree")
    store = e2e.path("store")
    for _ in range(2):
        res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
        assert res.returncode == 0, str(res)
    wait_untraced([w.pid, *members(w)])
    os.kill(w.pid, signal.SIGKILL)
    for pid in members(w):
        os.kill(pid, signal.SIGKILL)
    assert w.reap() == -signal.SIGKILL
    bg = restore_tree(e2e, w, members(w), "--store", str(store))
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def test_tree_members_are_precopied(e2e):
    """With --iterative the children's memory goes in the rounds, not the freeze:
    the final round copies far fewer pages than the tree holds (each child alone
    has 512 private pages)."""
    w = e2e.spawn("tree")
    kids = members(w)
    image = e2e.path("img")
    stats = e2e.path("stats.json")
    e2e.dump_ok(w, image, "--iterative", "--max-rounds", "3", "--stats-json", str(stats))
    data = json.loads(stats.read_text())
    assert data["pages"] > 4 * 512
    assert data["final"]["pages_copied"] < 512, data["final"]
    bg = restore_tree(e2e, w, kids, "-D", str(image))
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


@pytest.mark.parametrize("point", ["seized", "inject", "read-pages", "commit"])
def test_tree_dump_killed_leaves_every_member_running(e2e, point):
    """ckpt SIGKILLed in the middle of a tree dump: every member runs on, untraced,
    and the tree still verifies (shared memory, files, parents) afterwards."""
    w = e2e.spawn("tree")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, env=e2e.env(CKPT_FAULT=point))
    assert res.returncode == -signal.SIGKILL, str(res)
    assert not image_complete(e2e, image)
    for pid in [w.pid, *members(w)]:
        wait_until(lambda pid=pid: (proc_status(pid) or {}).get("TracerPid") == "0"
                   and proc_status(pid)["State"][:1] in "RS", 30,
                   f"member {pid} to run untraced")  # fmt: skip
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


def test_tree_restore_fails_cleanly_when_a_member_pid_is_taken(e2e):
    """A child's PID is in use: the restore fails (exit 9) before anything runs,
    nothing of the tree is left behind, the image is untouched; --new-pid works."""
    w = e2e.spawn("tree")
    kids = members(w)
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    reap_orphans(kids)
    digest = dir_digest(image)
    taken = kids[2]
    holder = spawn_restorer(taken)  # a parked child of ours at b's PID (clone3 set_tid)
    try:
        res = e2e.ckpt("restore", "-D", str(image))
        assert_error(res, 9, str(taken))
        for pid in [w.pid, *kids[:2]]:
            assert_no_process(pid)
        assert dir_digest(image) == digest, "a failed restore must leave the image untouched"
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    for pid in kids:
        e2e.adopt(pid)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0
