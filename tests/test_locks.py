"""File locks (issue 14, "Restored, but wrong: silent today"): flock, POSIX (fcntl) and
OFD locks and leases survive dump and restore, owned as they were (capture/locks.py,
restore/locks.py).

The workload (tests/workloads/locks.c) takes each kind; after the restore this test
checks from outside that the restored process holds every lock (a non-blocking
attempt fails, F_GETLK names the restored PID), that the kernel lists exactly the
locks it listed before, and the workload proves from inside that they are still its
own to release and take again. A lock somebody else took between the dump and the
restore makes the restore fail (exit 11) with nothing left running; the same image
restores once it is released. A lock ckpt cannot take back is refused at the dump.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest
from helpers import assert_error, assert_no_process, dir_digest, wait_until

from ckpt import schema
from ckpt.capture import locks as capture_locks
from ckpt.errors import UnsupportedProcess
from ckpt.kernel import procfs
from ckpt.model import Fd, FileLock, fd_needs_v6, state_version, to_plain
from ckpt.restore.locks import describe

FLOCK = "hhqqi4x"  # struct flock
F_OFD_GETLK, F_OFD_SETLK = 36, 37


# ---------------------------------------------------------------- helpers


def held_locks(pid: int) -> list[str]:
    """Every `lock:` line of the process's fdinfo, as `fd: KIND … start end` (the
    kernel's numbering of the lines dropped), sorted."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f.read().decode().splitlines():
                if line.startswith("lock:"):
                    out.append(f"{fd}: " + " ".join(line.split()[2:]))
    return sorted(out)


def get_lock(path: Path, cmd: int, kind: int, start: int, length: int) -> tuple[int, int]:
    """(l_type, l_pid) of the lock a new open file description of path finds."""
    fd = os.open(path, os.O_RDWR)
    try:
        got = fcntl.fcntl(fd, cmd, struct.pack(FLOCK, kind, 0, start, length, 0))
    finally:
        os.close(fd)
    l_type, _, _, _, l_pid = struct.unpack(FLOCK, got)
    return l_type, l_pid


def flock_refused(path: Path, op: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def restore_and_wait(e2e, w, image: Path):
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    return bg


# ---------------------------------------------------------------- one process


def test_locks_round_trip(e2e):
    w = e2e.spawn("locks", "one")
    pid, cwd = w.pid, w.cwd
    before = held_locks(pid)
    assert len(before) == 9, before  # the dup'd fd shows the flock of its description too
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)
    bg = restore_and_wait(e2e, w, image)

    assert held_locks(pid) == before
    # flock: the shared one admits another reader only, the exclusive one nobody
    assert flock_refused(cwd / "sh.lck", fcntl.LOCK_EX)
    assert not flock_refused(cwd / "sh.lck", fcntl.LOCK_SH)
    assert flock_refused(cwd / "ex.lck", fcntl.LOCK_SH)
    # POSIX locks: the restored process's, exactly on their ranges
    F_GETLK = fcntl.F_GETLK
    assert get_lock(cwd / "posix.dat", F_GETLK, fcntl.F_RDLCK, 150, 1) == (fcntl.F_WRLCK, pid)
    assert get_lock(cwd / "posix.dat", F_GETLK, fcntl.F_WRLCK, 1 << 40, 1) == (fcntl.F_RDLCK, pid)
    assert get_lock(cwd / "posix.dat", F_GETLK, fcntl.F_RDLCK, 300, 0)[0] == fcntl.F_UNLCK
    assert get_lock(cwd / "posix.dat", F_GETLK, fcntl.F_WRLCK, 200, 100)[0] == fcntl.F_UNLCK
    # OFD locks: no owning process (l_pid -1)
    assert get_lock(cwd / "ofd.dat", F_OFD_GETLK, fcntl.F_RDLCK, 0, 1) == (fcntl.F_WRLCK, -1)
    assert get_lock(cwd / "ofd.dat", F_OFD_GETLK, fcntl.F_WRLCK, 1999, 1) == (fcntl.F_RDLCK, -1)
    assert get_lock(cwd / "ofd.dat", F_OFD_GETLK, fcntl.F_WRLCK, 50, 950)[0] == fcntl.F_UNLCK

    v = e2e.verify(w, pid)
    assert v.ok, f"the restored process lost its locks: {v.line}"
    res = bg.wait()
    assert res.returncode == 0, str(res)
    assert dir_digest(image) == digest, "restore modified the image"


def _conflict_flock(cwd: Path) -> int:
    fd = os.open(cwd / "sh.lck", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _conflict_posix(cwd: Path) -> int:
    fd = os.open(cwd / "posix.dat", os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(FLOCK, fcntl.F_WRLCK, 0, 150, 10, 0))
    return fd


def _conflict_ofd(cwd: Path) -> int:
    fd = os.open(cwd / "ofd.dat", os.O_RDWR)
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(FLOCK, fcntl.F_WRLCK, 0, 1500, 1, 0))
    return fd


def _conflict_lease(cwd: Path) -> int:
    return os.open(cwd / "wlease.dat", os.O_RDONLY)  # a write lease needs no other opener


CONFLICTS = {
    "flock": (_conflict_flock, ["shared flock", "sh.lck", "process {me}"]),
    "posix": (_conflict_posix, ["posix write lock on bytes 100-199", "process {me}"]),
    "ofd": (_conflict_ofd, ["ofd read lock on bytes 1000-1999", "ofd.dat", "an OFD lock of"]),
    "lease": (_conflict_lease, ["write lease", "wlease.dat", "open elsewhere"]),
}


@pytest.mark.parametrize("kind", sorted(CONFLICTS))
def test_conflicting_lock_fails_restore(e2e, kind):
    """Someone took a conflicting lock after the dump: the restore fails at once (no
    waiting), naming the lock, with nothing left running; once it is released the
    same image restores."""
    w = e2e.spawn("locks", "one")
    pid = w.pid
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    take, needles = CONFLICTS[kind]
    fd = take(w.cwd)
    try:
        res = e2e.ckpt("restore", "-D", str(image))
        assert_error(res, 11, "cannot take back", *(n.format(me=os.getpid()) for n in needles))
        assert_no_process(pid)
    finally:
        os.close(fd)
    bg = restore_and_wait(e2e, w, image)
    v = e2e.verify(w, pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_lock_on_a_pipe_refused(e2e):
    """A lock ckpt cannot take back is refused at the dump, naming the process and the
    fd; the process runs on."""
    w = e2e.spawn("locks", "pipe")
    res = e2e.dump(w.pid, e2e.path("img"))
    assert_error(res, 5, f"process {w.pid}", "fd 3", "pipe", "flock")
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line


# ---------------------------------------------------------------- a process tree


def test_tree_locks(e2e):
    """A flock and an OFD lock a parent and its child share (one open file description
    across fork) come back once, shared again; each process gets its own POSIX locks
    back, also through the fd they share."""
    w = e2e.spawn("locks", "tree")
    root, child = w.pid, int(w.ready["child"])
    cwd = w.cwd
    before = {p: held_locks(p) for p in (root, child)}
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    wait_until(lambda: _reaped(child), what=f"the old child {child} gone")
    bg = restore_and_wait(e2e, w, image)
    e2e.adopt(child)
    wait_until(lambda: held_locks(child) == before[child], what="the child's locks back")
    assert held_locks(root) == before[root]
    st = os.stat(cwd / "tree.lck")
    on_file = procfs.locks_on(st.st_dev, st.st_ino)
    assert [(lk.kind, lk.type) for lk in on_file] == [("FLOCK", "WRITE")], on_file
    assert flock_refused(cwd / "tree.lck", fcntl.LOCK_SH)
    F_GETLK = fcntl.F_GETLK
    assert get_lock(cwd / "child.dat", F_GETLK, fcntl.F_RDLCK, 0, 10) == (fcntl.F_WRLCK, child)
    assert get_lock(cwd / "child.dat", F_GETLK, fcntl.F_RDLCK, 20, 10) == (fcntl.F_WRLCK, root)
    assert get_lock(cwd / "tree.ofd", F_OFD_GETLK, fcntl.F_RDLCK, 0, 10) == (fcntl.F_WRLCK, -1)
    v = e2e.verify(w, root)
    assert v.ok, v.line
    assert any(f.get("role") == "child" for _, f in w.find("VERIFY", child))
    assert bg.wait().returncode == 0


def _reaped(pid: int) -> bool:
    """A killed tree member comes back to us (the tests' subreaper): reap it, so that its
    PID is free for the restore."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not os.path.exists(f"/proc/{pid}")


# ---------------------------------------------------------------- without processes


FDINFO = (
    b"pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t2150753\n"
    b"lock:\t1: POSIX  ADVISORY  WRITE 32340 fe:00:2150753 5 14\n"
    b"lock:\t2: POSIX  ADVISORY  READ 32340 fe:00:2150753 100 EOF\n"
)


def test_fdinfo_lock_lines_parsed():
    got = procfs.parse_fd_locks(FDINFO)
    assert got == [
        procfs.FdLock("POSIX", "ADVISORY", "WRITE", 32340, 5, 14),
        procfs.FdLock("POSIX", "ADVISORY", "READ", 32340, 100, -1),
    ]
    assert procfs.parse_fdinfo(FDINFO).pos == 0  # the lines do not upset the rest
    with pytest.raises(procfs.ProcParseError):
        procfs.parse_fd_locks(b"lock:\t1: POSIX WRITE\n")


def _rec(kind: str, fd: int = 3, **kw) -> Fd:
    return Fd(fd=fd, kind=kind, path=f"/x/{fd}", flags=2, cloexec=False, pos=0, **kw)


def _fdinfo(*lines: str) -> bytes:
    return b"pos:\t0\nflags:\t02\n" + b"".join(f"lock:\t{ln}\n".encode() for ln in lines)


def test_capture_records_each_lock_once():
    """A dup shows its description's locks (POSIX ones too): only the first fd keeps them."""
    flock = "1: FLOCK  ADVISORY  READ 7 fe:00:9 0 EOF"
    posix = "2: POSIX  ADVISORY  WRITE 7 fe:00:9 0 9"
    recs = [_rec("file", 3), _rec("dup", 4, dup_of=3), _rec("dir", 5), _rec("memfd", 6)]
    held = {3: _fdinfo(flock, posix), 4: _fdinfo(flock, posix), 5: _fdinfo(flock)}
    held[6] = _fdinfo("1: POSIX  ADVISORY  READ 7 00:01:5 4096 EOF")
    capture_locks.attach(recs, held, 7)
    assert recs[0].locks == [FileLock("flock", False), FileLock("posix", True, 0, 9)]
    assert recs[1].locks == []
    assert recs[2].locks == [FileLock("flock", False)]
    assert recs[3].locks == [FileLock("posix", False, 4096, -1)]
    # a "peer" (an earlier tree member restores the description) keeps its POSIX locks
    assert capture_locks.keep_on_peer(recs[0].locks) == [FileLock("posix", True, 0, 9)]


@pytest.mark.parametrize(
    "kind, line, needle",
    [
        ("pipe", "1: FLOCK  ADVISORY  WRITE 7 00:0f:9 0 EOF", "pipe holding a flock"),
        ("socket", "1: POSIX  ADVISORY  WRITE 7 00:08:9 0 EOF", "socket holding a POSIX lock"),
        ("memfd", "1: OFDLCK ADVISORY  WRITE -1 00:01:9 0 EOF", "memfd holding an OFD lock"),
        ("dir", "1: LEASE  ACTIVE    READ 7 fe:00:9 0 EOF", "dir holding a lease"),
        ("file", "1: LEASE  BREAKING  READ 7 fe:00:9 0 EOF", "being broken"),
        ("file", "1: DELEG  ACTIVE    READ 7 fe:00:9 0 EOF", "DELEG READ lock"),
    ],
)
def test_capture_refuses_what_cannot_come_back(kind, line, needle):
    with pytest.raises(UnsupportedProcess) as info:
        capture_locks.attach([_rec(kind)], {3: _fdinfo(line)}, 7)
    assert str(info.value).startswith("fd 3 (/x/3)")
    assert needle in str(info.value)


def test_schema_and_format_of_locks():
    lk = {"kind": "posix", "write": True, "start": 5, "end": 14}
    assert schema.build(FileLock, lk) == FileLock("posix", True, 5, 14)
    for bad in ({"kind": "mand"}, {"end": 4}, {"start": -1}, {"kind": "flock"}):
        with pytest.raises(schema.SchemaError):
            schema.build(FileLock, {**lk, **bad})
    locked = to_plain(_rec("file", locks=[FileLock("flock", True)]))
    plain = to_plain(_rec("file"))
    assert fd_needs_v6(locked) and not fd_needs_v6(plain)
    assert state_version({"fds": [locked]}) == (6, 0)  # a 5.x reader would drop the lock
    assert state_version({"fds": [plain]}) < (6, 0)
    assert schema.build(Fd, locked).locks == [FileLock("flock", True)]


def test_lock_described():
    assert describe(FileLock("posix", True, 100, 199)) == "the POSIX write lock on bytes 100-199"
    assert describe(FileLock("ofd", False, 8, -1)) == "the OFD read lock on bytes 8 to the end"
    assert describe(FileLock("flock", False)) == "the shared flock"
    assert describe(FileLock("lease", True)) == "the write lease"
