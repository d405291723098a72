"""End to end: an epoll shared by a parent and its child (one open file description,
inherited across fork) whose registrations name files only one of them holds (issue
14: redis' BGSAVE child closes the listener its parent registered, and reuses the fd
number). Each registration is added again once, by the process that holds its file
(capture/tree.py _link_epolls); one whose file only a process without the epoll holds
is refused. tests/workloads/epolltree.c checks the events from inside.
"""

from __future__ import annotations

import os
import signal

from helpers import (
    assert_error,
    image_complete,
    proc_status,
    untraced_and_running,
    wait_until,
)
from test_tree import reap_orphans

from ckpt.image import ImageReader


def _registrations(pid: int, fd: int) -> list[tuple[int, str]]:
    """(tfd, ino) of each registration in /proc/PID/fdinfo/FD."""
    out = []
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("tfd:"):
                words = line.split()
                ino = next(w for w in words if w.startswith("ino:"))
                out.append((int(words[1]), ino))
    return sorted(out)


def test_shared_epoll_registrations_from_their_holders(e2e):
    w = e2e.spawn("epolltree")
    child = int(w.ready["child"])
    before = _registrations(w.pid, 10)
    assert [t for t, _ in before] == [11, 12], before
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    reap_orphans([child])
    with ImageReader(str(image)) as r:
        assert r.version[0] == 6  # a 5.x reader would not add the child's registration
        state = r.state
    ep = next(f for f in state["fds"] if f["fd"] == 10)
    assert [(e["tfd"], e["src_fd"]) for e in ep["epoll"]] == [(11, 11)]
    peer = next(f for f in state["tree"][0]["fds"] if f["fd"] == 10)
    assert peer["kind"] == "peer", peer
    assert [(e["tfd"], e["src_fd"]) for e in peer["epoll"]] == [(12, 12)]
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    e2e.adopt(child)
    wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", 30, "the child")
    # the same (fd number, file) pairs: one registration each, none twice
    after = _registrations(w.pid, 10)
    assert [t for t, _ in after] == [11, 12], after
    v = e2e.verify(w, w.pid)
    assert v.ok, f"the restored tree failed its own checks: {v.line}"
    assert bg.wait().returncode == 0


def test_registration_held_only_outside_the_epolls_holders_refused(e2e):
    w = e2e.spawn("epolltree", "orphan")
    child = int(w.ready["child"])
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, f"process {w.pid}", "fd 10 (epoll)", "fd 11", "do not hold this epoll")
    assert not image_complete(e2e, image)
    for pid in (w.pid, child):
        wait_until(lambda pid=pid: untraced_and_running(pid), 30, f"{pid} to run untraced")
    os.kill(child, signal.SIGKILL)
    os.kill(w.pid, signal.SIGKILL)
