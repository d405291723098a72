"""openat2(2) with RESOLVE_* flags, for ckpt's own opens and for injected ones.

The headers ckpt builds against are Linux 6.1's userspace API without <linux/openat2.h>
in some distributions, so the constants are declared here by hand (they are ABI):

    struct open_how { __u64 flags; __u64 mode; __u64 resolve; };   /* 24 bytes */

Why: a path a restore takes from the image (an open file, a mapped file, a FIFO, a
watched inode) is resolved on a host where other users may own directories along it.
Every such path came from the kernel (/proc/PID/fd, maps, exe: d_path, which never
contains a symbolic link), so resolving it with RESOLVE_NO_SYMLINKS loses nothing
and refuses a name that someone has turned into a link since the dump.
"""

from __future__ import annotations

import os
import struct

from . import abi
from .native import check, ffi, syscall

SYS_OPENAT2 = abi.NR_OPENAT2
AT_FDCWD = abi.AT_FDCWD

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04  # implies NO_MAGICLINKS
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20

OPEN_HOW_SIZE = 24
O_PATH = abi.O_PATH


def open_how(flags: int, mode: int = 0, resolve: int = 0) -> bytes:
    """The 24 bytes of a struct open_how."""
    return struct.pack("<QQQ", flags & 0xFFFFFFFFFFFFFFFF, mode, resolve)


def openat2(
    path: str | bytes, flags: int, resolve: int, *, mode: int = 0, dirfd: int = AT_FDCWD
) -> int:
    """ckpt's own openat2; OSError (ELOOP for a refused symlink, EXDEV for an escape
    from RESOLVE_BENEATH) naming the path. The fd is close-on-exec."""
    raw = os.fsencode(path)
    cpath = ffi.new("char[]", raw)
    how = ffi.new("uint64_t[3]", [flags | os.O_CLOEXEC, mode, resolve])
    ret = syscall(
        SYS_OPENAT2,
        dirfd,
        int(ffi.cast("uintptr_t", cpath)),
        int(ffi.cast("uintptr_t", how)),
        OPEN_HOW_SIZE,
    )
    if ret < 0:
        err = -ret
        raise OSError(err, f"openat2 failed: {os.strerror(err)}", os.fsdecode(raw))
    return check(ret, "openat2")


def open_nofollow(path: str | bytes, flags: int) -> int:
    """Open a path that came from the kernel (d_path) without following any symlink."""
    return openat2(path, flags, RESOLVE_NO_SYMLINKS)
