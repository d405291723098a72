"""The restorer child (clone3 + set_tid into a raw pause loop, see native/areas/spawn.py)."""

from __future__ import annotations

import errno

from ..errors import KernelError, PidInUse
from .native import lib


def spawn_restorer(pid: int | None) -> int:
    """Fork a child parked in a pause loop; with `pid`, it gets exactly that PID."""
    r = lib.ck_spawn_restorer(pid or 0)
    if r == -errno.EEXIST:
        raise PidInUse(f"PID {pid} is in use by another process; restore with --new-pid", pid=pid)
    if r == -errno.EPERM:
        raise KernelError("clone3 with set_tid needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN")
    if r in (-errno.ENOSYS, -errno.E2BIG):
        raise KernelError("this kernel lacks clone3 set_tid; restore with --new-pid")
    if r == -errno.EINVAL and pid:
        raise KernelError(
            f"cannot create PID {pid} here (outside pid_max?); restore with --new-pid"
        )
    if r < 0:
        raise KernelError(f"clone3 failed: errno {-r}")
    return int(r)


def pause_syscall_addr() -> int:
    """Address of the `syscall` instruction of the restorer's pause loop (same in the child)."""
    return int(lib.ck_pause_syscall_addr())
