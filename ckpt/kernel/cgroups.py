"""Cgroup membership: which cgroup a process is in in each hierarchy (v1 and v2),
where that cgroup is in ckpt's view of the filesystem, and moving a process there.

/proc/PID/cgroup has one line per hierarchy, `ID:CONTROLLERS:PATH` ("0::PATH" for
the v2 hierarchy; "name=systemd" for a named v1 one). A hierarchy is found in
/proc/self/mountinfo by its controllers (v1) or filesystem type (v2); its
hierarchy ID may differ on another host, its controllers do not. The path is
relative to the cgroup namespace's root, which ckpt shares with every process it
dumps (capture/security.py refuses the others).

Moving: the cgroup directory is opened with openat2 below the hierarchy's mount
(no symlinks, no other filesystem, nothing above it) and the PID written to its
cgroup.procs, so a path from an image can only ever name a cgroup.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import creds, procfs

CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC = 0x27E0EB, 0x63677270


@dataclass(frozen=True)
class Membership:
    hierarchy: int  # the ID on the host it was read on (0: the v2 hierarchy)
    controllers: str  # "" (v2), "cpu,cpuacct", "name=systemd", …
    path: str  # "/a/b", relative to the cgroup namespace's root

    @property
    def what(self) -> str:
        kind = f"v1 {self.controllers}" if self.controllers else "v2"
        return f"cgroup {self.path} ({kind} hierarchy)"


def parse(data: bytes) -> list[Membership]:
    out = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        if not line:
            continue
        hid, sep1, rest = line.partition(":")
        ctl, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and hid.isdigit() and path.startswith("/")):
            raise procfs.ProcParseError(f"cgroup: unexpected line {line!r}")
        out.append(Membership(int(hid), ctl, path))
    return out


def of(pid: int, tid: int | None = None) -> list[Membership]:
    parts = ("task", str(tid), "cgroup") if tid is not None else ("cgroup",)
    return parse(procfs.read_bytes(pid, *parts))


def _key(controllers: str) -> frozenset[str]:
    return frozenset(c for c in controllers.split(",") if c)


@dataclass(frozen=True)
class Mount:
    point: str  # mount point (unescaped)
    root: str  # the cgroup the mount shows at its top
    controllers: frozenset[str]  # empty: v2


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    """The cgroup hierarchies mounted in ckpt's view, v1 and v2."""
    with open(f"{procfs.PROC_ROOT}/self/mountinfo", "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    known = _v1_controllers()
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            out.append(Mount(point, root, frozenset()))
            continue
        opts = [o for o in tail[2].split(",") if o in known or o.startswith("name=")]
        out.append(Mount(point, root, frozenset(opts)))
    return out


def _v1_controllers() -> set[str]:
    try:
        with open(f"{procfs.PROC_ROOT}/cgroups", "rb") as f:
            lines = f.read().decode().splitlines()[1:]
    except OSError:
        return set()
    return {ln.split()[0] for ln in lines if ln.strip()}


def find_mount(m: Membership, mnts: list[Mount]) -> tuple[Mount, str] | None:
    """(mount, path below its top) where cgroup m can be reached here, or None."""
    want = _key(m.controllers)
    for mnt in mnts:
        if mnt.controllers != want:
            continue
        top = mnt.root.rstrip("/")
        if m.path == mnt.root or m.path.startswith(top + "/"):
            return mnt, m.path[len(top) :].lstrip("/")
    return None


class CgroupGone(OSError):
    """A cgroup of the image does not exist here (or cannot be reached safely)."""


def open_cgroup(m: Membership, mnts: list[Mount] | None = None) -> int:
    """O_PATH fd on cgroup m's directory, resolved below its hierarchy's mount point
    without following any symlink."""
    found = find_mount(m, mounts() if mnts is None else mnts)
    if found is None:
        raise CgroupGone(errno.ENOENT, f"{m.what}: that hierarchy is not mounted here")
    mnt, rel = found
    try:
        top = creds.open_dir_nofollow(mnt.point)
    except OSError as exc:
        raise CgroupGone(exc.errno, f"{m.what}: {mnt.point}: {exc.strerror}") from exc
    try:
        magic = creds.fs_magic(top)
        if magic not in (CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC):
            raise CgroupGone(errno.EXDEV, f"{m.what}: {mnt.point} is not a cgroup filesystem")
        if not rel:
            return os.dup(top)
        flags = creds.O_PATH | creds.O_DIRECTORY | creds.O_CLOEXEC
        resolve = (
            creds.RESOLVE_BENEATH | creds.RESOLVE_NO_SYMLINKS | creds.RESOLVE_NO_XDEV
            | creds.RESOLVE_NO_MAGICLINKS
        )  # fmt: skip
        try:
            return creds.openat2(top, rel, flags, resolve)
        except OSError as exc:
            why = "no longer exists" if exc.errno == errno.ENOENT else exc.strerror
            raise CgroupGone(exc.errno, f"{m.what} {why}") from exc
    finally:
        os.close(top)


def move(pid: int, m: Membership, mnts: list[Mount] | None = None) -> None:
    """Put process pid (all its threads) into cgroup m."""
    d = open_cgroup(m, mnts)
    try:
        fd = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=d)
    finally:
        os.close(d)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)
