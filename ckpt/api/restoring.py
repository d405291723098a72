"""Restore orchestration: image → checks → restorer child → rebuilt process."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time
from dataclasses import dataclass, field, replace

from ..errors import RestoreError, as_error
from ..image import ImageReader
from ..image.load import load
from ..kernel import netlock, procfs, tcp_repair
from ..kernel.memory import fill_pieces, write_at
from ..kernel.spawn import spawn_restorer
from ..model import ProcessImage, slot_base
from ..present import intersect
from ..restore import cow
from ..restore.attrs import check_detach
from ..restore.fill import Fill
from ..restore.tree import build_tree, check_tree, members
from ..restore.tty import Terminal, check_image

_ZERO = bytes(1 << 20)


@dataclass
class Restored:
    pid: int
    seconds: float
    pages: int
    #: of them, placed with UFFDIO_COPY (restore/fill.py); the rest process_vm_writev
    pages_filled: int = 0
    #: restore --shell-job: ckpt's terminal, now the job's (take_back() / wait_job(), close())
    terminal: Terminal | None = None
    #: fds that led outside the dump, now this process's: (pid, fd, what it was, our fd)
    externals: list[tuple[int, int, str, int]] = field(default_factory=list)


@dataclass
class RestoreOptions:
    """How to restore (the CLI's flags; docs/API.md)."""

    new_pid: bool = False  # under new PIDs instead of the dumped ones
    #: as a job of the terminal ckpt runs on, in the foreground (restore/tty.py); then
    #: wait with wait_exit_status(r.pid, r.terminal), which hands the terminal back
    shell_job: bool = False
    detach: bool = False  # the caller will not wait for the process (restore/attrs.py)
    #: fds 0-2 that led outside the dump (a log pipe, journald's socket) → the fd of
    #: this process they get; by default each gets this process's own fd of that number
    inherit_fds: dict[int, int] | None = None
    #: a session's terminal outside the image (a shell's terminal window, an sshd pty):
    #: take that same terminal back as its controlling terminal, if it is still open and
    #: no other session has it (restore/tty.py); without it such an image is refused
    reattach_tty: bool = False


def restore(directory: str, options: RestoreOptions | None = None, **fields) -> Restored:
    """Rebuild the process (and its tree) from the image in `directory`; it runs on as
    a child of this process. Options as a RestoreOptions, or its fields as keywords."""
    # No cyclic GC while restoring: the image's model (thousands of records for a
    # process with many threads) would be traversed by every collection it triggers,
    # ~15 ms at 1024 threads; nothing here relies on cycles being freed meanwhile.
    was = gc.isenabled()
    gc.disable()
    try:
        with as_error(RestoreError):  # kernel/'s KernelError is this restore's failure (exit 11)
            return run_restore(directory, replace(options or RestoreOptions(), **fields))
    finally:
        if was:
            gc.enable()


def restore_snapshot(
    store: str, at: str | None, options: RestoreOptions | None = None, *, wait: float = 10.0,
    **fields,
) -> tuple[Restored, str]:  # fmt: skip
    """Restore snapshot `at` (id, prefix, time; None: the latest) of the store at `store`;
    a shared store lock keeps gc from swapping it meanwhile. Returns (restored, its id)."""
    from ..store import Store

    st = Store.open(store)
    with st.lock(wait, shared=True, op="restore"):
        info = st.resolve(at)
        return restore(st.path_of(info), options, **fields), info.id


def wait_exit_status(pid: int, terminal=None) -> int:
    """Wait for a restored child; shell-style status (128+N when killed by signal N).
    terminal: a shell job's (Restored.terminal): ckpt takes it back when the job ends."""
    while True:
        if terminal is not None:
            status = terminal.wait_job(pid)
            terminal.close()
            terminal = None
        else:
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                return 0
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def run_restore(directory: str, opts: RestoreOptions) -> Restored:
    new_pid, shell_job, detach = opts.new_pid, opts.shell_job, opts.detach
    inherit_fds = opts.inherit_fds
    t0 = time.monotonic()
    reader, proc = load(directory)
    procs = members(proc)
    terminal = None
    try:
        check_image(procs, shell_job, opts.reattach_tty)
        if detach:
            check_detach(proc)
        terminal = Terminal.find() if shell_job else None
        check_tree(proc, new_pid)
        if proc.net_lock:  # (an older image's lock: ckpt's own segments in, too)
            netlock.let_marked_in_table(proc.net_lock, tcp_repair.INJECT_MARK)
        child = spawn_restorer(None if new_pid else proc.pid)
    except BaseException:
        reader.close()
        if terminal is not None:
            terminal.close()
        raise
    rbs = []
    filled: list[int] = []  # pages placed with UFFDIO_COPY, per process
    try:
        rbs = build_tree(
            child, proc, new_pid,
            lambda slot, p, mem_fd, fill: filled.append(_write_pages(reader, slot, p, mem_fd, fill)),
            terminal, lambda shared: shared.fill(reader), inherit_fds, opts.reattach_tty,
        )  # fmt: skip
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, 0)
        if terminal is not None:
            terminal.take_back()
            terminal.close()
        if isinstance(exc, OSError) and not hasattr(exc, "exit_code"):
            raise RestoreError(f"restore failed: {exc}") from exc
        raise
    finally:
        for rb in rbs:
            rb.close()
        reader.close()
    if proc.net_lock:  # the restored sockets exist: let the peers' resends through
        netlock.unlock(proc.net_lock)
    pages = sum(n for p in procs for v in p.vmas for _, n in v.present)
    pages += sum(n for o in proc.shm for _, n in o.present)
    externals = [
        (p.pid, f.fd, f.path, (inherit_fds or {}).get(f.fd, f.fd))
        for p in procs
        for f in p.fds
        if f.kind == "external"
    ]
    return Restored(pid=child, seconds=time.monotonic() - t0, pages=pages, terminal=terminal,
                    externals=externals, pages_filled=sum(filled))  # fmt: skip


def _pid_of(mem_fd: int) -> int:
    """The PID whose /proc/PID/mem mem_fd is, for process_vm_writev (0: unknown, and
    write_pieces then writes through mem_fd alone)."""
    try:
        return int(os.readlink(procfs.fd_path(os.getpid(), mem_fd)).rsplit("/", 2)[-2])
    except (OSError, ValueError):
        return 0


def _write_pages(
    reader: ImageReader, slot: int, proc: ProcessImage, mem_fd: int, fill: Fill | None = None
) -> int:
    """One process's pages; a tree member's are keyed slot << 48 | vaddr. fill: the
    process's userfaultfd that UFFDIO_COPY fills through (restore/fill.py). Returns the
    pages UFFDIO_COPY placed."""
    base = slot_base(proc.space if proc.space >= 0 else slot)
    # pages shared copy-on-write with the parent are there already (restore/cow.py)
    plan = reader.plan([(a + base, n) for v in proc.vmas for a, n in cow.to_write(v)])
    pid = _pid_of(mem_fd)
    uffd, ranges = (fill.fd, fill.flat) if fill is not None else (-1, [])
    filled: list[int] = []

    def write(pieces, data) -> None:  # in the reader's pool threads, without the GIL
        pieces = [(a - base, n, off) for a, n, off in pieces]
        filled.append(fill_pieces(uffd, ranges, pid, mem_fd, data, pieces))

    reader.write_data(plan, write)
    # Present pages whose newest copy is all zero: fresh anonymous memory already
    # reads zero, but a file mapping would show the file's content there.
    file_spans = [(v.start, v.end) for v in proc.vmas if v.kind in ("file", "memfd", "unlinked")]
    zero_spans = sorted((a - base, a - base + n * 4096) for a, n in plan.zero)
    for a, b in intersect(zero_spans, file_spans):
        for off in range(a, b, len(_ZERO)):
            write_at(mem_fd, off, _ZERO[: min(len(_ZERO), b - off)])
    return sum(filled)
