"""The dump target as an identity (pid + start time), frozen and thawed on demand.

Between pre-copy rounds ckpt is not attached at all: a seized but running
tracee would stop on every signal it receives and wait for ckpt. Each freeze
re-seizes it, after checking it is still the same process (a PID can be
reused; psutil's (pid, create time) rule).
"""

from __future__ import annotations

from ..errors import AccessDenied, DumpError, NoSuchProcess, TraceeGone
from ..kernel import procfs
from ..kernel.ptrace import Tracee, seize_group


class Target:
    def __init__(self, pid: int, starttime: int):
        self.pid = pid
        self.starttime = starttime

    def alive(self) -> bool:
        try:
            st = procfs.stat(self.pid)
        except (NoSuchProcess, AccessDenied):
            return False
        return st.starttime == self.starttime and st.state not in ("Z", "X")

    def check(self) -> None:
        if not self.alive():
            raise DumpError(f"process {self.pid} exited during the dump", pid=self.pid)

    def freeze(self) -> Tracee:
        """Every thread stopped; the leader is returned, the others in `.others`."""
        self.check()
        try:
            t = seize_group(self.pid, procfs.tasks)
        except (NoSuchProcess, TraceeGone) as exc:
            raise DumpError(f"process {self.pid} exited during the dump", pid=self.pid) from exc
        try:
            self.check()
        except BaseException:
            if t.attached:
                try:
                    t.detach()
                except OSError:
                    pass
            raise
        return t
