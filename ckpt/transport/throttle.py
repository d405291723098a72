"""Throttle: ckpt's side of the throttle helper process (kernel/throttle_helper.py).

The helper is started on the first non-zero level (most migrations never need
it). Every command waits for the helper's answer, so when lift() returns the
target is running at full speed again; the convergence controller relies on
that before the final freeze (a SIGSTOP landing during a ptrace freeze would be
captured as a pending stop). Any trouble with the helper disables throttling
with one warning; it never fails the migration.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

MODES = ("auto", "cgroup", "signal", "off")
DEFAULT_PERIOD = 1.0  # s; long enough that a paced writer cannot catch up within one period
REPLY_TIMEOUT = 10.0


class Throttle:
    def __init__(
        self,
        pid: int,
        starttime: int,
        mode: str = "auto",
        *,
        period: float = DEFAULT_PERIOD,
        warn: Callable[[str], None] = lambda msg: None,
    ):
        if mode not in MODES:
            raise ValueError(f"throttle mode {mode!r} not in {MODES}")
        self.pid = pid
        self.starttime = starttime
        self.mode = mode
        self.period = period
        self.warn = warn
        self.backend = "off" if mode == "off" else "none yet"
        self.where = ""
        self.level = 0.0
        self.max_level = 0.0
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._broken = mode == "off"

    # -- commands ---------------------------------------------------------------------

    def set(self, level: float) -> float:
        """Apply `level` (fraction of CPU time taken away); returns the level in effect."""
        if self._broken:
            return 0.0
        if level <= 0 and self._proc is None:
            return 0.0
        if self._proc is None and not self._start():
            return 0.0
        if self._command(f"level {level:.3f}") is None:
            return 0.0
        self.level = level
        self.max_level = max(self.max_level, level)
        return level

    def lift(self) -> None:
        """Full speed again; returns once the helper confirms (the process is running)."""
        if self._proc is not None and self.level > 0:
            self._command("lift")
        self.level = 0.0

    def close(self) -> None:
        """Lift and end the helper (EOF on its stdin makes it undo everything)."""
        proc, self._proc = self._proc, None
        self.level = 0.0
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._sigcont_fallback()
        proc.stdout.close()

    # -- the helper -------------------------------------------------------------------

    def _start(self) -> bool:
        argv = [
            sys.executable, "-m", "ckpt.kernel.throttle_helper",
            str(self.pid), str(self.starttime), self.mode, f"{self.period:g}",
        ]  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True,  # a Ctrl-C must not kill it first
            )  # fmt: skip
        except OSError as exc:
            return self._give_up(f"cannot start the throttle helper: {exc}")
        line = self._reply()
        if line is None or not line.startswith("ready "):
            return self._give_up(f"throttling unavailable: {line or 'no answer'}")
        fields = dict(w.partition("=")[::2] for w in line.split()[1:])
        self.backend = fields.get("backend", "?")
        self.where = line.partition("where=")[2]
        return True

    def _command(self, text: str) -> str | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            self._give_up("the throttle helper died")
            return None
        line = self._reply()
        if line is None or not line.startswith("ok"):
            self._give_up(f"the throttle helper failed: {line or 'no answer'}")
            return None
        return line

    def _reply(self) -> str | None:
        """One line from the helper, waiting at most REPLY_TIMEOUT."""
        proc = self._proc
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            data = os.read(fd, 4096)
            if not data:
                return None
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def _give_up(self, why: str) -> bool:
        self.warn(f"{why}; continuing without throttling")
        self._broken = True
        self.close()
        return False

    def _sigcont_fallback(self) -> None:
        """The helper hung: make sure the target is not left stopped by it."""
        import signal

        if self.backend == "signal":
            try:
                os.kill(self.pid, signal.SIGCONT)
            except OSError:
                pass
