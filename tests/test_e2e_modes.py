"""End to end: dump and restore modes (--leave-running, --new-pid, --detach) and
`ckpt show` on a real image."""

from __future__ import annotations

import json
import os
import time

from helpers import (
    assert_error,
    assert_same_maps,
    copies,
    dir_digest,
    maps_for_compare,
    proc_alive,
    proc_status,
    signal_state,
    untraced_and_running,
    wait_until,
)


def test_leave_running_then_restore_needs_new_pid(e2e):
    """--leave-running: the original runs on untouched; restoring over it is exit 9
    (suggesting --new-pid); --new-pid makes a second, independent, correct copy."""
    w = e2e.spawn("memory", "16")
    sig_before = signal_state(w.pid)
    maps_before = maps_for_compare(w.pid)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")
    assert w.popen.poll() is None, "the original died after dump --leave-running"
    assert signal_state(w.pid) == sig_before
    assert_same_maps(maps_before, maps_for_compare(w.pid), "after dump --leave-running")

    digest = dir_digest(image)
    res = e2e.ckpt("restore", "-D", str(image), "--detach", timeout=120)
    assert_error(res, 9, "--new-pid")
    assert copies(w.ident) == [w.pid], "a failed restore left a process behind"

    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    new = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    assert new != w.pid
    v = e2e.verify(w, new)
    res = bg.wait()
    assert v.ok, v.line
    assert res.returncode == 0, str(res)
    assert v.fields["sum"] == w.ready["sum"]

    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke after dump --leave-running: {v0.line}"
    assert v0.fields["sum"] == w.ready["sum"]
    assert w.reap() == 0
    assert dir_digest(image) == digest


def test_detach_prints_pid_and_process_runs_on(e2e):
    """--detach: ckpt returns 0 at once and prints the PID; the process lives on
    without ckpt (its parent is gone) and still verifies; the image is unchanged."""
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)

    res = e2e.ckpt("restore", "-D", str(image), "--detach", timeout=120)
    assert res.returncode == 0, str(res)
    assert res.stdout.split(), f"--detach printed no PID\n{res}"
    pid = int(res.stdout.split()[-1])
    e2e.adopt(pid)
    assert pid == w.pid, "restore without --new-pid must reuse the original PID"
    e2e.wait_restored(pid, w.ident)
    time.sleep(0.5)
    assert proc_alive(pid), "the detached process died on its own"
    assert proc_status(pid)["PPid"] == str(os.getpid()), "ckpt should be gone, not its parent"
    v = e2e.verify(w, pid)
    assert v.ok, v.line
    assert v.fields["sum"] == w.ready["sum"]
    assert e2e.reap_adopted(pid) == 0, "the detached process should exit 0 after VERIFY OK"
    assert dir_digest(image) == digest, "restore modified the image"


def _num(x) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, str):
        for base in (0, 16):
            try:
                return int(x, base)
            except ValueError:
                pass
    return None


def test_show_json_lists_process_vmas_and_fds(e2e):
    """`ckpt show --json` decodes the image: process identity, the VMAs (a known
    file mapping's address is there) and the fds (stdout is the log file)."""
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    e2e.dump_ok(w, image)

    res = e2e.ckpt("show", str(image), "--json")
    assert res.returncode == 0, str(res)
    data = json.loads(res.stdout)
    assert data["process"]["pid"] == w.pid
    assert data["process"]["comm"] == "ckmem"

    pfile = int(w.ready["pfile"], 16)
    vmas = data["vmas"]
    assert vmas and all("start" in v and "end" in v for v in vmas), (
        f"each vma needs start/end; first: {vmas[:1]}"
    )
    hits = [v for v in vmas if _num(v["start"]) <= pfile < _num(v["end"])]
    assert hits, f"no VMA covers the private file mapping at {pfile:#x}"
    assert "private.dat" in json.dumps(hits[0]), f"VMA does not name its file: {hits[0]}"

    fds = {f.get("fd"): f for f in data["fds"]}
    assert 1 in fds and 2 in fds, f"stdout/stderr missing from fds: {sorted(fds, key=str)}"
    assert str(w.log) in json.dumps(fds[1]), f"fd 1 should be {w.log}: {fds[1]}"

    res = e2e.ckpt("show", str(image))
    assert res.returncode == 0, str(res)
    assert str(w.pid) in res.stdout
