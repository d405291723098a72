"""Process trees (issue "Real programs"): `ckpt dump PID` takes the process and its
descendants, with their parent/child links, process groups and sessions, the
memory they share and the open files they share; restore rebuilds the tree with
the same PIDs. The workload (tests/workloads/tree.c) checks all of it from
inside every member after the restore.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from helpers import (
    assert_error,
    assert_no_process,
    dir_digest,
    image_complete,
    proc_status,
    wait_until,
)

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


def test_zombie_child_refused(e2e):
    w = e2e.spawn("tree", "zombie")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, "zombie")
    assert not image_complete(e2e, image)
    wait_untraced([w.pid, *members(w)])
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


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
