"""Small per-process queries made from outside the target (no injection)."""

from __future__ import annotations

import struct
import time

from . import abi, procfs
from .native import check, ffi, lib

NR_GET_ROBUST_LIST = abi.NR_GET_ROBUST_LIST
#: RLIMIT_* by number, for messages
RLIMIT_NAMES = (
    "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
    "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
)  # fmt: skip


def get_robust_list(tid: int) -> tuple[int, int]:
    head = ffi.new("uint64_t *")
    ln = ffi.new("uint64_t *")
    check(
        lib.ck_syscall(
            NR_GET_ROBUST_LIST,
            tid,
            int(ffi.cast("uintptr_t", head)),
            int(ffi.cast("uintptr_t", ln)),
            0,
            0,
            0,
        ),
        "get_robust_list",
        target=tid,
    )
    return head[0], ln[0]


def rlimits(pid: int) -> dict[int, list[int]]:
    """{RLIMIT_*: [soft, hard]} from /proc/PID/limits: prlimit(pid, …) on a process of
    another user needs CAP_SYS_RESOURCE. Restore sets them from inside (rebuild.py)."""
    return procfs.limits(pid)


def personality(pid: int) -> int:
    return int(procfs.read_bytes(pid, "personality").strip(), 16)


def auxv_bytes(data: bytes) -> bytes:
    """auxv trimmed after AT_NULL (PR_SET_MM_MAP wants just the vector)."""
    for i in range(0, len(data) - 15, 16):
        t, _ = struct.unpack_from("<QQ", data, i)
        if t == 0:
            return data[: i + 16]
    return data


NR_KCMP, KCMP_FILE = abi.NR_KCMP, 0


def same_open_file(pid: int, fd1: int, fd2: int) -> bool:
    """Do two fds of pid share one open file description (dup'd)? kcmp(KCMP_FILE)."""
    r = lib.ck_syscall(NR_KCMP, pid, pid, KCMP_FILE, fd1, fd2, 0)
    return r == 0


def kcmp_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """Is fd1 of pid1 the same open file description as fd2 of pid2 (inherited)?"""
    return lib.ck_syscall(NR_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2, 0) == 0


def same_fd_table(pid1: int, pid2: int) -> bool:
    """Do two processes share one fd table (clone(CLONE_FILES))? kcmp(KCMP_FILES)."""
    return lib.ck_syscall(NR_KCMP, pid1, pid2, abi.KCMP_FILES, 0, 0, 0) == 0


def zombie_parent(pid: int, starttime: int, wait: float = 0.0) -> str:
    """After ckpt killed process `pid` (started at `starttime`): "" once its PID is free,
    else the parent that keeps it a zombie until it reaps it, as "PPID (comm)". Waits up
    to `wait` seconds for that parent (one that reaps on SIGCHLD takes a few ms). ckpt
    itself, when it is the parent, has reaped it already (its ptrace wait did)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            st = procfs.stat(pid)
        except Exception:  # gone, or no longer readable as a process: free
            return ""
        if st.starttime != starttime or st.state not in ("Z", "X"):
            return ""  # reaped (and maybe reused): no zombie of ours holds it
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    try:
        comm = procfs.stat(st.ppid).comm.decode(errors="replace")
    except Exception:
        comm = "?"
    return f"{st.ppid} ({comm})"
