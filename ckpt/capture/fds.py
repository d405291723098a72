"""File descriptors → model Fds; anything not supported fails the dump, naming the fd."""

from __future__ import annotations

import os
import stat as statmod

from ..errors import NoSuchProcess, UnsupportedProcess
from ..kernel import procfs
from ..kernel.process import same_open_file
from ..model import Fd
from .vmas import file_ref

O_CLOEXEC = 0o2000000
# character devices that reopen by path with no state: null, zero, full, random, urandom
SIMPLE_CHR = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}


def capture_fds(pid: int, skip: frozenset[int] | set[int] = frozenset()) -> list[Fd]:
    """`skip`: ckpt's own fds living in the target (persistent tracking)."""
    out: list[Fd] = []
    seen: dict[tuple[int, int], list[int]] = {}
    for fd in procfs.fds(pid):
        if fd in skip:
            continue
        try:
            target = procfs.readlink(pid, "fd", str(fd))
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            info = procfs.parse_fdinfo(procfs.read_bytes(pid, "fdinfo", str(fd)))
        except FileNotFoundError as exc:  # closed while we looked (cannot happen when stopped)
            raise NoSuchProcess(f"fd {fd} of {pid} vanished", pid=pid) from exc
        flags = info.flags & ~O_CLOEXEC
        cloexec = bool(info.flags & O_CLOEXEC)
        key = (st.st_dev, st.st_ino)
        dup_of = next((o for o in seen.get(key, []) if same_open_file(pid, o, fd)), -1)
        seen.setdefault(key, []).append(fd)
        if dup_of >= 0:
            out.append(Fd(fd=fd, kind="dup", path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, dup_of=dup_of))  # fmt: skip
            continue
        if statmod.S_ISREG(st.st_mode):
            if target.endswith(" (deleted)") or not target.startswith("/"):
                raise UnsupportedProcess(
                    f"fd {fd} refers to a deleted or unreachable file ({target})", pid=pid
                )
            out.append(Fd(fd=fd, kind="file", path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, file=file_ref(target, st)))  # fmt: skip
            continue
        if target == "anon_inode:[userfaultfd]" and _is_ckpt_tracking(info.extra):
            continue  # a snapshot store's tracking fd (ckpt's own, see track/uffd_wp.py)
        if (
            statmod.S_ISCHR(st.st_mode)
            and (os.major(st.st_rdev), os.minor(st.st_rdev)) in SIMPLE_CHR
        ):
            out.append(Fd(fd=fd, kind="chr", path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, rdev=st.st_rdev))  # fmt: skip
            continue
        raise UnsupportedProcess(f"fd {fd} is {_describe(target, st)}: not supported yet", pid=pid)
    return out


def _is_ckpt_tracking(extra: dict[str, str]) -> bool:
    """ckpt's persistent tracking uffd: WP_ASYNC|WP_UNPOPULATED and nothing else.

    No application asks for exactly that feature set (it only serves write
    tracking from outside), so this does not hide an application's own uffd.
    """
    parts = extra.get("API", "").split(":")
    try:
        return len(parts) == 3 and int(parts[1], 16) & 0xFFFF == 0xA000
    except ValueError:
        return False


def _describe(target: str, st: os.stat_result) -> str:
    if statmod.S_ISFIFO(st.st_mode):
        return f"a pipe/FIFO ({target})"
    if statmod.S_ISSOCK(st.st_mode):
        return f"a socket ({target})"
    if statmod.S_ISCHR(st.st_mode):
        return f"a character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} ({target})"
    if statmod.S_ISDIR(st.st_mode):
        return f"a directory ({target})"
    if target.startswith("anon_inode:"):
        return f"an {target[11:]} ({target})"
    return f"an unsupported file type ({target})"
