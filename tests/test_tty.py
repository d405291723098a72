"""Terminals (issue 5): `ckpt dump --shell-job` takes a job started from a shell, and
`ckpt restore --shell-job` brings it back on the terminal ckpt runs on.

Everything runs on pseudo-terminals made here. A small "shell" (SHELL below) is the
session leader of a pty and runs one command as a job: a process group of its own,
in the foreground; it reports when the job stops (and continues it in the
foreground, like `fg`) and, when the job ends, its status, the terminal's
foreground group and whether ECHO is on. The job is tests/workloads/ttyjob.c; it
turns ECHO off, and after the restore checks its fds, group, session, foreground
and modes from inside (`VERIFY OK ...`) when a line typed into the master asks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import (
    CKPT,
    DEADLINE,
    POLL,
    Workload,
    assert_error,
    assert_no_process,
    dir_digest,
    image_complete,
    parse_line,
    proc_status,
    read_link,
    untraced_and_running,
    wait_until,
)

SHELL = r"""
import fcntl, os, signal, sys, termios
def say(msg):
    os.write(1, (msg + "\n").encode())
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
JOBSIGS = (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP)
for s in JOBSIGS:
    signal.signal(s, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpid())
    for s in JOBSIGS:
        signal.signal(s, signal.SIG_DFL)
    os.execv(sys.argv[1], sys.argv[1:])
try:
    os.setpgid(pid, pid)
except OSError:
    pass
say(f"SHELL job={pid}")
while True:
    _, st = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(st):
        break
    say(f"SHELL stopped={pid}")
    os.tcsetpgrp(0, pid)
    os.killpg(pid, signal.SIGCONT)
echo = int(bool(termios.tcgetattr(0)[3] & termios.ECHO))
code = os.waitstatus_to_exitcode(st)
say(f"SHELL done={pid} status={code} fg={os.tcgetpgrp(0)} echo={echo}")
"""

# the session leader of a pty itself (a daemon with its own terminal)
LEADER = r"""
import fcntl, os, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execv(sys.argv[1], sys.argv[1:])
"""


class Pty:
    """A pseudo-terminal; the test holds the master (what the terminal shows / types)."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        os.set_blocking(self.master, False)
        self.name = os.ttyname(self.slave)
        self.out = b""

    def pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):  # nothing yet / EIO: no slave open
                return
            if not chunk:
                return
            self.out += chunk

    def text(self) -> str:
        self.pump()
        return self.out.decode(errors="replace").replace("\r", "")

    def wait_line(
        self, word: str, watch: subprocess.Popen | None = None, timeout: float = DEADLINE
    ) -> tuple[list[str], dict[str, str]]:
        """The last line starting with `word` (its words and key=value fields)."""
        end = time.monotonic() + timeout
        while True:
            for line in reversed(self.text().splitlines()):
                if line.startswith(word):
                    return parse_line(line)
            if watch is not None and watch.poll() is not None:
                time.sleep(0.2)
                if not any(ln.startswith(word) for ln in self.text().splitlines()):
                    raise AssertionError(f"{word!r} never came; the terminal shows:\n{self.text()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"no {word!r} in {timeout}s; the terminal shows:\n{self.text()}"
                )
            time.sleep(POLL)

    def type(self, s: str) -> None:
        os.write(self.master, s.encode())

    def fg(self) -> int:
        """The terminal's foreground process group (TIOCGPGRP works on the master)."""
        return struct.unpack("i", fcntl.ioctl(self.master, termios.TIOCGPGRP, bytes(4)))[0]

    def echo(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Ttys:
    """The ptys of one test, and the processes that are not our children (ckpt under a
    shell, the job under ckpt): killed and reaped deepest-first before e2e's cleanup,
    since they only come back to us (the subreaper) once their parents are gone."""

    def __init__(self, e2e):
        self.e2e = e2e
        self.ptys: list[Pty] = []
        self.pids: list[int] = []

    def pty(self) -> Pty:
        self.ptys.append(Pty())
        return self.ptys[-1]

    def track(self, pid: int) -> None:
        self.pids.append(pid)
        self.e2e.adopt(pid)

    def cleanup(self) -> None:
        base = str(self.e2e.base)
        shells = [w.popen for w in self.e2e.workloads]
        for pid in self.pids:
            cwd = read_link(f"/proc/{pid}/cwd") or ""
            if cwd.startswith(base) and proc_status(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in shells:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in self.pids:
            end = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(POLL)
        for t in self.ptys:
            t.close()


@pytest.fixture
def ttys(e2e):
    t = Ttys(e2e)
    try:
        yield t
    finally:
        t.cleanup()


def run_on(e2e, pty: Pty, script: str, argv: list[str], cwd: Path) -> subprocess.Popen:
    """`script` as the session leader of `pty`, running argv; killed and reaped by e2e."""
    cwd.mkdir(exist_ok=True)
    popen = subprocess.Popen(
        [sys.executable, "-c", script, *argv],
        stdin=pty.slave, stdout=pty.slave, stderr=pty.slave,
        cwd=cwd, env=e2e.env(), start_new_session=True,
    )  # fmt: skip
    e2e.workloads.append(Workload("shell", popen, cwd / "unused.log", cwd))
    return popen


def start_job(ttys: Ttys, workload_bins, pty: Pty) -> tuple[int, subprocess.Popen]:
    """ttyjob as the foreground job of a shell on `pty`: (job pid, the shell)."""
    e2e = ttys.e2e
    shell = run_on(e2e, pty, SHELL, [str(workload_bins["ttyjob"])], e2e.path("ttyjob"))
    _, started = pty.wait_line("SHELL job=", shell)
    ttys.track(int(started["job"]))
    _, ready = pty.wait_line("READY", shell)
    return int(ready["pid"]), shell


def job_fields(pid: int) -> dict[str, int]:
    """pgrp, session and controlling terminal of pid, from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    f = raw[raw.rfind(b")") + 2 :].split()
    return {"pgrp": int(f[2]), "session": int(f[3]), "tty": int(f[4])}


def dump_job(ttys: Ttys, workload_bins) -> tuple[int, Pty, Path]:
    """A job on a fresh pty, dumped with --shell-job (the original killed, its shell gone)."""
    e2e = ttys.e2e
    a = ttys.pty()
    job, shell = start_job(ttys, workload_bins, a)
    assert not a.echo(), "the job should have turned ECHO off"
    image = e2e.path("img")
    res = e2e.dump(job, image, "--shell-job")
    assert res.returncode == 0, str(res)
    _, done = a.wait_line("SHELL done=", shell)
    assert done["status"] == "-9", f"the dump should have killed the job: {done}"
    shell.wait(DEADLINE)
    return job, a, image


def restored(e2e, pid: int, pty: Pty, watch: subprocess.Popen) -> None:
    e2e.adopt(pid)
    end = time.monotonic() + DEADLINE
    while True:
        st = proc_status(pid)
        if st and st["TracerPid"] == "0" and st["Name"].startswith("ttyjob"):
            return
        if watch.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"pid {pid} was not restored; the terminal shows:\n{pty.text()}")
        time.sleep(POLL)


def test_shell_job_moves_to_another_terminal(e2e, ttys, workload_bins):
    job, a, image = dump_job(ttys, workload_bins)
    info = json.loads(e2e.ckpt("show", str(image), "--json").stdout)
    tty_fds = {f["fd"]: f for f in info["fds"] if f["kind"] == "tty"}
    assert set(tty_fds) == {0, 3, 4}, info["fds"]  # 1 and 2 share fd 0's open file
    for f in tty_fds.values():
        assert f["tty"] == {"name": a.name, "pgid": job, "foreground": True}, f
    digest = dir_digest(image)

    b = ttys.pty()
    assert b.echo()
    shell = run_on(e2e, b, SHELL, [*CKPT, "restore", "--shell-job", "-D", str(image)], e2e.base)
    _, started = b.wait_line("SHELL job=", shell)
    ckpt_pid = int(started["job"])
    ttys.track(ckpt_pid)
    restored(e2e, job, b, shell)
    wait_until(lambda: b.fg() == job, what="the job to get the foreground of the new terminal")
    fields = job_fields(job)
    assert fields["pgrp"] == job, fields
    assert fields["session"] == shell.pid, f"not in the session of ckpt's terminal: {fields}"
    assert fields["tty"] == os.fstat(b.slave).st_rdev, fields
    assert not b.echo(), "the job's terminal mode (ECHO off) was not put on the new terminal"

    # ^Z stops the job; ckpt passes the stop on to its shell, whose `fg` brings both back
    b.type("\x1a")
    b.wait_line("SHELL stopped=", shell)
    wait_until(
        lambda: b.fg() == job and (proc_status(job) or {}).get("State", "T")[:1] in "RS",
        what="the job to be continued in the foreground",
    )

    b.type("verify tok42\n")
    words, v = b.wait_line("VERIFY", shell)
    assert words == ["VERIFY", "OK"], b.text()
    assert v["pid"] == str(job) and v["got"] == "tok42" and v["tty"] == b.name, v
    assert "verify tok42" not in b.text(), "the typed line was echoed: ECHO should be off"
    _, done = b.wait_line("SHELL done=", shell)
    assert done["status"] == "0", f"ckpt restore should exit with the job's status: {b.text()}"
    assert done["fg"] == str(ckpt_pid), "ckpt did not take the foreground back"
    assert done["echo"] == "1", "ckpt did not put its own terminal modes back"
    shell.wait(DEADLINE)
    assert dir_digest(image) == digest, "restore modified the image"


def test_terminal_fd_refused_without_shell_job(e2e, ttys, workload_bins):
    a = ttys.pty()
    job, shell = start_job(ttys, workload_bins, a)
    image = e2e.path("img")
    res = e2e.dump(job, image)
    assert_error(res, 5, "fd 0", a.name, "--shell-job")
    assert not image_complete(e2e, image)
    # migrate has no --shell-job: its refusal says how a shell job moves instead
    token = e2e.path("token")
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    res = e2e.ckpt("migrate", str(job), "--to", "127.0.0.1:9", "--token-file", str(token))
    assert_error(res, 5, "fd 0", a.name, "a migration cannot take a terminal")
    store = e2e.path("store")
    res = e2e.ckpt("snapshot", str(job), "--store", str(store))
    assert_error(res, 5, "fd 0", a.name, "--shell-job")
    res = e2e.ckpt("snapshot", str(job), "--store", str(store), "--shell-job")
    assert res.returncode == 0, str(res)  # snapshot has the flag; the job runs on
    info = json.loads(e2e.ckpt("show", str(store), "--json").stdout)
    assert {f["fd"] for f in info["fds"] if f["kind"] == "tty"} == {0, 3, 4}, info["fds"]
    wait_until(lambda: untraced_and_running(job), what="the job to run on untraced")
    a.type("ping tok7\n")  # still the terminal's foreground job, reading it
    _, pong = a.wait_line("PONG", shell)
    assert pong == {"pid": str(job), "got": "tok7"}, pong
    assert not a.echo(), "the job's terminal mode changed"
    assert shell.poll() is None


def test_restore_needs_shell_job_and_a_terminal(e2e, ttys, workload_bins):
    job, a, image = dump_job(ttys, workload_bins)
    digest = dir_digest(image)
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 2, "fd 0", a.name, "--shell-job")
    res = e2e.ckpt("restore", "--shell-job", "-D", str(image))  # stdin /dev/null, output files
    assert_error(res, 16, "--shell-job needs a terminal")
    assert_no_process(job)
    assert dir_digest(image) == digest, "a failed restore modified the image"


def test_session_leader_reattached_to_its_terminal(e2e, ttys, workload_bins):
    """A process that owns its terminal (a shell, a daemon with its own pty) whose master
    is held outside the dump (here by the test, as a terminal window would) is dumped;
    `restore --reattach-tty` makes that same terminal its controlling terminal again,
    with the modes it had, only while no other session has it. Without the flag the
    restore is refused, and a terminal that is gone is not taken."""
    a = ttys.pty()
    leader = run_on(e2e, a, LEADER, [str(workload_bins["ttyjob"])], e2e.path("ttyjob"))
    _, ready = a.wait_line("READY", leader)
    pid = int(ready["pid"])
    assert pid == leader.pid
    token = e2e.path("token")  # a migration cannot take that terminal: refused at once
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    res = e2e.ckpt("migrate", str(pid), "--to", "127.0.0.1:9", "--token-file", str(token))
    assert_error(res, 5, a.name, "a migration cannot take it", "--reattach-tty")
    image = e2e.path("img")
    res = e2e.dump(pid, image, "--shell-job")  # the flag is for jobs: a leader is not one
    assert res.returncode == 0, str(res)
    leader.wait(DEADLINE)
    digest = dir_digest(image)
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 2, a.name, "--reattach-tty")
    # another session has the terminal now: it is not taken from it
    other = run_on(e2e, a, LEADER, ["/bin/sleep", "600"], e2e.path("other"))
    wait_until(lambda: job_fields(other.pid)["tty"] == os.fstat(a.slave).st_rdev,
               what="the other session to take the terminal")  # fmt: skip
    res = e2e.ckpt("restore", "--reattach-tty", "-D", str(image))
    assert_error(res, 11, a.name, "controlling terminal of process", str(other.pid))
    other.kill()
    other.wait(DEADLINE)
    attrs = termios.tcgetattr(a.slave)
    attrs[3] |= termios.ECHO  # changed since the dump: the session's modes come back
    termios.tcsetattr(a.slave, termios.TCSANOW, attrs)
    bg = e2e.ckpt_bg("restore", "--reattach-tty", "-D", str(image))
    restored(e2e, pid, a, bg)
    fields = job_fields(pid)
    assert fields["session"] == pid and fields["pgrp"] == pid, fields
    assert fields["tty"] == os.fstat(a.slave).st_rdev, fields
    assert a.fg() == pid
    assert not a.echo(), "the session's terminal modes (ECHO off) were not put back"
    a.type("ping tok9\n")
    _, pong = a.wait_line("PONG", timeout=DEADLINE)
    assert pong == {"pid": str(pid), "got": "tok9"}, pong
    assert dir_digest(image) == digest, "restore modified the image"

    # the terminal is gone by the restore (its master closed): not taken, exit 11
    b = ttys.pty()
    leader = run_on(e2e, b, LEADER, [str(workload_bins["ttyjob"])], e2e.path("ttyjob"))
    _, ready = b.wait_line("READY", leader)
    image = e2e.path("img")
    res = e2e.dump(int(ready["pid"]), image)
    assert res.returncode == 0, str(res)
    leader.wait(DEADLINE)
    name = b.name
    b.close()
    b.master = b.slave = -1  # closed: the fixture must not close the numbers again
    res = e2e.ckpt("restore", "--reattach-tty", "-D", str(image))
    assert_error(res, 11, name)
    assert_no_process(int(ready["pid"]))
