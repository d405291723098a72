"""Act as another user for a few of ckpt's own path operations, in this thread only.

Linux credentials belong to each thread, and the raw setfsuid/setfsgid/setgroups
system calls (unlike glibc's wrappers, which broadcast setgroups to every thread)
change only the calling one. ckpt uses this for the few calls it makes itself with a
path another user may change, e.g. sending a queued datagram back to a restored unix
socket by its name (restore/sockets.py): the kernel then resolves the name and
checks the socket file as that user, so a name swapped for a link to a root-only
socket reaches nothing the user could not reach. ckpt's pool threads are not
affected, and everything is put back before the context ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import abi
from .native import check, ffi, syscall

NR_SETGROUPS, NR_SETFSUID, NR_SETFSGID = abi.NR_SETGROUPS, abi.NR_SETFSUID, abi.NR_SETFSGID
MAX_GROUPS = 65536


def _setgroups(groups: list[int]) -> None:
    arr = ffi.new("uint32_t[]", list(groups) or [0])
    check(syscall(NR_SETGROUPS, len(groups), int(ffi.cast("uintptr_t", arr))), "setgroups")


@contextlib.contextmanager
def as_fs_user(uid: int, gid: int, groups: list[int]) -> Iterator[None]:
    """fsuid/fsgid/groups of this thread set to uid/gid/groups inside the context."""
    me_uid, me_gid, mine = os.geteuid(), os.getegid(), os.getgroups()
    if (uid, gid) == (me_uid, me_gid) and sorted(groups) == sorted(mine):
        yield
        return
    want = list(groups)[:MAX_GROUPS]
    _setgroups(want)
    try:
        syscall(NR_SETFSGID, gid & 0xFFFFFFFF)
        syscall(NR_SETFSUID, uid & 0xFFFFFFFF)
        got = (syscall(NR_SETFSUID, 0xFFFFFFFF), syscall(NR_SETFSGID, 0xFFFFFFFF))
        if got != (uid, gid):
            raise PermissionError(f"cannot act as {uid}:{gid} (fsuid:fsgid stay {got})")
        yield
    finally:
        syscall(NR_SETFSUID, me_uid)
        syscall(NR_SETFSGID, me_gid)
        _setgroups(mine)
