"""End to end: state of an open file description or of an fd table that used to be
restored wrong without a word (issue 14, "Restored, but wrong: silent today").

The workload (tests/workloads/fdstate.c) proves each from inside after the restore:
SIGIO ownership (F_SETOWN_EX, F_SETSIG, O_ASYNC: a write delivers the signal), an fd
table shared with a child made by clone(CLONE_FILES) (an fd one opens, the other
uses), and a sealed memfd holding an executable (F_GET_SEALS; fork + execveat of it
exits 0, no ETXTBSY).
"""

from __future__ import annotations

import os
import signal

import pytest
from helpers import (
    assert_error,
    assert_refused_unharmed,
    dump_restore_verify,
    image_complete,
    proc_status,
    untraced_and_running,
    wait_until,
)
from test_tree import reap_orphans

from ckpt.image import ImageReader

# --------------------------------------------------------------- SIGIO ownership


def test_async_owner_and_signal_restored(e2e):
    """O_ASYNC pipe owned by the process (F_OWNER_PID) with F_SETSIG = SIGRTMIN+1, a
    socket owned by its process group (plain SIGIO), a pipe owned by its main thread
    (F_OWNER_TID): after the restore each write delivers its signal, with si_fd."""
    w = e2e.spawn("fdstate", "async")
    image = e2e.path("img")
    dump_restore_verify(e2e, w, image=image)
    with ImageReader(str(image)) as r:
        assert r.version[0] == 6  # a 5.x reader would drop the owners: it must refuse


def test_async_owner_follows_new_pid(e2e):
    """--new-pid: the owner that was the process itself is the copy, not the original
    (which runs on beside it)."""
    w = e2e.spawn("fdstate", "async")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    copy = e2e.find_restored(w.ident, w.pid, bg)
    v = e2e.verify(w, copy)
    assert v.ok, f"the copy failed its own checks: {v.line}"
    assert bg.wait().returncode == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke: {v0.line}"
    assert w.reap() == 0


# --------------------------------------------------------------- memfd seals, exec


def test_sealed_memfd_executes_after_restore(e2e):
    """A memfd holding /bin/true, sealed (SEAL|SHRINK|GROW|WRITE), exec'd through its
    memfd_create fd and an O_PATH fd, and an unsealed one with a writable shared
    mapping: the seals come back and execveat works (no ETXTBSY from a writable open
    file the restore made)."""
    w = e2e.spawn("fdstate", "memfdexec")
    dump_restore_verify(e2e, w)


# --------------------------------------------------------------- shared fd tables


def test_clone_files_table_shared_after_restore(e2e):
    """A child made with clone(CLONE_FILES) shares the fd table again: it reads an fd
    its parent opens after the restore, and the parent sees the fd it opens."""
    w = e2e.spawn("fdstate", "sharedfiles")
    child = int(w.ready["child"])
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    reap_orphans([child])
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    e2e.adopt(child)
    wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", 30, "the child")
    assert int(proc_status(child)["PPid"]) == w.pid
    v = e2e.verify(w, w.pid)
    assert v.ok, f"the restored tree failed its own checks: {v.line}"
    assert bg.wait().returncode == 0


def test_clone_files_with_other_parent_refused(e2e):
    """A process sharing the fd table of a process that is not its parent (clone with
    CLONE_PARENT|CLONE_FILES) cannot be forked that way again: one line naming both,
    exit 5, the tree runs on."""
    w = e2e.spawn("fdstate", "sharedsibling")
    child, grandchild = int(w.ready["child"]), int(w.ready["grandchild"])
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, f"process {grandchild}", "fd table", f"process {child}")
    assert not image_complete(e2e, image)
    for pid in (w.pid, child, grandchild):
        wait_until(lambda pid=pid: untraced_and_running(pid), 30, f"{pid} to run untraced")
    os.kill(w.pid, signal.SIGUSR2)
    assert w.reap() == 0


def test_clone_files_with_child_left_out_refused(e2e):
    """--no-tree leaves the child out, but it shares the root's table: refused (its
    restored table would be the root's alone), and both run on unharmed."""
    w = e2e.spawn("fdstate", "sharedfiles")
    child = int(w.ready["child"])
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--no-tree")
    assert_error(res, 5, f"process {w.pid}", "fd table", f"process {child}")
    assert_refused_unharmed(e2e, w, image)


# --------------------------------------------------------------- units


def _state(**extra) -> dict:
    fd = {"fd": 3, "kind": "pipe", "path": "pipe:[1]", "flags": 0, "cloexec": False, "pos": 0}
    fd.update(extra)
    return {"pid": 10, "fds": [fd]}


def test_state_version_of_fd_state():
    """Each new kind of state makes the state major 6; without it, older majors stay."""
    from ckpt.model import state_version

    assert state_version(_state())[0] < 6
    assert state_version(_state(owner=[1, 10])) == (6, 0)
    assert state_version(_state(sigio=35)) == (6, 0)
    assert state_version(_state(flags=0o20000)) == (6, 0)  # O_ASYNC
    assert state_version(_state(kind="memfd", peer_slot=0, peer_fd=3)) == (6, 0)
    tree = {"pid": 10, "fds": [], "tree": [{"pid": 11, "fds": [], "files_of": 0}]}
    assert state_version(tree) == (6, 0)


def test_schema_checks_fd_state(e2e):
    """A real state's owners pass the schema; an owner type, PID or signal out of range,
    a memfd naming a later member's fd and a table of a later member are refused."""
    import copy

    from ckpt.schema import SchemaError, build_state

    w = e2e.spawn("fdstate", "async")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    with ImageReader(str(image)) as r:
        state = r.state
    owned = [i for i, f in enumerate(state["fds"]) if f.get("owner")]
    assert len(owned) == 3, state["fds"]
    assert {state["fds"][i]["owner"][0] for i in owned} == {0, 1, 2}
    build_state(state)
    bad = [("owner", [3, w.pid]), ("owner", [1, 0]), ("owner", [1]), ("sigio", 65),
           ("peer_slot", 0)]  # fmt: skip
    for key, value in bad:
        s = copy.deepcopy(state)
        f = s["fds"][owned[0]]
        f[key] = value
        if key == "peer_slot":
            f["kind"], f["peer_fd"] = "memfd", 3
        with pytest.raises(SchemaError):
            build_state(s)
    s = copy.deepcopy(state)
    s["files_of"] = 0  # the root shares no earlier member's table
    with pytest.raises(SchemaError):
        build_state(s)
    os.kill(w.pid, signal.SIGUSR2)
    assert w.reap() == 0
