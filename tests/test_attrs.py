"""Process and thread attributes (issue 15 parts 3 and 5): scheduling, affinity, I/O
priority, timer slack, parent-death signal, oom_score_adj, coredump_filter, membarrier
registrations, guard regions, sealed and droppable memory, KSM, THP, TSC / cpuid /
machine-check modes, and POSIX timers that notify one thread (SIGEV_THREAD_ID, glibc's
SIGEV_THREAD). The workload (tests/workloads/attrs.c) checks each from inside, per
thread; what ckpt cannot restore is refused before the dump touches the process.
"""

from __future__ import annotations

import os
import struct
import time

import pytest
from helpers import assert_error, dump_restore_verify, proc_status, wait_until

FEATURES = [
    "sched", "affinity", "ioprio", "slack", "pdeath", "tsc", "mce", "cpuid", "mempolicy", "oom",
    "coredump", "membarrier", "guard", "timers", "names", "ksm", "thp", "seal", "droppable",
]  # fmt: skip


def round_trip(e2e, w, *extra: str) -> None:
    """Dump (killing the original), restore, and let the restored process check itself.
    (dump_restore_verify also compares the maps: glibc's SIGEV_THREAD timer starts a
    thread, with a new stack, per expiration.)"""
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    round_trip_image(e2e, w, image)


@pytest.mark.parametrize("feature", FEATURES)
def test_attribute_round_trip(e2e, feature):
    w = e2e.spawn("attrs", feature)
    if feature == "cpuid" and w.ready["cpuid"] != "1":
        pytest.skip("this CPU cannot fault on cpuid")
    if feature == "names" and w.ready["names"] != "1":
        pytest.skip("this kernel cannot name anonymous memory (CONFIG_ANON_VMA_NAME)")
    if feature == "timers":
        round_trip(e2e, w)
    else:
        v = dump_restore_verify(e2e, w)
        assert v.ok, v.line


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_all_attributes(e2e, extra):
    """Every attribute at once, plain and pre-copied (the attributes are read in the
    final freeze)."""
    w = e2e.spawn("attrs", "all")
    round_trip(e2e, w, *extra)


def test_timers_notify_threads(e2e):
    """Both timers notify one thread (glibc's SIGEV_THREAD is a SIGEV_THREAD_ID timer
    to its helper thread, signal 32): they come back to that thread. Sent to the whole
    process instead, signal 32 killed the restored process."""
    w = e2e.spawn("attrs", "timers")
    with open(f"/proc/{w.pid}/timers") as f:
        text = f.read()
    assert text.count("/tid.") == 2, text
    round_trip(e2e, w, "--iterative")


def test_tree_child_exit_signal_and_pdeathsig(e2e):
    """A child made by clone() with exit signal SIGURG and a parent-death signal: both
    come back, and its parent is the restored parent (whose death it watches)."""
    w = e2e.spawn("attrs", "tree")
    child = int(w.ready["child"])
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    _reap(child)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    e2e.adopt(child)
    wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", 30, "the child")
    assert int(proc_status(child)["PPid"]) == w.pid
    vc = e2e.verify(w, child)
    assert vc.ok, vc.line
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def _reap(pid: int, timeout: float = 30) -> None:
    """A killed child of the dumped root comes back to us (the tests' subreaper)."""
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            os.waitpid(pid, os.WNOHANG | getattr(os, "__WALL", 0x40000000))
        except ChildProcessError:
            pass
        assert time.monotonic() < end, f"process {pid} did not go away after the dump"
        time.sleep(0.01)


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_syscall_user_dispatch_refused(e2e, extra):
    """Syscall user dispatch would send ckpt's injected syscalls to the process's
    SIGSYS handler: refused before anything is injected; the process runs on."""
    w = e2e.spawn("attrs", "sud")
    res = e2e.dump(w.pid, e2e.path("img"), *extra)
    assert_error(res, 5, "syscall user dispatch", str(w.pid))
    wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", 30, "untraced")
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert w.reap() == 0


def test_root_pdeathsig_refuses_detach(e2e):
    """The restored root is ckpt's child: its parent-death signal watches ckpt, which
    stays its parent without --detach (test_attribute_round_trip[pdeath]). With
    --detach ckpt would exit at once and the kernel send the signal: refused, and
    nothing is left behind; the same image then restores without --detach."""
    w = e2e.spawn("attrs", "pdeath")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    res = e2e.ckpt("restore", "-D", str(image), "--detach")
    assert_error(res, 2, "parent-death signal", "SIGURG", "--detach")
    assert not os.path.exists(f"/proc/{w.pid}")
    round_trip_image(e2e, w, image)


def round_trip_image(e2e, w, image) -> None:
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_state_major_4_when_a_3x_reader_would_lose_attributes():
    """A plain process's attributes keep the state readable by older ckpt; guard regions,
    sealed or droppable memory, or attributes it would silently drop make it 4.0."""
    from ckpt.model import state_version

    cpus = list(range(os.cpu_count() or 1))
    thread = {"attrs": {"sched": {"policy": 0, "nice": 0}, "affinity": cpus, "ioprio": 0,
                        "timerslack": 50_000, "pdeathsig": 0, "tsc": 1, "mce_kill": 2}}  # fmt: skip
    attrs = {"oom_score_adj": 0, "coredump_filter": 0x33, "membarrier": 0, "exit_signal": 17}
    plain = {"threads": [thread], "vmas": [{"kind": "anon", "vmflags": ["rd", "wr"]}],
             "fds": [], "attrs": attrs}  # fmt: skip
    assert state_version(plain)[0] == 1
    for vma in ({"kind": "anon", "guards": [[4096, 1]]}, {"kind": "anon", "vmflags": ["sl"]},
                {"kind": "anon", "vmflags": ["dp"]}):  # fmt: skip
        assert state_version({**plain, "vmas": [vma]}) == (4, 0), vma
    for change in ({"oom_score_adj": 5}, {"membarrier": 16}, {"exit_signal": 23}):
        assert state_version({**plain, "attrs": {**attrs, **change}}) == (4, 0), change
    for change in ({"pdeathsig": 9}, {"affinity": [99]}, {"sched": {"policy": 1}},
                   {"timerslack": 1}, {"tsc": 2}, {"spec": [0, 4, 0]}):  # fmt: skip
        t = {"attrs": {**thread["attrs"], **change}}
        assert state_version({**plain, "threads": [t]}) == (4, 0), change
    assert state_version({**plain, "tree": [plain]})[0] == 2


def own_frames(child: int, parent: int, addr: int, npages: int) -> int:
    """Pages of [addr, +npages) the child holds a page frame of its own for (present, and
    not the frame the parent maps at that address)."""
    entries = []
    for pid in (child, parent):
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            f.seek(addr // 4096 * 8)
            raw = f.read(npages * 8)
        entries.append(struct.unpack(f"<{npages}Q", raw))
    present, pfn = 1 << 63, (1 << 55) - 1
    return sum(1 for x, y in zip(*entries) if x & present and (x & pfn != y & pfn or not x & pfn))


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_copy_on_write_kept(e2e, extra):
    """8 MiB a parent filled before it forked: the child rewrote 256 pages and dropped 8,
    the parent rewrote 256 others (the child keeps their old frames). The child has 512
    pages of its own, the rest is the parent's, before the dump and after the restore
    (before: 2040 of its own, twice the memory), and each sees its own content."""
    w = e2e.spawn("attrs", "cow")
    w.wait_for("CHILD")
    child, addr = int(w.ready["child"]), int(w.ready["cow"], 16)
    before = own_frames(child, w.pid, addr, 2048)
    assert before == 512, before
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    _reap(child)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    e2e.adopt(child)
    wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", 30, "the child")
    assert own_frames(child, w.pid, addr, 2048) == before
    vc = e2e.verify(w, child)
    assert vc.ok, vc.line
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_dump_leaves_copy_on_write_alone(e2e, extra):
    """Reading the pages must not unshare them: process_vm_readv pins what it reads, and
    a read-only pin of a shared anonymous page gives the target a copy of its own. A
    process dumped with --leave-running (or snapshotted) keeps its memory shared."""
    w = e2e.spawn("attrs", "cow")
    w.wait_for("CHILD")
    child, addr = int(w.ready["child"]), int(w.ready["cow"], 16)
    before = own_frames(child, w.pid, addr, 2048)
    res = e2e.dump(w.pid, e2e.path("img"), "--leave-running", *extra)
    assert res.returncode == 0, str(res)
    assert own_frames(child, w.pid, addr, 2048) == before
    assert own_frames(w.pid, child, addr, 2048) == 256 + 8 + 256  # old 0-263, new 512-767
