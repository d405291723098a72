"""SysV shared memory (issue "Real programs": shared memory between the processes
of a tree, "SysV shm if simple"). The workload (tests/workloads/sysvshm.c) has a
keyed segment that outlives its users and a private one marked for deletion, both
attached by a parent and its child; restored, both processes check the contents,
exchange tokens through each segment, and the root checks ids, key, size, mode and
the deletion mark.
"""

from __future__ import annotations

import contextlib
import signal

import pytest
from helpers import untraced_and_running, wait_until
from test_tree import reap_orphans

from ckpt.kernel import sysvshm


def drop(shmid: int) -> None:
    with contextlib.suppress(OSError):
        sysvshm.remove(shmid)


@pytest.mark.parametrize("keyed", ["still-there", "gone-too"])
def test_sysv_segments_restored(e2e, keyed):
    """still-there: the keyed segment survives the dump (same host) and is attached
    again; gone-too: it was removed as well, and both are made again from the image
    under their old ids. The private one always went with its users."""
    w = e2e.spawn("sysvshm")
    ida, idb, child = int(w.ready["shma"]), int(w.ready["shmb"]), int(w.ready["child"])
    image = e2e.path("img")
    try:
        e2e.dump_ok(w, image)
        reap_orphans([child])
        wait_until(lambda: idb not in sysvshm.segments(), 30, "segment B to go")
        if keyed == "gone-too":
            drop(ida)
        bg = e2e.ckpt_bg("restore", "-D", str(image))
        e2e.wait_restored(w.pid, w.ident, bg)
        e2e.adopt(child)
        # alive, not only untraced: a zombie's TracerPid reads 0 too, and a tree that
        # died (ckpt gone, PTRACE_O_EXITKILL) would show up below as nattch 0
        assert bg.poll() is None, f"ckpt ended under the restored tree:\n{bg.result()}"
        wait_until(lambda: untraced_and_running(child), 30, "the child to run untraced")
        segs = sysvshm.segments()
        assert ida in segs and idb in segs, segs
        assert segs[ida].key == int(w.ready["key"]) and segs[ida].nattch == 2, segs[ida]
        v = e2e.verify(w, w.pid, signal.SIGUSR2)
        assert v.ok, v.line
        assert bg.wait(60).returncode == 0
        wait_until(lambda: idb not in sysvshm.segments(), 30, "segment B to go with its users")
    finally:
        drop(ida)
        drop(idb)


def test_sysv_leave_running(e2e):
    """--leave-running: the dump reads the segments without disturbing the tree."""
    w = e2e.spawn("sysvshm")
    ida, idb = int(w.ready["shma"]), int(w.ready["shmb"])
    try:
        res = e2e.dump(w.pid, e2e.path("img"), "--leave-running")
        assert res.returncode == 0, str(res)
        v = e2e.verify(w, w.pid, signal.SIGUSR2)
        assert v.ok, v.line
    finally:
        drop(ida)
        drop(idb)
