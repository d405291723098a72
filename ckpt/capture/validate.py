"""Refuse what ckpt cannot checkpoint before touching the target."""

from __future__ import annotations

import os

from ..errors import AccessDenied, NoSuchProcess, UnsupportedProcess
from ..kernel import procfs
from . import attrs
from .security import check_namespaces


def check_target(pid: int) -> procfs.Stat:
    if pid <= 0:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid)
    if pid == os.getpid():
        raise UnsupportedProcess(f"process {pid} is ckpt itself", pid=pid)
    st = procfs.stat(pid)
    if st.is_kernel_thread:
        raise UnsupportedProcess(
            f"process {pid} ({st.comm.decode(errors='replace')}) is a kernel thread", pid=pid
        )
    status = procfs.status(pid)
    if st.state in ("Z", "X"):
        if int(status.get("Threads", "1")) > 1:
            raise UnsupportedProcess(
                f"the main thread of process {pid} has exited while other threads run; "
                "not supported",
                pid=pid,
            )
        raise UnsupportedProcess(f"process {pid} is a zombie", pid=pid)
    tracer = int(status.get("TracerPid", "0"))
    if tracer and tracer != os.getpid():
        raise AccessDenied(f"process {pid} is already traced by process {tracer}", pid=pid)
    check_namespaces(pid)  # a process in namespaces of its own, before anything else
    if st.state == "T":
        raise UnsupportedProcess(
            f"process {pid} is stopped (job control); continue it first", pid=pid
        )
    attrs.refuse(pid)  # process attributes ckpt cannot restore
    return st
