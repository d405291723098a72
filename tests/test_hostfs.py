"""Restore runs as root among other users' files (issue 11, part 1): what it creates,
changes, removes and opens on the host must never follow a name an unprivileged
user swapped under it.

The workload (tests/workloads/hostfs.c) runs as nobody in a directory nobody owns:
a unix listener bound to "sock" (mode 0640), a socket bound to "sub/dsock" whose
file was then unlinked, and the regular file "data" open read-write. A racer, also
running as nobody, swaps those names for symbolic links to root-owned files while
the image is restored again and again. Whatever the restore does (succeed, or fail
cleanly), the root-owned files keep their mode, owner and content, and a restored
process never holds the root-owned file.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dump_restore_verify, proc_status, wait_until

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
# the workload's directory becomes nobody's before the workload starts in it
OWN_CWD = ["sh", "-c", f'chown {NOBODY}:{NOBODY} . && exec "$@"', "sh"]
SECRET = b"root only\n"
ROUNDS = 12

RACER = r"""
import os, random, stat, sys, time
mode, target, stop, hits_file = sys.argv[1:5]
hits = 0

def swap_in(name, link_to):
    tmp = name + ".racer"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(link_to, tmp)
    os.rename(tmp, name)  # atomic: the name is a symlink from here on

if mode == "data":
    os.link("data", "keep")  # the real file, to put back
while not os.path.exists(stop):
    if mode == "sock":
        # a freshly bound socket file: replace it before ckpt fixes its mode
        try:
            st = os.lstat("sock")
        except FileNotFoundError:
            continue
        if stat.S_ISSOCK(st.st_mode):
            swap_in("sock", target)
            hits += 1
            time.sleep(0.05)
            try:
                os.unlink("sock")
            except FileNotFoundError:
                pass
    elif mode == "dsock":
        # a socket file at sub/dsock exists only between the bind and its unlink:
        # make "sub" lead into a root-owned directory for that unlink
        try:
            os.lstat("sub/dsock")
        except (FileNotFoundError, NotADirectoryError):
            continue
        os.rename("sub", "sub.old")
        os.symlink(target, "sub")
        hits += 1
        with open(hits_file, "w") as f:
            f.write(str(hits))
        time.sleep(0.05)
        os.unlink("sub")
        os.rename("sub.old", "sub")
    else:  # data: a symlink to the root file half of the time
        swap_in("data", target)
        time.sleep(random.random() * 0.002)
        tmp = "data.keep"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.link("keep", tmp)
        os.rename(tmp, "data")
        hits += 1
        time.sleep(random.random() * 0.002)
with open(hits_file, "w") as f:
    f.write(str(hits))
"""


def spawn_hostfs(e2e):
    w = e2e.spawn("hostfs", wrapper=[*OWN_CWD, *AS_NOBODY])
    assert proc_status(w.pid)["Uid"].split() == [str(NOBODY)] * 4
    return w


def test_hostfs_round_trip(e2e):
    """The socket file comes back with its mode and owner, the deleted name stays
    deleted, the file is the process's own."""
    w = spawn_hostfs(e2e)
    dump_restore_verify(e2e, w)
    st = os.lstat(w.cwd / "sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert not (w.cwd / "sub" / "dsock").exists()


def _root_files(base: Path) -> tuple[Path, Path]:
    """A root-owned 0600 file, and a root-owned directory holding one named dsock."""
    secret = base / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    rdir = base / "rootdir"
    rdir.mkdir(mode=0o755)
    (rdir / "dsock").write_bytes(SECRET)
    os.chmod(rdir / "dsock", 0o600)
    return secret, rdir


def _assert_untouched(secret: Path, rdir: Path, round_: int) -> None:
    for p in (secret, rdir / "dsock"):
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode), f"round {round_}: {p} is no longer a regular file"
        assert stat.S_IMODE(st.st_mode) == 0o600, (
            f"round {round_}: root changed the mode of {p} to {stat.S_IMODE(st.st_mode):o}"
        )
        assert (st.st_uid, st.st_gid) == (0, 0), f"round {round_}: {p} changed owner"
        assert p.read_bytes() == SECRET, f"round {round_}: {p} changed content"


@pytest.mark.parametrize("mode", ["sock", "dsock", "data"])
def test_symlink_swap_never_wins(e2e, mode):
    """Restore again and again while a racer (as nobody) swaps the socket name, the
    deleted socket's directory or the open file's name for a symlink to root's files."""
    w = spawn_hostfs(e2e)
    data_ino = os.stat(w.cwd / "data").st_ino
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    secret, rdir = _root_files(e2e.base)
    target = str(rdir) if mode == "dsock" else str(secret)
    stop, hits = w.cwd / "racer.stop", w.cwd / "racer.hits"  # where nobody can see them
    racer = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", RACER, mode, target, stop.name, hits.name],
        cwd=w.cwd,
        stdin=subprocess.DEVNULL,
    )
    restored = 0
    try:
        r = 0
        # at least ROUNDS restores; more (up to 4x) until the racer has struck once
        while r < ROUNDS or (mode != "dsock" and r < 4 * ROUNDS and not _hits(hits)):
            r += 1
            res = e2e.ckpt("restore", "-D", str(image), "--detach")
            assert res.returncode in (0, 10, 11), str(res)
            assert "Traceback" not in res.stderr, str(res)
            if res.returncode == 0:
                restored += 1
                pid = int(res.stdout.split()[-1])
                assert pid == w.pid
                e2e.adopt(pid)
                wait_until(lambda pid=pid: proc_status(pid)["TracerPid"] == "0", what="untraced")
                got = os.stat(f"/proc/{pid}/fd/{w.ready['data_fd']}")
                assert got.st_ino == data_ino, (
                    f"round {r}: the restored process holds another file at its data fd "
                    f"(inode {got.st_ino}; root's secret is {os.stat(secret).st_ino})"
                )
                os.kill(pid, signal.SIGKILL)
                e2e.reap_adopted(pid)
            _assert_untouched(secret, rdir, r)
    finally:
        stop.touch()
        try:
            racer.wait(30)
        except subprocess.TimeoutExpired:
            racer.kill()
            racer.wait()
    _assert_untouched(secret, rdir, r)
    if mode == "dsock":
        # a deleted name is bound in ckpt's private directory (restore/unixnames.py): it
        # never appears at its path, so the racer never finds anything to swap
        assert _hits(hits) == 0, "the deleted socket name appeared on the host"
    else:
        assert _hits(hits) > 0, "the racer never swapped anything: the race was not exercised"
    if mode == "sock":
        assert restored > 0, "no restore succeeded"


def _hits(p: Path) -> int:
    try:
        return int(p.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0
