"""The security context comes back exactly, or the dump says no (issue 15, parts 2 and 4).

The workload (tests/workloads/hardened.c) sandboxes itself the way services do
(uids, gids and fs ids, supplementary groups, the five capability sets, securebits,
no_new_privs, seccomp filters shared by its threads with TSYNC and one of a thread's
own, strict mode, chroot, loginuid) and checks from inside that it still is: a filter
still fails what it failed with its errno, a dropped capability stays dropped, a
filter install with TSYNC still works (its threads still share one filter). From
outside, the tests compare every thread's /proc status (Uid, Gid, Groups, Cap*,
NoNewPrivs, Seccomp, Seccomp_filters), /proc/PID/cgroup, the root, loginuid and
personality before the dump and after the restore. Processes in their own
namespaces are refused before anything is injected; dumps killed at every fault
point leave sandboxed targets running as they were.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    CKPT,
    POLL,
    Result,
    assert_error,
    assert_no_process,
    image_complete,
    proc_status,
    read_bytes,
    read_link,
    signal_state,
    untraced_and_running,
    wait_until,
)

from ckpt.kernel import cgroups, seccomp

SEC_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
            "NoNewPrivs", "Seccomp", "Seccomp_filters")  # fmt: skip


def security_view(pid: int) -> dict:
    """What the process is, as /proc shows it: per thread (by TID) and per process."""
    threads = {}
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        st = proc_status(int(tid)) or {}
        threads[int(tid)] = {k: st.get(k) for k in SEC_KEYS}
    return {
        "threads": threads,
        "cgroup": read_bytes(f"/proc/{pid}/cgroup"),
        "root": read_link(f"/proc/{pid}/root"),
        "loginuid": read_bytes(f"/proc/{pid}/loginuid"),
        "personality": read_bytes(f"/proc/{pid}/personality"),
    }


def assert_same_view(before: dict, after: dict, what: str) -> None:
    for key in before:
        assert after[key] == before[key], f"{key} differs {what}:\n{before[key]}\n{after[key]}"


def restore_and_compare(e2e, w, image, before, *children: int):
    """Restore (ckpt waits for it), compare what /proc shows, make it verify."""
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    for c in children:
        e2e.adopt(c)
        wait_until(lambda c=c: (proc_status(c) or {}).get("TracerPid") == "0", 30, "child")
    assert_same_view(before[w.pid], security_view(w.pid), "after the restore")
    for c in children:
        assert_same_view(before[c], security_view(c), f"after the restore (child {c})")
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    res = bg.wait()
    assert res.returncode == 0, str(res)
    return v


def round_trip(e2e, mode: str, *extra: str) -> None:
    w = e2e.spawn("hardened", mode)
    child = int(w.ready["child"])
    pids = [w.pid, *([child] if child else [])]
    before = {p: security_view(p) for p in pids}
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    for c in pids[1:]:
        assert_no_process(c)  # killed with its parent, re-parented to us and reaped
    restore_and_compare(e2e, w, image, before, *pids[1:])


@pytest.mark.parametrize("extra", [[], ["--iterative"]], ids=["plain", "iterative"])
def test_sandboxed_threads_round_trip(e2e, extra):
    """Four threads of uid 2001-2004 with capabilities, securebits, no_new_privs and
    one filter (TSYNC'd) in common; one thread with a filter of its own, one with its
    own fsuid and securebits."""
    round_trip(e2e, "nobody", *extra)


def test_root_with_groups_and_fewer_capabilities(e2e):
    """uid 0 keeps its supplementary groups and comes back without the capabilities
    it dropped; its filter was installed without no_new_privs."""
    round_trip(e2e, "root")


def test_tree_parent_and_child_filters(e2e):
    """A child forked after its parent's filter, with one more of its own."""
    round_trip(e2e, "tree")


@pytest.mark.parametrize("mode", ["strict", "strictmain", "nosigmask"])
def test_strict_mode_round_trip(e2e, mode):
    """A thread in seccomp strict mode (another one, or the main thread), or one whose
    filter fails rt_sigprocmask, is dumped through it (ckpt's syscalls are suspended)
    and comes back so, serving its pipe."""
    round_trip(e2e, mode)


def test_chrooted_process(e2e):
    """Back in its chroot: "/" is the same directory, the host's /proc is not there."""
    w = e2e.spawn("hardened", "chroot")
    assert read_link(f"/proc/{w.pid}/root") == str(w.cwd)
    before = {w.pid: security_view(w.pid)}
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    restore_and_compare(e2e, w, image, before)


def test_filter_stopping_every_way_back_refused(e2e):
    """A thread whose filter fails getpid and kills on rt_sigreturn: ckpt could not put
    it back if it were killed mid-dump. Refused (exit 5) before anything is injected;
    the process runs on."""
    w = e2e.spawn("hardened", "noway")
    before = security_view(w.pid)
    res = e2e.dump(w.pid, e2e.path("img"), env=e2e.env(CKPT_FAULT="inject-setup"))
    assert_error(res, 5, f"process {w.pid}", f"thread {w.ready['s']}", "rt_sigreturn")
    wait_until(lambda: untraced_and_running(w.pid), 30, "the target to run untraced")
    assert security_view(w.pid) == before
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert w.reap() == 0


def test_capability_ckpt_lacks_is_a_clear_error(e2e):
    """Restored by a ckpt without CAP_SYS_TIME in its bounding set, a process whose
    inheritable set holds it cannot come back: exit 11 naming it, nothing left behind;
    a ckpt that has it restores the image."""
    w = e2e.spawn("hardened", "nobody")
    before = {w.pid: security_view(w.pid)}
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    cmd = ["setpriv", "--bounding-set", "-sys_time", *CKPT, "restore", "-D", str(image)]
    p = subprocess.run(cmd, cwd=e2e.base, env=e2e.env(), capture_output=True, text=True)
    assert_error(Result(cmd, p.returncode, p.stdout, p.stderr), 11, "CAP_SYS_TIME", "inheritable")
    assert_no_process(w.pid)
    restore_and_compare(e2e, w, image, before)


def test_ckpt_under_seccomp_refuses_filters_it_cannot_read(e2e):
    """ckpt itself under one seccomp filter (as in a container) can neither read nor
    suspend another process's filters: a thread with more filters than ckpt's (t2 has
    two) is refused (exit 5, saying why) before anything is injected; it runs on."""
    w = e2e.spawn("hardened", "nobody")
    before = security_view(w.pid)
    cmd = [*UNDER_FILTER, *CKPT, "dump", str(w.pid), "-D", str(e2e.path("img"))]
    env = e2e.env(CKPT_FAULT="inject-setup")
    p = subprocess.run(cmd, cwd=e2e.base, env=env, capture_output=True, text=True)
    res = Result(cmd, p.returncode, p.stdout, p.stderr)
    t2 = w.ready["t2"]
    assert_error(res, 5, f"process {w.pid}", f"thread {t2}", "ckpt itself runs under seccomp")
    wait_until(lambda: untraced_and_running(w.pid), 30, "the target to run untraced")
    assert security_view(w.pid) == before
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert w.reap() == 0


#: runs a command under an allow-all seccomp filter (what a container's would be)
UNDER_FILTER = [
    sys.executable, "-c",
    "import ctypes, os, struct, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "ins = ctypes.create_string_buffer(struct.pack('<HBBI', 6, 0, 0, 0x7FFF0000))\n"
    "prog = ctypes.create_string_buffer(struct.pack('<HxxxxxxQ', 1, ctypes.addressof(ins)))\n"
    "assert libc.syscall(317, 1, 0, prog) == 0, ctypes.get_errno()\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n",
]  # fmt: skip


def test_lsm_label_other_than_ckpts_refused(tmp_path, monkeypatch):
    """No LSM labels processes here: with a fake /proc, a process whose label is not
    ckpt's is refused at the dump (ckpt cannot set labels) and its own passes."""
    from ckpt.capture import security
    from ckpt.errors import UnsupportedProcess
    from ckpt.kernel import procfs

    for who, label in (("self", b"unconfined\n"), ("7", b"sandbox (enforce)\n"), ("8", b"")):
        (tmp_path / who / "attr").mkdir(parents=True)
        (tmp_path / who / "attr" / "current").write_bytes(label)
    (tmp_path / "8" / "attr" / "current").write_bytes(b"unconfined\n")
    monkeypatch.setattr(procfs, "PROC_ROOT", str(tmp_path))
    with pytest.raises(UnsupportedProcess, match="LSM label 'sandbox \\(enforce\\)'"):
        security._lsm(7)
    assert security._lsm(8) == "unconfined"


# ---------------------------------------------------------------- cgroups


def _test_hierarchies() -> list[cgroups.Mount]:
    """The v2 hierarchy and the v1 pids one, where mounted at their root here."""
    out = []
    for m in cgroups.mounts():
        wanted = m.root == "/" and m.controllers in (frozenset(), frozenset({"pids"}))
        if wanted and not any(o.controllers == m.controllers for o in out):
            out.append(m)
    return out


@pytest.fixture
def own_cgroups(e2e):
    """A fresh cgroup in the v2 hierarchy (and v1 pids, if mounted); removed at the end,
    once every process the test started is gone, even when the test fails."""
    name = f"ckpt-test-{os.getpid()}-{secrets.token_hex(3)}"
    made: list[Path] = []
    try:
        for m in _test_hierarchies():
            d = Path(m.point) / name
            d.mkdir()
            made.append(d)
        if not made:
            pytest.skip("no cgroup hierarchy mounted where the test can make a cgroup")
        yield made
    finally:
        e2e.cleanup()
        for d in made:
            end = time.monotonic() + 30
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:  # EBUSY until the last process is reaped
                    if exc.errno != errno.EBUSY or time.monotonic() > end:
                        raise
                    time.sleep(POLL)


def _enter(dirs: list[Path], pid: int) -> None:
    for d in dirs:
        (d / "cgroup.procs").write_text(str(pid))


def test_own_cgroups_round_trip(e2e, own_cgroups):
    """A process moved into cgroups of its own (v2 and v1) comes back in them."""
    w = e2e.spawn("hardened", "root")
    _enter(own_cgroups, w.pid)
    before = {w.pid: security_view(w.pid)}
    for d in own_cgroups:
        assert f":/{d.name}\n" in before[w.pid]["cgroup"].decode()
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    restore_and_compare(e2e, w, image, before)


def test_cgroup_gone_at_restore(e2e, own_cgroups):
    """Its cgroup removed after the dump: exit 11 naming it, nothing left behind; made
    again, the image restores into it."""
    w = e2e.spawn("hardened", "root")
    _enter(own_cgroups, w.pid)
    before = {w.pid: security_view(w.pid)}
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    for d in own_cgroups:
        d.rmdir()
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 11, f"/{own_cgroups[0].name}", "no longer exists")
    assert_no_process(w.pid)
    for d in own_cgroups:
        d.mkdir()
    restore_and_compare(e2e, w, image, before)


# ---------------------------------------------------------------- namespaces


@pytest.mark.parametrize(
    "flag,kind",
    [("--uts", "uts"), ("--ipc", "ipc"), ("--net", "net"), ("--mount", "mnt"),
     ("--cgroup", "cgroup"), ("--user", "user"), ("--pid", "pid_for_children"),
     ("--time", "time")],
)  # fmt: skip
def test_own_namespace_refused_before_injecting(e2e, flag, kind):
    """A process in a namespace of its own is refused (exit 5, naming the namespace)
    before anything is injected (CKPT_FAULT=inject-setup never fires); it runs on."""
    w = e2e.spawn("memory", "4", wrapper=["unshare", flag])
    sig_before = signal_state(w.pid)
    res = e2e.dump(w.pid, e2e.path("img"), env=e2e.env(CKPT_FAULT="inject-setup"))
    assert_error(res, 5, f"process {w.pid}", f"own {kind}", "namespace")
    wait_until(lambda: untraced_and_running(w.pid), 30, "the target to run untraced")
    assert signal_state(w.pid) == sig_before
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert w.reap() == 0


# ---------------------------------------------------------------- a dump killed half-way

FAULT_POINTS = ["seized", "inject-setup", "inject", "inject-thread", "read-pages",
                "write-image", "commit"]  # fmt: skip


@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("mode", ["nobody", "strict", "strictmain", "nosigmask"])
def test_dump_killed_at_fault_point(e2e, mode, point):
    """ckpt SIGKILLed at each point while it dumps a filtered process (its threads go
    back through the heal trampoline, which the filter allows), one with a thread in
    strict mode (the main thread or another) or with a thread whose filter fails the
    trampoline's rt_sigprocmask (those go back by rt_sigreturn): the target runs on
    untraced, with the same signal state (each thread checks its own mask) and security
    context, and verifies itself."""
    w = e2e.spawn("hardened", mode)
    sig_before = signal_state(w.pid)
    before = security_view(w.pid)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, env=e2e.env(CKPT_FAULT=point))
    assert res.returncode == -signal.SIGKILL, f"ckpt did not stop at {point!r}\n{res}"
    wait_until(lambda: untraced_and_running(w.pid), 30, f"the target to run ({point})")
    assert w.popen.poll() is None, f"the target died (killed at {point})"
    wait_until(lambda: signal_state(w.pid) == sig_before, 10, f"signal state ({point})")
    assert security_view(w.pid) == before
    assert not image_complete(e2e, image)
    v = e2e.verify(w, w.pid)
    assert v.ok, f"target broken by a dump killed at {point}: {v.line}"
    assert w.reap() == 0


# ---------------------------------------------------------------- units


def _prog(*ins: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("<HBBI", *i) for i in ins)


LD_NR = (0x20, 0, 0, 0)  # A = seccomp_data.nr
ALLOW, KILL = seccomp.RET_ALLOW, seccomp.RET_KILL_THREAD


def test_bpf_verdicts():
    deny_ppid = _prog(LD_NR, (0x15, 0, 1, 110), (0x06, 0, 0, seccomp.RET_ERRNO | 1111),
                      (0x06, 0, 0, ALLOW))  # fmt: skip
    kill_arg = _prog((0x20, 0, 0, 16), (0x15, 0, 1, 2), (0x06, 0, 0, KILL), (0x06, 0, 0, ALLOW))
    assert seccomp.run(deny_ppid, 110) == seccomp.RET_ERRNO | 1111
    assert seccomp.run(deny_ppid, 39) == ALLOW
    assert seccomp.run(kill_arg, 14, (2, 0, 0, 8)) == KILL  # args[0] low word
    assert seccomp.run(kill_arg, 14, (1 << 32 | 3,)) == ALLOW
    # the most severe action of a chain wins, whatever the order
    assert seccomp.verdict([deny_ppid, kill_arg], 14, (2,)) == KILL
    assert seccomp.verdict([kill_arg, deny_ppid], 110) == seccomp.RET_ERRNO | 1111
    assert seccomp.heal_blocked([deny_ppid]) is None
    assert "rt_sigprocmask" in seccomp.heal_blocked([kill_arg])
    notif = _prog((0x06, 0, 0, seccomp.RET_USER_NOTIF))
    assert seccomp.returns_user_notif(notif) and not seccomp.returns_user_notif(deny_ppid)
    with pytest.raises(seccomp.BadFilter):
        seccomp.run(_prog((0x20, 0, 0, 3)), 0)  # unaligned load


MOUNTINFO_CGROUPS = [
    cgroups.Mount("/sys/fs/cgroup/unified", "/", frozenset()),
    cgroups.Mount("/sys/fs/cgroup/cpu,cpuacct", "/", frozenset({"cpu", "cpuacct"})),
    cgroups.Mount("/sys/fs/cgroup/systemd", "/", frozenset({"name=systemd"})),
    cgroups.Mount("/mnt/pids-sub", "/a", frozenset({"pids"})),
]


def test_cgroup_lines_and_mounts():
    got = cgroups.parse(b"12:cpuacct,cpu:/x/y\n1:name=systemd:/user.slice\n0::/a b\n")
    assert got == [
        cgroups.Membership(12, "cpuacct,cpu", "/x/y"),
        cgroups.Membership(1, "name=systemd", "/user.slice"),
        cgroups.Membership(0, "", "/a b"),
    ]
    find = [cgroups.find_mount(m, MOUNTINFO_CGROUPS) for m in got]
    assert [(f[0].point, f[1]) for f in find] == [
        ("/sys/fs/cgroup/cpu,cpuacct", "x/y"),
        ("/sys/fs/cgroup/systemd", "user.slice"),
        ("/sys/fs/cgroup/unified", "a b"),
    ]
    # a cgroup outside what a mount shows cannot be reached through it
    assert cgroups.find_mount(cgroups.Membership(3, "pids", "/b"), MOUNTINFO_CGROUPS) is None
    assert cgroups.find_mount(cgroups.Membership(3, "pids", "/a/c"), MOUNTINFO_CGROUPS)[1] == "c"
    with pytest.raises(ValueError):
        cgroups.parse(b"garbage\n")


def test_cgroup_path_cannot_leave_its_hierarchy(tmp_path):
    """A path from an image is resolved below the hierarchy's mount only: no "..",
    no symlink."""
    mnt = next(iter(_test_hierarchies()), None)
    if mnt is None:
        pytest.skip("no cgroup hierarchy mounted at its root")
    for path in ("/../../etc", "/./../x"):
        m = cgroups.Membership(0, ",".join(sorted(mnt.controllers)), path)
        with pytest.raises(OSError):
            os.close(cgroups.open_cgroup(m, [mnt]))
    fake = cgroups.Mount(str(tmp_path), "/", mnt.controllers)  # not a cgroup filesystem
    m = cgroups.Membership(0, ",".join(sorted(mnt.controllers)), "/")
    with pytest.raises(cgroups.CgroupGone, match="not a cgroup filesystem"):
        os.close(cgroups.open_cgroup(m, [fake]))
