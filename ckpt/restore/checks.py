"""Pre-flight checks of a restore: files unchanged, PID free."""

from __future__ import annotations

import os
import sys
import time

from ..errors import FileChanged, PidInUse, RestoreError
from ..kernel import procfs
from ..kernel.pidfd import pidfd_of_same
from ..model import Fd, FileRef, ProcessImage, writes_at_offset
from . import written


def check_file(ref: FileRef, what: str, *, strict: bool = True) -> None:
    try:
        st = os.stat(ref.path)
    except OSError as exc:
        raise FileChanged(f"{what} {ref.path} is gone since the dump ({exc.strerror})") from exc
    if (st.st_dev, st.st_ino) != (ref.dev, ref.ino):
        raise FileChanged(f"{what} {ref.path} was replaced since the dump (inode changed)")
    if strict and (st.st_size != ref.size or st.st_mtime_ns != ref.mtime_ns):
        raise FileChanged(
            f"{what} {ref.path} changed since the dump (size {ref.size} → {st.st_size}, "
            "or modification time)"
        )


def check_files(proc: ProcessImage) -> None:
    """Mapped files and files read through fds must be exactly as dumped.

    Write-only fds (logs) only need to be the same file: the process never
    reads through them, and a log that grew is not corruption.
    """
    if proc.mm.exe is not None:
        check_file(proc.mm.exe, "executable")
    for v in proc.vmas:
        if v.file is not None and v.kind != "unlinked":  # no name: made again, not checked
            # a tmpfs file whose content the image holds (restore/shm.py) is written back,
            # or made again when it is gone (e.g. on another host)
            if v.shm >= 0 and not os.path.lexists(v.file.path):
                continue
            check_file(v.file, f"mapped file (at {v.start:#x})", strict=v.shm < 0)
    check_inflight(proc)
    for fd in proc.fds:
        if fd.file is not None and fd.kind != "unlinked":
            what = f"file of fd {fd.fd}"
            if fd.kind == "file" and fd.content is not None:  # put back as it was at the dump
                written.check(fd, what)
                continue
            # a directory only needs to be the same one (its entries come and go), an
            # O_APPEND writer (a log) the same file (restore/written.py must_be_unchanged)
            try:
                check_file(fd.file, what, strict=written.must_be_unchanged(proc, fd))
            except FileChanged as exc:
                if not writes_at_offset(fd):
                    raise
                raise FileChanged(
                    f"{exc}: the process writes it at its offset, and the image holds no "
                    "copy of it (larger than the dump keeps)"
                ) from exc


def check_inflight(proc: ProcessImage) -> None:
    """Files in flight in the process's unix sockets that are opened again by path
    (restore/inflight.py): as for its own fds, before anything is built."""
    from .inflight import must_be_unchanged

    for f in proc.fds:
        for e in f.socket.inflight if f.socket is not None else ():
            if e.file is not None and e.kind in ("file", "dir"):
                what = f"file in flight in socket fd {f.fd}"
                check_file(e.file, what, strict=must_be_unchanged(e))


def check_pidfds(proc: ProcessImage, image_pids: set[int]) -> None:
    """A pidfd of a process outside the image (`image_pids`: its processes and zombies as
    dumped) is reopened only on that same process: it must still run with the start time
    it had (exit 11 before anything is built; restore/fds.py checks again on the pidfd)."""
    for fd in proc.fds:
        want = fd.pidfd
        if fd.kind != "pidfd" or want is None or want.pid <= 0 or want.pid in image_pids:
            continue
        got = pidfd_of_same(want.pid, want.start)
        if got is None:
            raise RestoreError(outside_pidfd_gone(proc.pid, fd), pid=proc.pid)
        os.close(got)


def outside_pidfd_gone(pid: int, fd: Fd) -> str:
    return (
        f"process {pid}: fd {fd.fd} is a pidfd of process {fd.pidfd.pid}, which is not part "
        "of the image and no longer runs (exited, or its PID now names another process)"
    )


def wait_pid_free(pid: int, timeout: float = 5.0) -> None:
    """A just-killed original may linger as a zombie until its parent reaps it: wait for
    that (saying so, in one line on stderr), at most `timeout` seconds."""
    if not os.path.lexists(procfs.path(pid)):  # free (most are: one per thread to check)
        return
    deadline = time.monotonic() + timeout
    said = False
    while True:
        try:
            st = procfs.stat(pid)
        except Exception:
            return
        zombie = st.state in ("Z", "X")
        if not zombie or time.monotonic() > deadline:
            what = (
                f"still a zombie: its parent {_parent(st.ppid)} has not reaped it in {timeout:g} s"
                if zombie
                else f"in use by another process ({st.comm.decode(errors='replace')})"
            )
            raise PidInUse(f"PID {pid} is {what}; restore with --new-pid", pid=pid)
        if not said:
            sys.stderr.write(
                f"ckpt: waiting for PID {pid}: the dumped process is a zombie until its "
                f"parent {_parent(st.ppid)} reaps it\n"
            )
            said = True
        time.sleep(0.005)


def _parent(ppid: int) -> str:
    try:
        return f"{ppid} ({procfs.stat(ppid).comm.decode(errors='replace')})"
    except Exception:
        return str(ppid)
