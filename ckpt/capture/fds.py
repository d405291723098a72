"""File descriptors → model Fds; anything not supported fails the dump, naming the fd."""

from __future__ import annotations

import os
import stat as statmod

from ..errors import CkptError, DumpError, NoSuchProcess, UnsupportedProcess
from ..kernel import abi, procfs
from ..kernel.process import same_open_file
from ..kernel.procfs import Mapping
from ..model import Fd
from . import fd_kinds, locks, tty, unlinked, written
from .sockets import OutsidePeer, SocketCapture, capture_socket
from .vmas import file_ref


def capture_fds(
    pid: int,
    skip: frozenset[int] | set[int] = frozenset(),
    *,
    sockets: SocketCapture,
    tcp_established: bool = False,
    tree: frozenset[int] = frozenset(),
    shell_job: bool = False,
    check_only: bool = False,
    maps: list[Mapping] | None = None,
) -> list[Fd]:
    """`skip`: ckpt's own fds in the target (persistent tracking).
    `sockets`: the run's socket capture (network lock, held TCP duplicates).
    `tcp_established`: also dump TCP connections to peers outside the process.
    `tree`: the other processes dumped with this one; a pipe may connect them.
    `shell_job`: take fds on the job's controlling terminal (capture/tty.py).
    `check_only`: the preflight's pass (api/preflight.py) over a running process: what
    is read only to be kept (the content of files being written, the bytes in pipes,
    which a writer may be changing meanwhile) is left for the freeze.
    `maps`: the process's mappings when read already in this freeze (capture/process.py;
    2048 VMAs for a process with 1024 threads), else read here."""
    scan = fd_kinds.FdScan(pid, tree, check_only)
    held: dict[int, bytes] = {}  # fd → its fdinfo, when it lists locks (capture/locks.py)
    try:
        out = _capture(scan, pid, skip, sockets, tcp_established, shell_job, held, check_only)
        tty.finish(scan, out)  # a session leader's controlling pty: a "ctty" record
        if maps is None:
            maps = procfs.maps(pid)
        fd_kinds.finish(scan, out, maps)
        unlinked.finish(scan, out, maps)  # unlinked files: content once, fds or mappings
        if not check_only:  # files written at their offset: their content
            written.finish(scan, out, maps)
        locks.attach(out, held, pid)
        out += sockets.inflight.take_records(pid)  # unix sockets in flight (fd -1)
    except OSError as exc:  # reading a pipe's data, a memfd, a pidfd_getfd copy…
        raise DumpError(f"reading the fds of process {pid} failed: {exc}") from exc
    except UnsupportedProcess as exc:
        raise _naming_process(exc, pid) from None
    finally:
        scan.close()
    return out


def _capture(
    scan: fd_kinds.FdScan,
    pid: int,
    skip: frozenset[int] | set[int],
    sockets: SocketCapture,
    tcp_established: bool,
    shell_job: bool = False,
    held: dict[int, bytes] | None = None,
    check_only: bool = False,
) -> list[Fd]:
    out: list[Fd] = []
    seen: dict[tuple[int, int], list[int]] = {}
    for fd in procfs.fds(pid):
        if fd in skip:
            continue
        try:
            target = procfs.readlink(pid, "fd", str(fd))
            st = os.stat(procfs.fd_path(pid, fd))
            raw = procfs.read_bytes(pid, "fdinfo", str(fd))
            info = procfs.parse_fdinfo(raw)
        except FileNotFoundError as exc:  # closed while we looked (cannot happen when stopped)
            raise NoSuchProcess(f"fd {fd} of {pid} vanished", pid=pid) from exc
        if held is not None and locks.has_locks(raw):
            held[fd] = raw
        flags = info.flags & ~abi.O_CLOEXEC
        cloexec = bool(info.flags & abi.O_CLOEXEC)
        key = (st.st_dev, st.st_ino)
        dup_of = next((o for o in seen.get(key, []) if same_open_file(pid, o, fd)), -1)
        seen.setdefault(key, []).append(fd)
        if dup_of >= 0:
            out.append(Fd(fd=fd, kind="dup", path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, dup_of=dup_of))  # fmt: skip
            continue
        # pipes, FIFOs, eventfd, timerfd, signalfd, epoll, inotify, memfd
        kind = fd_kinds.kind_of(target, st)
        if kind is not None:
            rec = Fd(fd=fd, kind=kind, path=target, flags=flags, cloexec=cloexec, pos=info.pos)
            out.append(fd_kinds.capture(scan, rec, kind, st, raw))
            continue
        if (named := procfs.pid_path(target)) is not None and procfs.on_procfs(st):
            # /proc/PID/…: opened again on the restored process
            out.append(_proc_file(scan, fd, target, named, flags, cloexec, info.pos))
            continue
        if unlinked.is_unlinked(target, st):  # no name left: its content goes in the image
            out.append(unlinked.record(fd, target, flags, cloexec, info.pos, st))
            continue
        if statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode):
            # files, and directories (openat-style code and harnesses keep those open)
            what = "file" if statmod.S_ISREG(st.st_mode) else "directory"
            if target.endswith(" (deleted)") and st.st_nlink and what == "file":
                raise UnsupportedProcess(
                    f"fd {fd} is a file whose name was deleted while it has other links "
                    f"({target}): not supported (its other names are unknown)",
                    pid=pid,
                )
            if target.endswith(" (deleted)") or not target.startswith("/"):
                raise UnsupportedProcess(
                    f"fd {fd} refers to a deleted or unreachable {what} ({target})", pid=pid
                )
            kind = "file" if what == "file" else "dir"
            out.append(Fd(fd=fd, kind=kind, path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, file=file_ref(target, st)))  # fmt: skip
            continue
        if target == "anon_inode:[userfaultfd]" and _is_ckpt_tracking(info.extra):
            continue  # a snapshot store's tracking fd (ckpt's own, see track/uffd_wp.py)
        if (
            statmod.S_ISCHR(st.st_mode)
            and (os.major(st.st_rdev), os.minor(st.st_rdev)) in fd_kinds.SIMPLE_CHR
        ):
            out.append(Fd(fd=fd, kind="chr", path=target, flags=flags, cloexec=cloexec,
                          pos=info.pos, rdev=st.st_rdev))  # fmt: skip
            continue
        if (modes := tty.termios_of(scan, fd, st)) is not None:  # terminals: capture/tty.py
            rec = Fd(fd=fd, kind="tty", path=target, flags=flags, cloexec=cloexec, pos=0)
            out.append(tty.capture(scan, rec, st, modes, shell_job=shell_job,
                                   check_only=check_only))  # fmt: skip
            continue
        if statmod.S_ISSOCK(st.st_mode):  # sockets: capture/sockets.py
            try:
                out.append(capture_socket(pid, fd, st, run=sockets, flags=flags,
                                          cloexec=cloexec, fdinfo=info.extra,
                                          tcp_established=tcp_established,
                                          tree=scan.tree, charge=scan.charge))  # fmt: skip
            except OutsidePeer:
                if fd not in fd_kinds.STDIO:
                    raise
                rec = Fd(fd=fd, kind="socket", path=target, flags=flags, cloexec=cloexec, pos=0)
                fd_kinds.external(rec, "a unix socket connected outside the dump")
                out.append(rec)
            continue
        why = WHY_NOT.get(target, "ckpt cannot read its state back")
        raise UnsupportedProcess(
            f"fd {fd} is {_describe(target, st)}: not supported ({why})", pid=pid
        )
    return out


def _proc_file(
    scan: fd_kinds.FdScan, fd: int, target: str, named: tuple[int, str], flags: int,
    cloexec: bool, pos: int,
) -> Fd:  # fmt: skip
    """A file or directory of /proc/PID (kind "proc"): the process must be one of the
    dump (restore/fds.py opens the same path of its restored PID); a thread's files
    only for the main thread (the others are made after the fds)."""
    pid, rest = named
    if pid not in {scan.pid, *scan.tree}:
        raise scan.refuse(
            fd,
            f"is {target}, a /proc file of process {pid}, which is not part of the dump: not "
            "supported (it is opened again only for a process restored with it)",
        )
    parts = rest.split("/")
    if parts[0] == "task" and len(parts) > 1 and parts[1] != str(pid):
        raise scan.refuse(
            fd,
            f"is {target}, a /proc file of thread {parts[1]} of process {pid}: not supported "
            "(threads are made after the fds)",
        )
    return Fd(fd=fd, kind="proc", path=target, flags=flags, cloexec=cloexec, pos=pos)


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


# Why the anonymous-inode kinds ckpt refuses are refused (the refusal says it).
WHY_NOT = {
    "anon_inode:[fanotify]": "its marks on files and mounts, and the events queued for it, "
    "cannot be read back",
    "anon_inode:[io_uring]": "an io_uring's rings, registered files and requests in flight "
    "cannot be read back",
    "anon_inode:[perf_event]": "a perf event's counters and mmap ring cannot be re-created",
    "anon_inode:bpf-map": "a BPF map belongs to the kernel, not to the process",
    "anon_inode:bpf-prog": "a BPF program belongs to the kernel, not to the process",
    "anon_inode:[userfaultfd]": "another tool's userfaultfd and its registrations cannot be "
    "read back",
}


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


def _naming_process(exc: UnsupportedProcess, pid: int) -> UnsupportedProcess:
    """Say which process holds the fd: "process 123 (comm): fd 5 …" (in a tree, it matters)."""
    msg = str(exc)
    if not msg.startswith("fd "):
        return exc
    try:
        comm = procfs.read_bytes(pid, "comm").decode(errors="replace").strip()
    except (OSError, CkptError):
        comm = "?"
    try:
        return type(exc)(f"process {pid} ({comm}): {msg}", pid=exc.pid, step=exc.step)
    except TypeError:  # a subclass with another constructor: keep it as it is
        return exc
