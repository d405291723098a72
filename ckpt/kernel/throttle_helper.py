"""The throttle helper process: slows a process down until told to stop, and always undoes it.

    python -m ckpt.kernel.throttle_helper PID STARTTIME MODE PERIOD

It reads commands on stdin (`level 0.75`, `lift`) and answers one line each on
stdout (`ok level=0.750`); the first line it prints is `ready backend=...` or
`error <why>`. When stdin reaches EOF — ckpt finished, failed, or was killed —
it lifts the throttle (SIGCONT / quota removed, process moved back) and exits.
That is why this is a process and not a thread in ckpt: a SIGKILLed ckpt must
not leave its target stopped or starved.

Backends:
  cgroup  cgroup v2 with the cpu controller: a child cgroup of the process's own,
          cpu.max = "quota period", the process moved in (and back afterwards)
  signal  SIGSTOP/SIGCONT duty cycle: stopped `level` of every period. Visible to
          the process only as time passing (and to a SIGCONT handler, if it has one)

It is host-process work (signals, cgroups, /proc), so it lives in kernel/; it imports
only kernel/procfs (no compiled extension), so it starts quickly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import sys
import time

from ..errors import AccessDenied, NoSuchProcess
from . import procfs


def _stat(pid: int) -> procfs.Stat | None:
    try:
        return procfs.stat(pid)
    except (OSError, NoSuchProcess, AccessDenied):
        return None


def starttime_of(pid: int) -> int | None:
    st = _stat(pid)
    return st.starttime if st else None


def state_of(pid: int) -> str | None:
    st = _stat(pid)
    return st.state if st else None


class SignalBackend:
    name = "signal"
    continuous = False  # needs the duty-cycle loop

    def __init__(self, pid: int, starttime: int):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        if starttime_of(pid) != starttime:  # the pidfd now pins the process we checked
            os.close(self.pidfd)
            raise ProcessLookupError(f"process {pid} is gone")
        self.stopped = False

    def describe(self) -> str:
        return "signal"

    def set(self, level: float) -> None:
        if level <= 0:
            self.cont()

    def stop(self) -> None:
        signal.pidfd_send_signal(self.pidfd, signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        if not self.stopped:
            return
        signal.pidfd_send_signal(self.pidfd, signal.SIGCONT)
        self.stopped = False
        deadline = time.monotonic() + 2.0
        while state_of(self.pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.cont()
        os.close(self.pidfd)


def cgroup2_mount() -> str | None:
    """Where cgroup v2 is mounted (any of its mounts), or None."""
    try:
        with open(procfs.path("self", "mountinfo")) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    return left.split()[4]
    except OSError:
        pass
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class CgroupBackend:
    """cpu.max in a child cgroup made for this process (cgroup v2)."""

    name = "cgroup"
    continuous = True

    def __init__(self, pid: int, starttime: int, period: float, mount: str | None = None):
        self.pid = pid
        self.period_us = max(1000, min(1_000_000, int(period * 1e6)))
        mount = mount or cgroup2_mount()
        if mount is None:
            raise OSError(errno.ENOENT, "cgroup v2 is not mounted")
        rel = None
        with open(procfs.path(pid, "cgroup")) as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip()
        if rel is None:
            raise OSError(errno.ENOENT, "the process is in no cgroup v2 group")
        self.home = os.path.join(mount, rel.lstrip("/"))
        if "cpu" not in _read(os.path.join(self.home, "cgroup.controllers")).split():
            raise OSError(errno.EOPNOTSUPP, "the cpu controller is not available there")
        if starttime_of(pid) != starttime:
            raise ProcessLookupError(f"process {pid} is gone")
        self.child = os.path.join(self.home, f"ckpt-throttle-{pid}")
        self.enabled_cpu = False
        os.mkdir(self.child)
        try:
            _write(os.path.join(self.child, "cgroup.procs"), str(pid))
            subtree = os.path.join(self.home, "cgroup.subtree_control")
            if "cpu" not in _read(subtree).split():
                _write(subtree, "+cpu")  # EBUSY if other processes live in home
                self.enabled_cpu = True
            self.set(0.0)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        return f"cgroup {self.child}"

    def set(self, level: float) -> None:
        if level <= 0:
            text = f"max {self.period_us}"
        else:
            text = f"{max(1000, int(self.period_us * (1 - level)))} {self.period_us}"
        _write(os.path.join(self.child, "cpu.max"), text)

    def close(self) -> None:
        """Undo in reverse: quota off, controller off (if we enabled it), move back, rmdir."""
        with contextlib.suppress(OSError):
            self.set(0.0)
        if self.enabled_cpu:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.home, "cgroup.subtree_control"), "-cpu")
        with contextlib.suppress(OSError):
            _write(os.path.join(self.home, "cgroup.procs"), str(self.pid))
        with contextlib.suppress(OSError):
            os.rmdir(self.child)


def make_backend(pid: int, starttime: int, mode: str, period: float):
    """cgroup if asked or available, else signals (mode auto); raises if none works."""
    if mode in ("auto", "cgroup"):
        try:
            return CgroupBackend(pid, starttime, period)
        except ProcessLookupError:
            raise
        except OSError as exc:
            if mode == "cgroup":
                raise OSError(exc.errno, f"cgroup throttling unavailable: {exc.strerror}") from None
    return SignalBackend(pid, starttime)


class Lines:
    """Lines from a raw fd, usable with select (no hidden buffering)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""
        self.eof = False

    def pop(self) -> str | None:
        if b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            return line.decode().strip()
        return None

    def fill(self) -> None:
        data = os.read(self.fd, 4096)
        if not data:
            self.eof = True
        self.buf += data


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def serve(backend, period: float, lines: Lines) -> None:
    """The command loop; with the signal backend also the duty cycle."""
    level = 0.0
    running = True  # duty-cycle phase
    phase_end = 0.0
    while True:
        line = lines.pop()
        if line is None:
            if lines.eof:
                return
            timeout = None
            if level > 0 and not backend.continuous:
                timeout = max(0.0, phase_end - time.monotonic())
            ready, _, _ = select.select([lines.fd], [], [], timeout)
            if ready:
                lines.fill()
                continue
            if running:  # the run phase ended: stop for level * period
                backend.stop()
                phase_end = time.monotonic() + period * level
            else:
                backend.cont()
                phase_end = time.monotonic() + period * (1 - level)
            running = not running
            continue
        word, _, arg = line.partition(" ")
        if word == "lift":
            new = 0.0
        elif word == "level":
            new = min(0.99, max(0.0, float(arg)))
        else:
            say(f"error unknown command {line!r}")
            continue
        if new <= 0:
            backend.set(0.0)  # the signal backend continues the process here
            running = True
        elif level <= 0 and not backend.continuous:
            running, phase_end = True, time.monotonic() + period * (1 - new)
        if backend.continuous:
            backend.set(new)
        level = new
        say(f"ok level={level:.3f}")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only EOF on stdin ends us
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    pid, starttime, mode, period = int(argv[0]), int(argv[1]), argv[2], float(argv[3])
    try:
        backend = make_backend(pid, starttime, mode, period)
    except Exception as exc:
        say(f"error {exc}")
        return 1
    try:
        say(f"ready backend={backend.name} where={backend.describe()}")
        serve(backend, period, Lines(0))
    except (ProcessLookupError, BrokenPipeError):
        pass
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
