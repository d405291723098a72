"""Processes that do not run as root (issue 15): their limits are read from
/proc/PID/limits (prlimit on another user's process needs CAP_SYS_RESOURCE) and set
from inside the restored process before it drops ckpt's credentials; mlock'd memory
is locked again before that too. The workload (tests/workloads/users.c) checks its
uids, gids, groups, limits, dumpable flag, memory and locked memory itself.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import (
    CKPT,
    Result,
    assert_error,
    assert_no_process,
    dir_digest,
    dump_restore_verify,
    proc_status,
    wait_until,
)

from ckpt.kernel import procfs

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def spawn_nobody(e2e, mode: str = "self"):
    w = e2e.spawn("users", mode, wrapper=AS_NOBODY)
    assert proc_status(w.pid)["Uid"].split() == [str(NOBODY)] * 4
    return w


def test_nobody_round_trip(e2e):
    w = spawn_nobody(e2e, "threads")
    v = dump_restore_verify(e2e, w)
    assert v.fields["uid"] == str(NOBODY)


def test_nobody_iterative(e2e):
    w = spawn_nobody(e2e)
    image = e2e.path("img")
    e2e.dump_ok(w, image, "--iterative")
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_dropped_root_new_pid(e2e):
    """Started as root, locked 12 MiB (above RLIMIT_MEMLOCK: CAP_IPC_LOCK), then became
    nobody with two groups; restored as a copy beside the original (--new-pid)."""
    w = e2e.spawn("users", "drop")
    assert sorted(proc_status(w.pid)["Groups"].split()) == ["100", str(NOBODY)]
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    new = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    assert proc_status(new)["Uid"].split() == [str(NOBODY)] * 4
    v = e2e.verify(w, new)
    assert v.ok, v.line
    assert bg.wait().returncode == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke after dump --leave-running: {v0.line}"


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_root_parent_nobody_child(e2e, extra):
    """A master that stays root and a worker that dropped to nobody (nginx's shape)."""
    w = e2e.spawn("users", "tree")
    child = int(w.ready["child"])
    assert proc_status(child)["Uid"].split() == [str(NOBODY)] * 4
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    assert_no_process(child)  # killed with its parent, re-parented to us and reaped
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    e2e.adopt(child)
    wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", 30, "the child")
    assert proc_status(child)["Uid"].split() == [str(NOBODY)] * 4
    assert int(proc_status(child)["PPid"]) == w.pid
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_hard_limit_above_ckpts_is_a_clear_error(e2e):
    """ckpt (no CAP_SYS_RESOURCE) cannot give the process a hard limit above its own:
    exit 11 naming the limit, nothing left behind; with the limit back it restores."""
    w = spawn_nobody(e2e)
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)
    hard = procfs.limits(os.getpid())[7][1]  # RLIMIT_NOFILE: the workload kept this one
    assert hard > 800
    cmd = ["prlimit", f"--nofile=700:{hard - 1}", *CKPT, "restore", "-D", str(image), "--detach"]
    p = subprocess.run(cmd, cwd=e2e.base, env=e2e.env(), capture_output=True, text=True)
    res = Result(cmd, p.returncode, p.stdout, p.stderr)
    assert_error(res, 11, "RLIMIT_NOFILE", f"process {w.pid}", "CAP_SYS_RESOURCE")
    assert_no_process(w.pid)
    assert dir_digest(image) == digest
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def thread_seccomp(pid: int) -> dict[int, tuple[str, str]]:
    return {
        int(t): (st["Seccomp"], st["Seccomp_filters"])
        for t in os.listdir(f"/proc/{pid}/task")
        if (st := proc_status(int(t)))
    }


def test_thread_with_own_seccomp_filter(e2e):
    """A thread whose seccomp filter fails prctl: ckpt's injected prctl passes it (the
    filter is suspended while ckpt traces the thread), and the filter comes back on that
    thread only."""
    w = spawn_nobody(e2e, "seccomp")
    before = thread_seccomp(w.pid)
    assert sorted(before.values()) == [("0", "0"), ("2", "1")]
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    assert thread_seccomp(w.pid) == before
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_no_room_for_the_scratch_area_refused(e2e):
    """mlockall(MCL_FUTURE) at RLIMIT_MEMLOCK: the injected mmap of ckpt's scratch area
    fails; refused (exit 5) with the reason, and the process runs on as it was."""
    w = spawn_nobody(e2e, "lockall")
    res = e2e.dump(w.pid, e2e.path("img"))
    assert_error(res, 5, f"process {w.pid}", "scratch", "RLIMIT_MEMLOCK")
    wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", 30, "detach")
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert w.reap() == 0


LIMITS_SAMPLE = b"""\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max file size             unlimited            unlimited            bytes     
Max data size             unlimited            unlimited            bytes     
Max stack size            8388608              unlimited            bytes     
Max core file size        0                    unlimited            bytes     
Max resident set          unlimited            unlimited            bytes     
Max processes             96368                96368                processes 
Max open files            777                  20000                files     
Max locked memory         8388608              8388608              bytes     
Max address space         unlimited            unlimited            bytes     
Max file locks            unlimited            unlimited            locks     
Max pending signals       96368                96368                signals   
Max msgqueue size         12345                54321                bytes     
Max nice priority         0                    0                    
Max realtime priority     0                    0                    
Max realtime timeout      200000               unlimited            us        
"""  # noqa: W291 - the kernel pads every column, the last one too


def test_parse_limits_sample():
    inf = procfs.RLIM_INFINITY
    got = procfs.parse_limits(LIMITS_SAMPLE)
    assert got == {
        0: [inf, inf], 1: [inf, inf], 2: [inf, inf], 3: [8388608, inf], 4: [0, inf],
        5: [inf, inf], 6: [96368, 96368], 7: [777, 20000], 8: [8388608, 8388608],
        9: [inf, inf], 10: [inf, inf], 11: [96368, 96368], 12: [12345, 54321],
        13: [0, 0], 14: [0, 0], 15: [200000, inf],
    }  # fmt: skip


def test_parse_limits_refuses_what_it_does_not_know():
    lines = LIMITS_SAMPLE.splitlines(keepends=True)
    with pytest.raises(procfs.ProcParseError, match="Max open files"):
        procfs.parse_limits(b"".join(ln for ln in lines if not ln.startswith(b"Max open")))
    with pytest.raises(procfs.ProcParseError, match="unexpected"):
        procfs.parse_limits(LIMITS_SAMPLE + b"Max teapots              1                    2\n")
    with pytest.raises(procfs.ProcParseError, match="unexpected"):
        procfs.parse_limits(LIMITS_SAMPLE.replace(b"777 ", b"7x7 "))


def test_limits_of_self_match_getrlimit():
    import resource

    got = procfs.limits(os.getpid())
    assert got == {r: list(resource.getrlimit(r)) for r in range(16)}
