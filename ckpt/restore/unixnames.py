"""Unix socket names whose file was deleted (Socket.name_deleted; restore/sockets.py).

A socket stays bound to its name after its file is unlinked: getsockname still
returns it, and nobody can reach the socket by it any more. To give the restored
socket exactly that name without making the path appear on the host again (or
failing because something else holds it now, or its directory is gone), the
restorer binds it inside a private directory made its root for the call: ckpt makes
a directory only root may enter (mkdtemp, 0700) with the name's directories inside;
the restorer keeps O_PATH fds of its root and cwd, enters the directory (fchdir +
chroot(".")), binds — sun_path exactly the dumped name; an absolute name and a
relative one (the cwd is that directory too) both resolve inside — then goes back
(fchdir + chroot(".") to its old root, fchdir to its cwd). Sockets of the image that
connect to such a name (a connection rebuilt through its listener, a queued client,
a dgram peer) connect the same way, and ckpt's own sends to it go to the socket file
in the private directory. The directory, with the socket files, is removed once the
process's sockets are built.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from ..errors import RestoreError
from ..kernel import abi, syscalls
from ..kernel.remote import Injector
from . import hostfs

UNIX_PATH_MAX = 108


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


class PrivateNames:
    """The private directory of one process's socket restore (made when first needed)."""

    def __init__(self, inj: Injector):
        self.inj = inj
        self.dir: str | None = None

    def _prepare(self, name: bytes) -> str:
        """The directory made (once) and the name's directories in it; the socket file's
        path as ckpt sees it."""
        rel = os.fsdecode(name).lstrip("/")
        if ".." in rel.split("/"):
            raise RestoreError(
                f"cannot rebuild a unix socket bound to {os.fsdecode(name)!r}, a deleted name "
                "with '..' in it"
            )
        if self.dir is None:
            self.dir = os.path.realpath(tempfile.mkdtemp(prefix="ckpt-names-"))
        os.makedirs(os.path.join(self.dir, os.path.dirname(rel)), mode=0o700, exist_ok=True)
        return os.path.join(self.dir, rel)

    def host_path(self, name: bytes) -> bytes:
        """Where ckpt itself reaches the socket bound to the deleted `name`."""
        path = os.fsencode(self._prepare(name))
        if len(path) >= UNIX_PATH_MAX:
            raise RestoreError(
                f"cannot send to the unix socket bound to the deleted name "
                f"{os.fsdecode(name)!r}: its path in ckpt's private directory is too long"
            )
        return path

    @contextlib.contextmanager
    def inside(self, name: bytes) -> Iterator[None]:
        """The restorer's injected calls inside resolve paths in the private directory
        (its root and cwd for the while). Needs CAP_SYS_CHROOT (a restore as root)."""
        self._prepare(name)
        inj = self.inj
        flags = abi.O_PATH | abi.O_DIRECTORY | abi.O_CLOEXEC
        opened: list[int] = []
        try:
            opened.append(hostfs.open_resolved(inj, "/", flags))
            opened.append(syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr("."), flags, 0))
            opened.append(hostfs.open_resolved(inj, self.dir, flags))
            root, cwd, there = opened
            syscalls.fchdir(inj, there)
            try:
                syscalls.chroot(inj, inj.cstr("."))
                try:
                    yield
                finally:
                    syscalls.fchdir(inj, root)
                    syscalls.chroot(inj, inj.cstr("."))
            finally:
                syscalls.fchdir(inj, cwd)
        finally:
            for fd in opened:
                syscalls.close(inj, fd)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
