"""Who a process is and what confines it, as /proc shows it from outside: credentials
and capabilities per thread, namespaces, root directory, loginuid, LSM label.

Everything here reads /proc (no injection); the per-thread values come from
/proc/PID/task/TID/status because credentials belong to each thread.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from ..errors import NoSuchProcess
from . import abi, procfs
from .native import ffi, lib

#: capability numbers → names (include/uapi/linux/capability.h), for messages
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
CAP_SETS = ("inheritable", "permitted", "effective", "bounding", "ambient")
_CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def cap_names(mask: int) -> str:
    out = []
    for i in range(64):
        if mask >> i & 1:
            out.append(CAP_NAMES[i] if i < len(CAP_NAMES) else f"capability {i}")
    return ", ".join(out) or "none"


def last_cap() -> int:
    try:
        with open(procfs.system("sys", "kernel", "cap_last_cap"), "rb") as f:
            return int(f.read())
    except OSError:  # pragma: no cover - every kernel since 3.2 has it
        return len(CAP_NAMES) - 1


@dataclass
class ThreadCreds:
    """One thread's credentials as its /proc status shows them."""

    uids: list[int]  # real, effective, saved, filesystem
    gids: list[int]
    groups: list[int]
    caps: list[int]  # inheritable, permitted, effective, bounding, ambient
    no_new_privs: bool
    seccomp_mode: int
    seccomp_filters: int


def parse_creds(status: dict[str, str]) -> ThreadCreds:
    try:
        uids = [int(x) for x in status["Uid"].split()]
        gids = [int(x) for x in status["Gid"].split()]
        caps = [int(status.get(k, "0"), 16) for k in _CAP_KEYS]
    except (KeyError, ValueError) as exc:
        raise procfs.ProcParseError(f"status: credentials: {exc}") from exc
    if len(uids) != 4 or len(gids) != 4:
        raise procfs.ProcParseError("status: Uid/Gid: four values expected")
    return ThreadCreds(
        uids=uids, gids=gids, groups=[int(x) for x in status.get("Groups", "").split()],
        caps=caps, no_new_privs=status.get("NoNewPrivs", "0") == "1",
        seccomp_mode=int(status.get("Seccomp", "0")),
        seccomp_filters=int(status.get("Seccomp_filters", "0")),
    )  # fmt: skip


def thread_creds(pid: int, tid: int) -> ThreadCreds:
    return parse_creds(procfs.parse_status(procfs.read_bytes(pid, "task", str(tid), "status")))


# ---------------------------------------------------------------- namespaces

#: namespaces a process must share with ckpt (or with this machine's init): a process
#: restored by ckpt lives in ckpt's. *_for_children: what its next children get.
NAMESPACES = (
    "pid", "pid_for_children", "net", "mnt", "uts", "ipc", "user", "cgroup", "time",
    "time_for_children",
)  # fmt: skip


#: the machine's initial namespaces have fixed inode numbers (include/linux/proc_ns.h;
#: net and mnt since 6.x): "net:[4026531833]" is the host's network namespace
INIT_NS_INO = {
    "ipc": 0xEFFFFFFF, "uts": 0xEFFFFFFE, "user": 0xEFFFFFFD, "pid": 0xEFFFFFFC,
    "pid_for_children": 0xEFFFFFFC, "cgroup": 0xEFFFFFFB, "time": 0xEFFFFFFA,
    "time_for_children": 0xEFFFFFFA, "net": 0xEFFFFFF9, "mnt": 0xEFFFFFF8,
}  # fmt: skip


def is_initial(kind: str, link: str) -> bool:
    """Is `link` ("uts:[4026531838]") the machine's initial namespace of that kind?"""
    return link == f"{kind.split('_')[0]}:[{INIT_NS_INO.get(kind, -1)}]"


def namespaces(pid: int | str) -> dict[str, str]:
    """{kind: "uts:[4026531838]"} for the kinds this kernel has."""
    out = {}
    for kind in NAMESPACES:
        try:
            out[kind] = os.readlink(procfs.path(pid, "ns", kind))
        except FileNotFoundError:
            if not os.path.exists(procfs.path(pid, "ns")):
                raise NoSuchProcess(f"no such process: {pid}", pid=pid) from None
        except PermissionError:
            continue
    if "mnt" in out and "pid" in out and "pid_for_children" not in out:
        # unshare(CLONE_NEWPID) and no child yet: the link shows nothing (a zombie, whose
        # namespaces are all gone, shows no mnt either)
        out["pid_for_children"] = "pid:[a new one, still empty]"
    return out


# ---------------------------------------------------------------- root, loginuid, LSM


def root(pid: int) -> tuple[str, int, int]:
    """(path as ckpt sees it, dev, ino) of the process's root directory."""
    path = procfs.readlink(pid, "root")
    st = os.stat(procfs.path(pid, "root"))
    return path, st.st_dev, st.st_ino


LOGINUID_UNSET = 0xFFFFFFFF


def loginuid(pid: int | str) -> int | None:
    """/proc/PID/loginuid (LOGINUID_UNSET when never set); None without audit support."""
    try:
        with open(procfs.path(pid, "loginuid"), "rb") as f:
            return int(f.read().strip())
    except FileNotFoundError:
        if isinstance(pid, int) and not os.path.exists(procfs.path(pid)):
            raise NoSuchProcess(f"no such process: {pid}", pid=pid) from None
        return None


def lsm_label(pid: int | str) -> str:
    """The process's LSM label (/proc/PID/attr/current), "" when no LSM labels
    processes here (the file then fails with EINVAL or does not exist)."""
    try:
        with open(procfs.path(pid, "attr", "current"), "rb") as f:
            raw = f.read()
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            return ""
        raise
    return raw.rstrip(b"\0\n").decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- safe path resolution

NR_OPENAT2, NR_FSTATFS = abi.NR_OPENAT2, abi.NR_FSTATFS
O_PATH, O_DIRECTORY = abi.O_PATH, abi.O_DIRECTORY
O_NOFOLLOW, O_CLOEXEC = abi.O_NOFOLLOW, abi.O_CLOEXEC
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 1, 2, 4, 8
AT_FDCWD = abi.AT_FDCWD


def open_how(flags: int, resolve: int) -> bytes:
    """struct open_how for openat2 (also what an injected openat2 takes)."""
    return struct.pack("<QQQ", flags, 0, resolve)


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2 from ckpt itself; raises OSError naming the path."""
    how = ffi.new("char[]", open_how(flags, resolve))
    cpath = ffi.new("char[]", os.fsencode(path))
    r = lib.ck_syscall(
        NR_OPENAT2, dirfd, int(ffi.cast("uintptr_t", cpath)), int(ffi.cast("uintptr_t", how)),
        24, 0, 0,
    )  # fmt: skip
    if r < 0:
        raise OSError(-r, os.strerror(-r), path)
    return int(r)


def open_dir_nofollow(path: str) -> int:
    """An O_PATH fd on the directory at an absolute path, refusing symlinks anywhere
    on the way (a path in the image must name exactly that directory)."""
    return openat2(
        AT_FDCWD,
        path,
        O_PATH | O_DIRECTORY | O_CLOEXEC,
        RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )


def fs_magic(fd: int) -> int:
    """f_type of the filesystem an fd is on (fstatfs)."""
    buf = ffi.new("char[]", 120)
    r = lib.ck_syscall(NR_FSTATFS, fd, int(ffi.cast("uintptr_t", buf)), 0, 0, 0, 0)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return struct.unpack_from("<q", bytes(ffi.buffer(buf, 8)))[0]
