"""fds 0-2 that lead outside the dump (issue 14): a service's stdout is a pipe to a
log process (`cmd | tee`, a supervisor), its stderr a socket to a collector
(journald's stream socket). ckpt dumps them without any flag as external endpoints;
the restore gives them the restoring ckpt's own fds 0-2 (what the systemd unit or
shell redirect running the restore set up), or what `--inherit-fd` names, and says so
in one line. The workload (tests/workloads/logger.c) counts its lines in memory, so
the lines after the restore go on from where the dump left them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from helpers import CKPT, DEADLINE, assert_error, proc_status, wait_until
from test_tree import reap_orphans


def _numbers(text: str, word: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith(word + " ")]


class Service:
    """logger with stdout → a pipe read by `cat` (into out.log) and stderr → one end of
    a socketpair whose other end a collector thread-free subprocess copies to err.log."""

    def __init__(self, e2e):
        self.e2e = e2e
        d = e2e.path("svc")
        d.mkdir()
        self.dir = d
        self.out_log, self.err_log = d / "out.log", d / "err.log"
        r, self.pipe_w = os.pipe()
        self.sock_svc, sock_col = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with open(self.out_log, "wb") as out:
            self.cat = subprocess.Popen(["cat"], stdin=r, stdout=out, cwd=d)
        collector = "import sys,os\nwhile (b := os.read(0, 65536)): sys.stdout.buffer.write(b); sys.stdout.flush()"
        with open(self.err_log, "wb") as err:
            self.col = subprocess.Popen(["python3", "-c", collector], stdin=sock_col, stdout=err,
                                        cwd=d)  # fmt: skip
        os.close(r)
        sock_col.close()
        self.svc = subprocess.Popen(
            [str(e2e.bins["logger"])], stdin=subprocess.DEVNULL, stdout=self.pipe_w,
            stderr=self.sock_svc.fileno(), cwd=d, start_new_session=True,
        )  # fmt: skip
        self.pid = self.svc.pid
        e2e.adopt(self.pid)

    def last(self, which: str) -> int:
        path = self.out_log if which == "out" else self.err_log
        got = _numbers(path.read_text(errors="replace"), which)
        return got[-1] if got else 0

    def close(self) -> None:
        for p in (self.svc, self.cat, self.col):
            if p.poll() is None:
                p.kill()
        os.close(self.pipe_w)
        self.sock_svc.close()
        for p in (self.svc, self.cat, self.col):
            p.wait()


def _dump(e2e, svc: Service):
    wait_until(lambda: svc.last("out") > 5 and svc.last("err") > 5, DEADLINE, "log lines")
    image = e2e.path("img")
    res = e2e.dump(svc.pid, image)
    assert res.returncode == 0, str(res)
    assert svc.svc.wait(DEADLINE) == -signal.SIGKILL
    return image, svc.last("out"), svc.last("err")


def test_stdout_pipe_and_stderr_socket_go_to_the_restoring_ckpt(e2e):
    """Dumped with no flag; `ckpt restore` run with stdout into the same `cat` pipe and
    stderr into the collector's socket (as a unit would set them up) — the next lines
    arrive there, numbered on from the dump."""
    svc = Service(e2e)
    try:
        image, out_n, err_n = _dump(e2e, svc)
        res = subprocess.run(
            [*CKPT, "restore", "-D", str(image), "--detach"], stdin=subprocess.DEVNULL,
            stdout=svc.pipe_w, stderr=svc.sock_svc.fileno(), cwd=e2e.base, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0
        wait_until(lambda: svc.last("out") > out_n + 5, DEADLINE, "stdout lines after restore")
        wait_until(lambda: svc.last("err") > err_n + 5, DEADLINE, "stderr lines after restore")
        outs = _numbers(svc.out_log.read_text(), "out")
        # numbered on from where the dump left them: no restart from 1
        assert outs.count(1) == 1 and out_n + 1 in outs, outs[-20:]
        text = svc.err_log.read_text()
        assert f"fd 1 of {svc.pid} led outside the dump" in text, text[-2000:]
        assert f"fd 2 of {svc.pid} led outside the dump" in text, text[-2000:]
    finally:
        _kill(svc.pid)
        svc.close()


def test_inherit_fd_sends_them_elsewhere(e2e):
    """--inherit-fd 1=PATH and 2=FD: the lines go to a file and to an fd of the caller."""
    svc = Service(e2e)
    try:
        image, out_n, err_n = _dump(e2e, svc)
        path = e2e.path("restored-out.log")
        errs = e2e.path("restored-err.log")
        with open(errs, "wb") as f:
            res = subprocess.run(
                [*CKPT, "restore", "-D", str(image), "--detach", "--inherit-fd", f"1={path}",
                 "--inherit-fd", f"2={f.fileno()}"],
                stdin=subprocess.DEVNULL, capture_output=True, cwd=e2e.base, timeout=120,
                pass_fds=(f.fileno(),),
            )  # fmt: skip
        assert res.returncode == 0, res.stderr
        wait_until(lambda: path.exists() and _numbers(path.read_text(), "out"), DEADLINE, "out")
        wait_until(lambda: _numbers(errs.read_text(), "err"), DEADLINE, "err")
        assert _numbers(path.read_text(), "out")[0] == out_n + 1
        assert _numbers(errs.read_text(), "err")[0] == err_n + 1
    finally:
        _kill(svc.pid)
        svc.close()


def test_other_fds_to_the_outside_still_refused(e2e):
    """Only fds 0-2 are external endpoints: the same pipe as fd 5 is refused (exit 5)."""
    r, w = os.pipe()
    try:
        d = e2e.path("other")
        d.mkdir()
        p = subprocess.Popen(
            [str(e2e.bins["logger"])], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, pass_fds=(w,), cwd=d, start_new_session=True,
        )  # fmt: skip
        e2e.adopt(p.pid)
        wait_until(lambda: (proc_status(p.pid) or {}).get("State", "")[:1] in "SR", DEADLINE, "up")
        res = e2e.dump(p.pid, e2e.path("img-other"))
        assert_error(res, 5, f"fd {w} ", "pipe", "only fds 0-2")
        assert p.poll() is None, "a refused dump must leave the process running"
        p.kill()
        p.wait()
    finally:
        os.close(r)
        os.close(w)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + DEADLINE
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        reap_orphans([pid], timeout=DEADLINE)
        time.sleep(0.01)


def test_readme_systemd_recipe_with_a_journal_like_socket(e2e):
    """README's timer recipe on a service-shaped process (stdout a pipe to a log
    process, stderr a socket to a collector, as journald's): `snapshot --wait` twice,
    `gc --keep-last 1 …`, then after a crash `restore --store … --detach` from a unit
    whose stdout/stderr go to the journal again: the lines go on there."""
    svc = Service(e2e)
    store = e2e.path("store")
    try:
        wait_until(lambda: svc.last("out") > 5, DEADLINE, "log lines")
        for _ in range(2):
            res = e2e.ckpt("snapshot", str(svc.pid), "--store", str(store), "--wait", "60")
            assert res.returncode == 0, str(res)
        res = e2e.ckpt("gc", str(store), "--keep-last", "1", "--keep-hourly", "24",
                       "--keep-daily", "7", "--wait", "60")  # fmt: skip
        assert res.returncode == 0, str(res)
        os.kill(svc.pid, signal.SIGKILL)  # the crash
        assert svc.svc.wait(DEADLINE) == -signal.SIGKILL
        out_n = svc.last("out")
        res = subprocess.run(
            [*CKPT, "restore", "--store", str(store), "--detach"], stdin=subprocess.DEVNULL,
            stdout=svc.pipe_w, stderr=svc.sock_svc.fileno(), cwd=e2e.base, timeout=120,
        )  # fmt: skip
        assert res.returncode == 0
        # the snapshot's count is older than the crash: numbers repeat, then go on
        wait_until(lambda: len(_numbers(svc.out_log.read_text(), "out")) > out_n + 10,
                   DEADLINE, "lines from the restored service")  # fmt: skip
        wait_until(lambda: svc.last("err") > 0, DEADLINE, "stderr lines")
    finally:
        _kill(svc.pid)
        svc.close()
