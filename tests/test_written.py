"""End to end: a file a process writes at its own offset (write-only, no O_APPEND; `sh`'s
`exec 3>file`) is restored as it was at the dump (issue 14, redis during BGSAVE;
docs/ARCHITECTURE.md "Files being written"): its content in the image is put back
when the file changed since, the file is made again when its name is gone, and a
file too large to copy must be unchanged or the restore is refused. tests/test_redis.py
test_redis_during_bgsave does the same with a real BGSAVE.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import DEADLINE, Workload, assert_error, proc_status, wait_until

from ckpt.capture.written import WRITTEN_MAX

DUMPED = b"written before the dump\n"


def writer(e2e, name: str, big: bool = False) -> tuple[Workload, object]:
    """`sleep` holding fd 3 on out.dat (O_WRONLY|O_CREAT|O_TRUNC), with DUMPED written
    through it (and, if big, made sparse beyond the copy limit first)."""
    cwd = e2e.path(name)
    cwd.mkdir()
    f = cwd / "out.dat"
    grow = f"truncate -s {WRITTEN_MAX + (1 << 20)} out.dat; " if big else ""
    script = f"exec 3>out.dat; {grow}printf '{DUMPED.decode().strip()}\\n' >&3; echo READY; exec sleep 600"
    log = cwd.with_suffix(".log")
    with open(log, "ab") as out:
        popen = subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)  # fmt: skip
    w = Workload(name, popen, log, cwd)
    e2e.workloads.append(w)
    wait_until(lambda: b"READY" in log.read_bytes() and _sleeping(popen.pid), DEADLINE, "sleep")
    return w, f


def _sleeping(pid: int) -> bool:
    st = proc_status(pid)
    return st is not None and st["Name"] == "sleep"


def _pos(pid: int) -> int:
    with open(f"/proc/{pid}/fdinfo/3") as fi:
        return int(fi.readline().split()[1])


def _dump_leave_running(e2e, w: Workload):
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    return image


def _restore_ok(e2e, w: Workload, image) -> str:
    w.popen.kill()
    assert w.reap() == -signal.SIGKILL
    res = e2e.ckpt("restore", "-D", str(image), "--detach")
    assert res.returncode == 0, str(res)
    e2e.adopt(w.pid)
    wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", DEADLINE, "restored")
    return res.stderr


@pytest.mark.parametrize("change", ["grown", "overwritten", "unchanged"])
def test_changed_file_put_back(e2e, change):
    w, f = writer(e2e, f"written-{change}")
    st = f.stat()
    image = _dump_leave_running(e2e, w)
    if change == "grown":
        with open(f, "ab") as out:
            out.write(b"written by the original after the dump\n")
    elif change == "overwritten":
        with open(f, "r+b") as out:
            out.write(b"X" * 7)
    said = _restore_ok(e2e, w, image)
    assert ("its content as at the dump is put back" in said) == (change != "unchanged"), said
    assert f.read_bytes() == DUMPED
    after = f.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_mode) == (
        st.st_ino,
        st.st_mtime_ns,
        st.st_mode,
    )
    assert _pos(w.pid) == len(DUMPED)
    os.kill(w.pid, signal.SIGKILL)


def test_gone_file_made_again(e2e):
    w, f = writer(e2e, "written-gone")
    os.chmod(f, 0o640)
    st = f.stat()
    image = _dump_leave_running(e2e, w)
    os.rename(f, f.with_name("renamed.dat"))
    said = _restore_ok(e2e, w, image)
    assert "was gone since the dump: made again" in said, said
    assert f.read_bytes() == DUMPED
    after = f.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (
        st.st_mode,
        st.st_uid,
        st.st_mtime_ns,
    )
    assert os.stat(f"/proc/{w.pid}/fd/3").st_ino == after.st_ino  # the fd is that file
    assert _pos(w.pid) == len(DUMPED)
    os.kill(w.pid, signal.SIGKILL)


def test_replaced_file_refused(e2e):
    w, f = writer(e2e, "written-replaced")
    image = _dump_leave_running(e2e, w)
    f.unlink()
    f.write_bytes(b"another file\n")
    w.popen.kill()
    w.reap()
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 10, "out.dat", "replaced")
    assert f.read_bytes() == b"another file\n"


def test_too_large_file_must_be_unchanged(e2e):
    """A file beyond the copy limit keeps no content: changed, the restore is refused
    (exit 10) and the file is left as it is; unchanged, it restores."""
    w, f = writer(e2e, "written-big", big=True)
    image = _dump_leave_running(e2e, w)
    with open(f, "r+b") as out:
        out.seek(100)
        out.write(b"changed")
    w.popen.kill()
    w.reap()
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 10, "out.dat", "changed since the dump", "at its offset", "no copy")
    assert f.read_bytes()[100:107] == b"changed"
