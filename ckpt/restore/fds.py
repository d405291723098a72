"""Re-create a process's file descriptors inside the restorer, by injected syscalls.

Runs after memory and mm are in place and before signals and credentials (so
the restorer is still root and may open anything the dump could read).
"""

from __future__ import annotations

from ..errors import RestoreError
from ..kernel.remote import Injector, RemoteError
from ..model import ProcessImage

O_CREAT, O_EXCL, O_TRUNC, O_CLOEXEC = 0o100, 0o200, 0o1000, 0o2000000
AT_FDCWD = -100
F_SETFD, FD_CLOEXEC = 2, 1


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def restore_fds(inj: Injector, proc: ProcessImage) -> None:
    inj.call("close_range", 0, 0xFFFFFFFF, 0)
    for fd in sorted(proc.fds, key=lambda f: (f.kind == "dup", f.fd)):
        inj.reset_data()
        if fd.kind == "dup":  # shares the open file description of an fd restored before
            inj.call("dup3", fd.dup_of, fd.fd, O_CLOEXEC if fd.cloexec else 0)
            continue
        flags = fd.flags & ~(O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC)
        try:
            tmp = inj.call("openat", _u(AT_FDCWD), inj.cstr(fd.path), flags, 0)
        except RemoteError as exc:
            raise RestoreError(f"cannot reopen fd {fd.fd} ({fd.path}): {exc.strerror}") from exc
        if tmp != fd.fd:
            inj.call("dup3", tmp, fd.fd, O_CLOEXEC if fd.cloexec else 0)
            inj.call("close", tmp)
        elif fd.cloexec:
            inj.call("fcntl", fd.fd, F_SETFD, FD_CLOEXEC)
        if fd.kind == "file":
            inj.call("lseek", fd.fd, fd.pos, 0)
