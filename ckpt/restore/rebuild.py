"""Turn the parked restorer child into the dumped process, by syscall injection.

The numbered steps follow DESIGN.md "Dump and restore, step by step"; each is
one function so the order lives in `rebuild()` and nowhere else.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from stat import S_IFREG

from ..errors import PidInUse, RestoreError
from ..kernel import abi, procfs, program, syscalls, sysvshm
from ..kernel.native import PAGE_SIZE
from ..kernel.process import RLIMIT_NAMES
from ..kernel.ptrace import (
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEFORK,
    PTRACE_O_TRACESYSGOOD,
    Tracee,
    restore_regs,
)
from ..kernel.remote import HEAL_CODE, INJECT_MASK, SCRATCH_PAGES, Injector, RemoteError, Scratch
from ..kernel.spawn import pause_syscall_addr
from ..model import ProcessImage, Thread
from . import attrs, cow
from .fds import (
    close_table_holders,
    create_memfds,
    memfd_fd_for,
    restore_fds,
    restore_owners,
)
from .hostfs import chdir_resolved, open_checked
from .locks import restore_locks
from .security import enter_cgroups, restore_files_context
from .security import restore_creds as restore_security_creds
from .shm import Owner, SharedObjects
from .tty import Ptys, Terminal, attach_ctty
from .unlinked import UnlinkedFiles

# VmFlags set by madvise → the advice that sets them again
MADV = {
    "hg": abi.MADV_HUGEPAGE, "nh": abi.MADV_NOHUGEPAGE, "dc": abi.MADV_DONTFORK,
    "wf": abi.MADV_WIPEONFORK, "dd": abi.MADV_DONTDUMP, "mg": abi.MADV_MERGEABLE,
    "sr": abi.MADV_SEQUENTIAL, "rr": abi.MADV_RANDOM,
}  # fmt: skip
VDSO_KINDS = ("vvar", "vvar_vclock", "vdso")
THREAD_FLAGS = (
    abi.CLONE_VM | abi.CLONE_FS | abi.CLONE_FILES | abi.CLONE_SIGHAND | abi.CLONE_THREAD
    | abi.CLONE_SYSVSEM
)  # fmt: skip


def _u(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


@dataclass
class RestoreContext:
    """What one process's rebuild shares with the rest of its restore: the tree's
    registries and the run's options. restore/tree.py makes one per member; a lone
    process (the staged restore) takes the defaults. Handed to the Rebuilder at
    construction, never set on it afterwards."""

    #: tree restore: slot → PID of the processes restored before (fds, shared memory)
    peers: dict[int, int] = field(default_factory=dict)
    #: the tree's files in flight in unix sockets (restore/inflight.py InflightFiles);
    #: None: the process's own
    inflight: object = None
    #: slot → image of the processes restored before (their mappings: copy-on-write)
    peer_images: dict[int, ProcessImage] = field(default_factory=dict)
    #: tree restore: pipe ends and sockets kept for a later member (restore/fds.py)
    parked: dict[tuple[int, int], tuple[int, int]] | None = None
    #: tree restore: the memfds made so far (restore/fds.py create_memfds)
    memfds: dict[int, tuple[int, int]] | None = None
    #: a member sharing an earlier member's fd table (clone(CLONE_FILES)): its first
    #: memfd holder number (restore/fds.py table_holder_bases); -1: above its fds
    holder_base: int = -1
    #: the tree's shared memory objects, and who made each so far (restore/shm.py);
    #: None: the process's own
    shared: SharedObjects | None = None
    #: fds 0-2 that led outside the dump → the fd of this ckpt they get (restore/fds.py)
    externals: dict[int, int] = field(default_factory=dict)
    #: restore --shell-job: the terminal this process's terminal fds go to (restore/tty.py)
    terminal: Terminal | None = None
    #: the root of a shell job: stays in ckpt's session, in a process group of its own
    shell_job: bool = False
    #: tree restore: PID at the dump → restored PID of every member and zombie, all
    #: forked before the fds phase (pidfds name them); empty: just this process
    pids: dict[int, int] = field(default_factory=dict)
    #: the tree's unlinked files, and where each was made (restore/unlinked.py); None:
    #: the process's own
    unlinked: UnlinkedFiles | None = None
    #: the image's pty pairs made again, and restore --reattach-tty (restore/tty.py);
    #: None: a lone process's own (the staged restore takes no controlling terminal)
    ptys: Ptys | None = None


class Rebuilder:
    def __init__(
        self,
        pid: int,
        proc: ProcessImage,
        new_pid: bool,
        ctx: RestoreContext | None = None,
        tracee: Tracee | None = None,
    ):
        """ctx: what it shares with the rest of the restore (the defaults: nothing);
        tracee: the restorer already attached and stopped (a forked tree member)."""
        self.pid = pid
        self.proc = proc
        self.new_pid = new_pid
        self.ctx = ctx if ctx is not None else RestoreContext()
        self.shared = self.ctx.shared if self.ctx.shared is not None else SharedObjects(proc.shm)
        self.unlinked = self.ctx.unlinked or UnlinkedFiles([proc])  # restore/unlinked.py
        if tracee is None:
            self.tracee = Tracee.seize(pid, exitkill=True)
            self.tracee.interrupt()
        else:
            self.tracee = tracee
            self.tracee.set_options(PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL)
        template = self.tracee.getregs()
        self.mem_fd = procfs.open_file(pid, "mem", os.O_RDWR)
        self.inj = Injector(self.tracee, template, self.mem_fd)
        self.inj.use(pause_syscall_addr())
        self.tracee.set_sigmask(INJECT_MASK)
        # the other threads, once created: (image thread, tracee, injector)
        self.threads: list[tuple[Thread, Tracee, Injector]] = []
        #: where the other threads' injected programs live (kernel/program.py): mapped
        #: with the threads, before the process's limits apply, unmapped when it leaves
        self.area: program.Area | None = None
        #: each restored thread's signals pending once restore_signals queued them
        self._pending: dict[int, set[int]] = {}
        self.tid_map: dict[int, int] = {proc.pid: pid}
        #: SysV segments this restore made (removed again if the restore fails)
        self.sysv_created: list[int] = []
        #: setsid already done (a session leader of a tree does it before forking)
        self.session_done = False
        #: moved into its image's cgroups (a staged restore learns them only at the end)
        self.cgroups_entered = False
        self.enter_cgroups()  # before its memory and children (restore/security.py)

    def enter_cgroups(self) -> None:
        if not self.cgroups_entered:
            self.cgroups_entered = enter_cgroups(self.pid, self.proc)

    def set_image(self, proc: ProcessImage) -> None:
        """The staged restore builds from a VMA layout, then from the final image."""
        self.proc = proc

    def early_session(self) -> None:
        """A session leader makes its session before its children are forked; the root of
        a shell job never does: it stays in ckpt's session (restore_process_misc)."""
        if self.proc.sid == self.proc.pid and not self.ctx.shell_job:
            syscalls.setsid(self.inj)
            self.session_done = True
            attach_ctty(self.inj, self.proc, self.ctx.ptys)  # its pty, before its children

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1

    # -- the steps, in order ---------------------------------------------------------------

    def run(self, write_pages) -> None:
        self.prepare_memory()
        self.map_vmas()
        write_pages(self.mem_fd)
        self.apply_state()

    def prepare_memory(self) -> None:
        """Empty the restorer's address space down to the scratch area and the vDSO."""
        child_maps = procfs.maps(self.pid)
        if self.inj.scratch is None:
            self.make_scratch(child_maps)
        self.unregister_rseq()
        self.unmap_all(child_maps)
        self.place_vdso(child_maps)

    def apply_state(self) -> None:
        """Everything after the pages are in: protections, mm, fds, signals, creds; then go."""
        self.state_files()
        self.state_rest()
        self.restore_fd_owners(self.tid_map)
        self.leave()

    def state_files(self) -> None:
        """Up to the fds and the process's own attributes (a tree does every member's
        first: a later member's shared fds come from an earlier one)."""
        self.finish_vmas()
        self.set_mm()
        # files in flight in unix sockets: the tree's, or (a lone process, a staged restore
        # that knows its image only now) the process's own (restore/inflight.py)
        from .inflight import InflightFiles

        inflight = self.ctx.inflight or InflightFiles([self.proc])
        inflight.serve(self.pid)
        if self.proc.files_of < 0:  # else (clone(CLONE_FILES)) its fds are an earlier
            self.restore_fds()  # member's, made in their one table (close_table_holders)
        # after the last member's fds: queues that carry files in flight are sent
        inflight.member_done(self.inj, self.pid, self.ctx.pids or {self.proc.pid: self.pid})
        # the fds' file locks, once no temporary fd is left to close (a close of any fd of
        # a file drops the process's POSIX locks on it): restore/locks.py; with files in
        # flight, once they are sent (their temporaries closed: a shared table's too)
        inflight.after_sending(lambda: restore_locks(self.inj, self.proc))
        self.restore_process_misc()
        restore_files_context(self)  # loginuid, chroot: after every path is used

    def state_rest(self) -> None:
        self.create_threads()
        self.restore_signals()
        self.restore_timers()
        self.restore_rlimits()  # with ckpt's credentials still: before restore_creds
        attrs.before_creds(self)  # restore/attrs.py
        self.restore_creds()
        self.register_rseq()
        attrs.after_creds(self)

    def fork_child(
        self, want: int | None, exit_signal: int = abi.SIGCHLD, flags: int = 0
    ) -> Tracee:
        """A copy of this restorer as its child, with PID `want` when given, that sends
        `exit_signal` to its parent when it exits. The child inherits the address space
        as it is (restore/tree.py: the parent's, built; its scratch area included).
        flags: clone flags (CLONE_FILES: the child shares this restorer's fd table).

        The child is auto-attached (PTRACE_O_TRACEFORK, or TRACECLONE for an exit signal
        other than SIGCHLD) and stops before running an instruction; it becomes a tree
        member's restorer. Needs the scratch area.
        """
        if self.inj.scratch is None:
            self.make_scratch(procfs.maps(self.pid))
        return clone_traced(self.tracee, self.inj, want, exit_signal, flags)

    def make_scratch(self, child_maps) -> None:
        busy = [(m.start, m.end) for m in child_maps] + [(v.start, v.end) for v in self.proc.vmas]
        size = SCRATCH_PAGES * PAGE_SIZE
        addr = free_range(busy, size)
        rwx = abi.PROT_READ | abi.PROT_WRITE | abi.PROT_EXEC
        flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE
        syscalls.mmap(self.inj, addr, size, rwx, flags, _u(-1), 0)
        self.inj.write(addr, HEAL_CODE)
        self.inj.scratch = Scratch(addr)
        self.inj.use(addr)
        self._busy = busy

    def unregister_rseq(self) -> None:
        cfg = self.tracee.rseq_config()
        if cfg is not None:
            syscalls.rseq(self.inj, cfg.ptr, cfg.size, abi.RSEQ_FLAG_UNREGISTER, cfg.signature)

    def unmap_all(self, child_maps) -> None:
        keep = [(self.inj.scratch.addr, self.inj.scratch.addr + self.inj.scratch.size)]
        keep += [
            (m.start, m.end) for m in child_maps if m.name in ("[vvar]", "[vvar_vclock]", "[vdso]")
        ]
        keep += cow.inherited(self.proc)  # copy-on-write from the parent (restore/cow.py)
        keep.sort()
        pos = 0
        for a, b in keep + [(abi.TASK_SIZE, abi.TASK_SIZE)]:
            if a > pos:
                syscalls.munmap(self.inj, pos, a - pos)
            pos = max(pos, b)

    def place_vdso(self, child_maps) -> None:
        have = {
            m.name.strip("[]"): m
            for m in child_maps
            if m.name in ("[vvar]", "[vvar_vclock]", "[vdso]")
        }
        want = {v.kind: v for v in self.proc.vmas if v.kind in VDSO_KINDS}
        if set(have) != set(want) or any(have[k].size != want[k].size for k in want):
            raise RestoreError(
                "the vDSO layout of this kernel differs from the image's "
                f"(here: {sorted((k, m.size) for k, m in have.items())}, "
                f"image: {sorted((k, v.size) for k, v in want.items())}); restore on the same kernel"
            )
        if not want:
            return
        targets = [(want[k].start, want[k].end) for k in want]
        sources = [(have[k].start, have[k].end) for k in want]
        if any(_overlap(t, s) for t in targets for s in sources):
            # go through a place free in both layouts first
            span_lo = min(m.start for m in have.values())
            span = max(m.end for m in have.values()) - span_lo
            busy = self._busy + [
                (self.inj.scratch.addr, self.inj.scratch.addr + self.inj.scratch.size)
            ]
            tmp = free_range(busy + targets, span)
            for m in have.values():
                new = tmp + (m.start - span_lo)
                syscalls.mremap(
                    self.inj, m.start, m.size, m.size, abi.MREMAP_MAYMOVE | abi.MREMAP_FIXED, new
                )
                m.end, m.start = new + m.size, new
        for k, m in have.items():
            if m.start != want[k].start:
                syscalls.mremap(
                    self.inj,
                    m.start,
                    m.size,
                    m.size,
                    abi.MREMAP_MAYMOVE | abi.MREMAP_FIXED,
                    want[k].start,
                )

    def map_vmas(self) -> None:
        base = self.ctx.holder_base
        create_memfds(self.inj, self.proc, self.ctx.memfds, base)  # first: mappings share them
        # anonymous mappings (most of a many-thread process's: stacks, guard pages) are
        # mapped by injected programs (kernel/program.py), each run of them before any
        # other kind of mapping, so that everything happens in the image's order
        anon = _Batch(self, self._free_area, len(self.proc.vmas))
        try:
            self._map_vmas(anon)
        finally:
            anon.close()

    def _map_vmas(self, anon: _Batch) -> None:
        base = self.ctx.holder_base
        for v in self.proc.vmas:
            if v.kind in VDSO_KINDS:
                continue
            if not (v.cow_from < 0 and v.kind not in ("unlinked", "sysv", "file", "memfd")
                    and v.shm < 0 and v.shared_with is None):  # fmt: skip
                anon.run()
            if v.cow_from >= 0:  # inherited from the parent, copy-on-write
                cow.keep(self, v)
                continue
            prot0 = v.prot | (abi.PROT_WRITE if "ac" in v.vmflags else 0)
            flags = abi.MAP_FIXED_NOREPLACE | (abi.MAP_SHARED if v.shared else abi.MAP_PRIVATE)
            if "gd" in v.vmflags:
                flags |= abi.MAP_GROWSDOWN
            if "dp" in v.vmflags:  # MAP_DROPPABLE: a mapping type of its own
                flags = flags & ~abi.MAP_PRIVATE | abi.MAP_DROPPABLE
            if v.kind == "unlinked":  # made again, or the one made already (restore/unlinked.py)
                noreserve = abi.MAP_NORESERVE if "nr" in v.vmflags else 0
                self._map_unlinked(v, prot0, flags | noreserve)
                continue
            if v.shm >= 0:
                self._map_object(v, prot0, flags)
                continue
            if v.kind == "sysv":
                self._map_sysv(v, prot0)
                continue
            if v.shared_with is not None:  # a tree member restored it first (format 2.0)
                self._map_from_peer(v, prot0, flags)
                continue
            if "nr" in v.vmflags:
                flags |= abi.MAP_NORESERVE
            if v.kind in ("file", "memfd"):
                mode = abi.O_RDWR if (v.shared and "mw" in v.vmflags) else abi.O_RDONLY
                if v.kind == "memfd" and "sh" in v.vmflags:
                    # memfd_create's own file, as the process mapped it: a reopen for
                    # writing would hold write access (execveat of it: ETXTBSY), one
                    # read-only would not be VM_SHARED (a write-sealed memfd's is)
                    holder = memfd_fd_for(self.proc, v.start, base)
                    self._mmap_at(v, prot0, flags, holder, v.offset)
                    continue
                # a memfd: the object create_memfds made, shared with its fds
                path = (
                    v.file.path
                    if v.kind == "file"
                    else procfs.in_target("self", "fd", memfd_fd_for(self.proc, v.start, base))
                )
                self._map_path(v, prot0, flags, path, mode, v.file if v.kind == "file" else None)
                continue
            else:
                anon.mmap(v, prot0, flags | abi.MAP_ANONYMOUS)
        anon.run()

    def _map_path(
        self, v, prot: int, flags: int, path: str, mode: int, ref=None, strict: bool = True
    ) -> None:
        """ref: the file the image maps there, opened without following symlinks and
        checked on the fd itself (restore/hostfs.py) before anything is mapped."""
        self.inj.reset_data()
        if ref is not None:
            what = f"mapped file (at {v.start:#x})"
            fd = open_checked(
                self.inj, path, mode | abi.O_CLOEXEC, what, ref=ref, strict=strict, fmt=S_IFREG
            )
        else:
            fd = syscalls.openat(
                self.inj, _u(abi.AT_FDCWD), self.inj.cstr(path), mode | abi.O_CLOEXEC, 0
            )
        try:
            self._mmap_at(v, prot, flags, fd, v.offset)
        finally:
            syscalls.close(self.inj, fd)

    def _map_object(self, v, prot: int, flags: int) -> None:
        """A VMA of a shared memory object: the first one makes the object, the others
        map that one (restore/shm.py)."""
        obj = self.shared.get(v.shm)
        owner = self.shared.owners.get(v.shm)
        fresh = True
        if v.kind == "sysv":
            fresh = self._map_sysv(v, prot)
        elif v.kind == "file":  # a tmpfs file: the same file, its content from the image
            mode = abi.O_RDWR if "mw" in v.vmflags else abi.O_RDONLY
            if owner is not None:  # mapped already (perhaps made again): that very file
                self._map_via(owner.pid, owner.start, owner.end, v, prot, flags, mode)
                fresh = owner.fresh
            else:
                fd = self._make_tmpfs_file(v, obj)
                fresh = fd >= 0
                if fresh:  # made again just now: map the file made, not a name
                    try:
                        self._mmap_at(v, prot, flags, fd, v.offset)
                    finally:
                        syscalls.close(self.inj, fd)
                else:
                    self._map_path(v, prot, flags, v.file.path, mode, v.file, strict=False)
        elif owner is not None:
            self._map_via(owner.pid, owner.start, owner.end, v, prot, flags)
        elif v.offset == 0 and v.size == obj.size:
            self._mmap_at(v, prot, flags | abi.MAP_ANONYMOUS, _u(-1), 0)
        else:  # the object is bigger than this VMA: make it whole elsewhere, map a part
            busy = self._busy + [(x.start, x.end) for x in self.proc.vmas]
            busy.append((self.inj.scratch.addr, self.inj.scratch.addr + self.inj.scratch.size))
            tmp = free_range(busy, obj.size)
            rw = abi.PROT_READ | abi.PROT_WRITE
            shared = abi.MAP_SHARED | abi.MAP_ANONYMOUS | abi.MAP_FIXED_NOREPLACE
            syscalls.mmap(self.inj, tmp, obj.size, rw, shared, _u(-1), 0)
            try:
                self._map_via(self.pid, tmp, tmp + obj.size, v, prot, flags)
            finally:
                syscalls.munmap(self.inj, tmp, obj.size)
        if owner is None:
            self.shared.owners[v.shm] = Owner(self.pid, v.start, v.end, fresh)

    def _make_tmpfs_file(self, v, obj) -> int:
        """A tmpfs file (e.g. /dev/shm/x) that is gone, as on another host: made again at
        its path, with its owner and mode, by the restorer as that owner (fsuid/fsgid:
        the kernel checks the directory as the owner would be checked, and no symlink
        is followed at the last step). The restorer's fd on the file made (it reads zero:
        filled later), or -1 when the file is there."""
        if os.path.lexists(v.file.path):
            return -1
        if len(obj.owner) != 3:
            raise RestoreError(f"{v.file.path} is gone and the image lacks its owner")
        mode, uid, gid = obj.owner
        inj = self.inj
        inj.reset_data()
        old_mask = syscalls.umask(inj, 0)
        syscalls.setfsgid(inj, gid)
        syscalls.setfsuid(inj, uid)
        try:
            flags = abi.O_RDWR | abi.O_CREAT | abi.O_EXCL | abi.O_NOFOLLOW | abi.O_CLOEXEC
            fd = syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(v.file.path), flags, mode)
        except RemoteError as exc:
            raise RestoreError(f"cannot make {v.file.path} again: {exc.strerror}") from exc
        finally:
            syscalls.setfsuid(inj, 0)
            syscalls.setfsgid(inj, 0)
            syscalls.umask(inj, old_mask)
        try:
            syscalls.ftruncate(inj, fd, obj.size)
        except BaseException:
            syscalls.close(inj, fd)
            raise
        return fd

    def _map_via(
        self, pid: int, start: int, end: int, v, prot: int, flags: int, mode: int = abi.O_RDWR
    ) -> None:
        """Map the object that process `pid` maps at [start, end), at v's place."""
        inj = self.inj
        inj.reset_data()
        path = procfs.in_target(pid, "map_files", f"{start:x}-{end:x}")
        try:
            fd = syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(path), mode | abi.O_CLOEXEC, 0)
        except RemoteError as exc:
            raise RestoreError(f"cannot open {path} to share memory: {exc.strerror}") from exc
        try:
            self._mmap_at(v, prot, flags, fd, v.offset)
        finally:
            syscalls.close(inj, fd)

    def _map_unlinked(self, v, prot: int, flags: int) -> None:
        """A mapping of an unlinked file: the file made again (restore/unlinked.py), opened
        with the mode that gives the mapping its VM_MAYWRITE as it had."""
        mode = abi.O_RDWR if (v.shared and "mw" in v.vmflags) else abi.O_RDONLY
        what = f"process {self.proc.pid}: the mapping at {v.start:#x}"
        fd = self.unlinked.open(self.inj, self.proc, v.file, mode, what)
        try:
            self._mmap_at(v, prot, flags, fd, v.offset)
        finally:
            syscalls.close(self.inj, fd)
        self.unlinked.note(v.file, self.pid, "map_files", f"{v.start:x}-{v.end:x}")

    def _mmap_at(self, v, prot: int, flags: int, fd: int, offset: int) -> None:
        got = syscalls.mmap(self.inj, v.start, v.size, prot, flags, fd, offset)
        if got != v.start:
            raise RestoreError(f"mapping {v.start:#x} landed at {got:#x}")

    def _map_sysv(self, v, prot: int) -> bool:
        """Attach the SysV segment at its address: the live one if it is still there
        (same host), else one made again under the same id (its pages follow)."""
        seg = v.sysv
        live = sysvshm.segments().get(seg.shmid)
        if live is not None and (live.key, live.size) != (seg.key, seg.size):
            raise RestoreError(
                f"SysV shm id {seg.shmid} now names another segment (key {live.key:#x}, "
                f"{live.size} bytes; the image's: key {seg.key:#x}, {seg.size} bytes)"
            )
        if live is None:
            try:
                sysvshm.recreate(seg.shmid, seg.key, seg.size, seg.mode, seg.uid, seg.gid)
            except OSError as exc:
                raise RestoreError(
                    f"cannot make SysV segment {seg.shmid} (key {seg.key:#x}) again: {exc}"
                ) from exc
            self.sysv_created.append(seg.shmid)
        flags = (0 if prot & abi.PROT_WRITE else abi.SHM_RDONLY) | (
            abi.SHM_EXEC if prot & abi.PROT_EXEC else 0
        )
        self._attach_sysv(v, seg, flags)
        return live is None

    def _attach_sysv(self, v, seg, flags: int) -> None:
        try:
            got = syscalls.shmat(self.inj, seg.shmid, v.start, flags)
        except RemoteError as exc:
            raise RestoreError(f"cannot attach SysV segment {seg.shmid}: {exc.strerror}") from exc
        if got != v.start:
            raise RestoreError(f"SysV segment {seg.shmid} attached at {got:#x}, not {v.start:#x}")

    def _map_from_peer(self, v, prot: int, flags: int) -> None:
        """MAP_SHARED anonymous memory of a format 2.0 tree image: map the object the
        owner restored."""
        slot, start = v.shared_with
        owner = self.ctx.peers.get(slot)
        img = self.ctx.peer_images.get(slot)
        ov = next((o for o in img.vmas if o.start == start), None) if img else None
        if owner is None or ov is None:
            raise RestoreError(f"shared mapping {v.start:#x}: its owner (slot {slot}) is missing")
        self._map_via(owner, ov.start, ov.end, v, prot, flags)

    def finish_vmas(self) -> None:
        """Protections, advice and locks of every VMA: one injected program (a process
        with many threads has a stack and a guard page each)."""
        attrs.before_finish(self)  # guard regions, anon names (restore/attrs.py)
        prog = _Batch(self, lambda size: program.Area(self.inj, size), len(self.proc.vmas) * 4)
        for v in self.proc.vmas:
            if v.kind in VDSO_KINDS:
                continue
            if "ac" in v.vmflags and not v.prot & abi.PROT_WRITE:
                syscalls.mprotect(prog, v.start, v.size, v.prot)
            for flag, advice in MADV.items():
                if flag in v.vmflags:
                    # best effort (e.g. THP off): the raw result, no exception
                    prog.raw(abi.NR_MADVISE, v.start, v.size, advice)
            if "lo" in v.vmflags:
                self._mlock(v, prog)
        try:
            prog.run()
        finally:
            prog.close()
        attrs.after_finish(self)  # mseal: last

    def _mlock(self, v, prog: _Batch) -> None:
        """mlock'd memory, locked again while the restorer still has ckpt's credentials
        and limits (CAP_IPC_LOCK): a process that locked it before it dropped root, or
        whose RLIMIT_MEMLOCK is lower now, keeps it locked as it was."""
        flags = abi.MLOCK_ONFAULT if "lf" in v.vmflags else 0

        def refused(exc: RemoteError) -> RestoreError:
            return RestoreError(
                f"cannot lock memory {v.start:#x}-{v.end:#x} ({v.size} bytes, mlock'd in "
                f"process {self.proc.pid}): {os.strerror(exc.errno)} (ckpt needs CAP_IPC_LOCK "
                "or a RLIMIT_MEMLOCK that large)"
            )

        prog.call(abi.NR_MLOCK2, v.start, v.size, flags, name="mlock2", fail=refused)

    def _free_area(self, size: int) -> program.Area:
        """A program area where neither the restorer nor the image maps anything (the
        restorer's layout is being built)."""
        busy = getattr(self, "_busy", None)  # the restorer's first layout and the image's
        if busy is None:
            busy = [(m.start, m.end) for m in procfs.maps(self.pid)]
        busy = busy + [(v.start, v.end) for v in self.proc.vmas]
        s = self.inj.scratch
        busy.append((s.addr, s.addr + s.size))
        return program.Area(self.inj, size, free_range(busy, program.Area.mapped(size)))

    def set_mm(self) -> None:
        mm = self.proc.mm
        inj = self.inj
        inj.reset_data()
        auxv = inj.put(mm.auxv)
        exe_path = mm.exe.path if mm.exe else self.proc.exe
        # The kernel refuses a new exe while the old one is still mapped (EBUSY);
        # when the image maps the restorer's own executable, it already is the exe.
        exe_fd = -1
        if not _same_file(procfs.path(self.pid, "exe"), exe_path):
            flags = abi.O_RDONLY | abi.O_CLOEXEC
            exe_fd = (
                open_checked(inj, exe_path, flags, "executable", ref=mm.exe, fmt=S_IFREG)
                if mm.exe is not None
                else syscalls.openat(inj, _u(abi.AT_FDCWD), inj.cstr(exe_path), flags, 0)
            )
        try:
            st = struct.pack(
                "<11QQIi",
                mm.start_code, mm.end_code, mm.start_data, mm.end_data, mm.start_brk, mm.brk,
                mm.start_stack, mm.arg_start, mm.arg_end, mm.env_start, mm.env_end,
                auxv, len(mm.auxv), exe_fd,
            )  # fmt: skip
            syscalls.prctl(inj, abi.PR_SET_MM, abi.PR_SET_MM_MAP, inj.put(st), len(st), 0)
        finally:
            if exe_fd >= 0:
                syscalls.close(inj, exe_fd)

    def restore_fds(self) -> None:
        c = self.ctx
        restore_fds(self.inj, self.proc, c.peers, c.parked, c.terminal, c.externals,
                    c.pids or {self.proc.pid: self.pid}, self.unlinked,
                    ptys=c.ptys)  # fmt: skip

    def restore_process_misc(self) -> None:
        p, inj = self.proc, self.inj
        inj.reset_data()
        if self.ctx.shell_job:  # a job of ckpt's terminal: no setsid (ckpt's session)
            syscalls.setpgid(inj, 0, 0)
        elif p.sid == p.pid:
            if not self.session_done:
                syscalls.setsid(inj)
                attach_ctty(inj, p, self.ctx.ptys)  # restore/tty.py
        elif p.pgid == p.pid:
            syscalls.setpgid(inj, 0, 0)
        syscalls.prctl(inj, abi.PR_SET_NAME, inj.cstr(p.comm[:15]), 0, 0, 0)
        chdir_resolved(inj, p.cwd)  # no symlink followed (restore/hostfs.py)
        syscalls.umask(inj, p.umask)
        syscalls.personality(inj, p.personality)
        syscalls.prctl(inj, abi.PR_SET_DUMPABLE, p.dumpable, 0, 0, 0)
        syscalls.prctl(inj, abi.PR_SET_CHILD_SUBREAPER, p.child_subreaper, 0, 0, 0)
        # PR_GET_THP_DISABLE: 1 | flags (6.18: PR_THP_DISABLE_EXCEPT_ADVISED); set takes both
        syscalls.prctl(inj, abi.PR_SET_THP_DISABLE, p.thp_disable & 1, p.thp_disable & ~1, 0, 0)
        syscalls.prctl(inj, abi.PR_SET_PDEATHSIG, 0, 0, 0, 0)
        _thread_misc(inj, p.threads[0])

    def create_threads(self) -> None:
        """The other threads: clone3 from the leader (with their TIDs), then their own state.

        Each new thread is traced as the leader is (CLONE_PTRACE: with its options,
        no PTRACE_EVENT_CLONE stop of the leader) and stops before it runs a single
        instruction; from then on it is injected into like the leader. Credentials
        are set later, per thread, because setresuid changes only the calling thread.

        Injected programs (kernel/program.py): the leader runs every clone3 in one,
        then each new thread runs its own calls (name, sigaltstack, robust list, rseq)
        in one, all threads at once; a failure is raised as the calls one by one would
        have raised it (a thread's own calls before the clone of the next thread).
        """
        extra = self.proc.threads[1:]
        if not extra:
            return
        inj = self.inj
        # each thread's programs: creation ~600 bytes, attributes ~800, rseq and
        # parent-death signal ~100 each, its pending signals (restore_signals) ~200
        # each, credentials copied from another thread (restore/security.py) ~2 KiB
        # and 8 bytes a supplementary group; reserved only (MAP_NORESERVE), touched as
        # used, mapped before the process's own limits apply
        most = max(len(t.pending) for t in extra)
        sec = self.proc.security
        groups = max((len(c.groups) for c in sec.threads), default=0) if sec else 0
        area = self.area = program.Area(inj, len(extra) * (16384 + 256 * most + 8 * groups))
        clones = program.Program(area, self.tracee, inj.template, data=len(extra) * 104)
        for t in extra:
            set_tid = 0 if self.new_pid else clones.put(struct.pack("<i", t.tid))
            # clear_child_tid comes with the clone (CLONE_CHILD_CLEARTID): one
            # injected set_tid_address less per thread
            ctid = t.clear_child_tid
            flags = THREAD_FLAGS | abi.CLONE_PTRACE | (abi.CLONE_CHILD_CLEARTID if ctid else 0)
            args = struct.pack("<11Q", flags, 0, ctid, 0, 0, 0, 0, 0, set_tid,
                               0 if self.new_pid else 1, 0)  # fmt: skip
            clones.call(abi.NR_CLONE3, clones.put(args), len(args), name="clone3",
                        fail=lambda exc, t=t: self._clone_failed(t, exc))  # fmt: skip
        program.run([clones], raise_first=False)
        progs = []
        for t, tid in zip(extra, clones.results):
            if tid is None or tid < 0:
                break
            tr = Tracee(tid, self.pid)
            tr.attached = True
            st = tr.wait()
            if not os.WIFSTOPPED(st):
                raise RestoreError(f"new thread {tid} did not stop (status {st:#x})")
            tr.parked = True  # its first stop, inside get_signal()
            self.threads.append((t, tr, inj.for_thread(tr)))  # any of the process's registers
            self.tid_map[t.tid] = tid
            self._pending[tid] = {struct.unpack_from("<i", i)[0] for i in t.pending}
            prog = program.Program(area, tr, inj.template, data=128)
            if t.comm and t.comm[:15] != self.proc.comm[:15]:  # else inherited
                syscalls.prctl(prog, abi.PR_SET_NAME, prog.cstr(t.comm[:15]), 0, 0, 0)
            _thread_misc(prog, t, tid_address=False)
            if t.rseq is not None:  # here rather than in register_rseq: one program less
                syscalls.rseq(prog, t.rseq.ptr, t.rseq.size, 0, t.rseq.signature)
            progs.append(prog)
        program.run(progs, live=self._live)  # nothing pending yet: no signal queued
        clones.raise_first()

    def thread_programs(self, data: int = 0) -> list[tuple[Thread, program.Program]]:
        """An empty injected program for each thread but the leader, to record setters
        into with the usual code (syscalls.*, which sees an Injector), then run them all
        at once with run_thread_programs."""
        if self.area is None:
            return []
        tmpl = self.inj.template
        return [(t, program.Program(self.area, tr, tmpl, data)) for t, tr, _ in self.threads]

    def run_thread_programs(self, progs: list[tuple[Thread, program.Program]],
                            raise_first: bool = True) -> None:  # fmt: skip
        """Run the programs of thread_programs; raise the first failure in thread order
        (raise_first=False: each program's raise_first() is the caller's)."""
        program.run([p for _, p in progs], pending=lambda tr: self._pending.get(tr.pid, set()),
                    live=self._live, raise_first=raise_first)  # fmt: skip

    def replay(self, rec: program.Recording, tracees: list[Tracee]) -> list[program.Program]:
        """rec's calls (made in one thread) in each of these threads, as one injected
        program each, all at once (program.replay; restore/security.py)."""
        return program.replay(rec, self.area, tracees, self.inj.template,
                              pending=lambda tr: self._pending.get(tr.pid, set()),
                              live=self._live)  # fmt: skip

    def _clone_failed(self, t: Thread, exc: RemoteError) -> BaseException:
        if not self.new_pid and exc.errno == errno.EEXIST:
            return PidInUse(
                f"TID {t.tid} (a thread of process {self.proc.pid}) is in use; "
                "restore with --new-pid",
                pid=t.tid,
            )
        return RestoreError(f"cannot create thread {t.tid}: {exc.strerror}")

    def _live(self, tr: Tracee) -> Injector:
        """The Injector of a thread (program.run: one whose calls must run one by one)."""
        return next(ti for _, t, ti in self.threads if t is tr)

    def restore_signals(self) -> None:
        inj = self.inj
        inj.reset_data()
        acts = {a.signo: a for a in self.proc.sigactions}
        # every disposition (62 of them) in one injected program, not 62 round trips
        sigs = [sig for sig in range(1, 65) if sig not in (9, 19)]
        base = inj.alloc(32 * len(sigs))
        inj.write(base, b"".join(
            struct.pack("<QQQQ", a.handler, a.flags, a.restorer, a.mask)
            if (a := acts.get(sig)) else bytes(32) for sig in sigs
        ))  # fmt: skip
        batch = _Batch(self, lambda size: program.Area(inj, size), len(sigs))
        try:
            for i, sig in enumerate(sigs):
                syscalls.rt_sigaction(batch, sig, base + 32 * i, 0, 8)
            batch.run()
        finally:
            batch.close()
        inj.reset_data()
        pid = self.pid
        for info in self.proc.threads[0].pending:
            inj.write(buf := inj.alloc(128), info)
            syscalls.rt_tgsigqueueinfo(inj, pid, pid, struct.unpack_from("<i", info)[0], buf)
            inj.reset_data()
        # each other thread queues its own: the kernel lets only the thread itself queue
        # a siginfo of tgkill (SI_TKILL), kill or the kernel's for it (EPERM otherwise);
        # one injected program per thread, all at once
        if any(t.pending for t, _, _ in self.threads):
            most = max(len(t.pending) for t, _, _ in self.threads)
            progs = self.thread_programs(data=128 * most + 64)
            for (t, prog), (_, tr, _) in zip(progs, self.threads, strict=True):
                for info in t.pending:
                    sig = struct.unpack_from("<i", info)[0]
                    syscalls.rt_tgsigqueueinfo(prog, pid, tr.pid, sig, prog.put(info))
            self.run_thread_programs(progs)
        for info in self.proc.shared_pending:
            inj.write(buf := inj.alloc(128), info)
            syscalls.rt_sigqueueinfo(inj, pid, struct.unpack_from("<i", info)[0], buf)
            inj.reset_data()

    def restore_timers(self) -> None:
        inj = self.inj
        for it in self.proc.itimers:
            inj.reset_data()
            val = struct.pack("<qqqq", it.interval_us // 10**6, it.interval_us % 10**6,
                              it.value_us // 10**6, it.value_us % 10**6)  # fmt: skip
            syscalls.setitimer(inj, it.which, inj.put(val), 0)
        timers = sorted(self.proc.posix_timers, key=lambda t: t.id)
        if not timers:
            return
        by_id = inj.raw(abi.NR_PRCTL, abi.PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0) == 0
        if not by_id and [t.id for t in timers] != list(range(len(timers))):
            raise RestoreError(
                "POSIX timer ids cannot be restored on this kernel (needs Linux 6.15+)"
            )
        try:
            for t in timers:
                inj.reset_data()
                tid = self.tid_map.get(t.notify_tid, self.pid) if t.notify & 4 else 0
                sev = struct.pack("<qii", t.sigev_value, t.signo, t.notify) + struct.pack("<i", tid)
                sev = sev.ljust(64, b"\0")
                idp = inj.put(struct.pack("<i", t.id))
                syscalls.timer_create(inj, t.clock_id & 0xFFFFFFFF, inj.put(sev), idp)
                got = struct.unpack("<i", inj.read(idp, 4))[0]
                if got != t.id:
                    raise RestoreError(f"POSIX timer {t.id} came back as {got}")
                if t.value_ns:
                    its = struct.pack("<qqqq", t.interval_ns // 10**9, t.interval_ns % 10**9,
                                      t.value_ns // 10**9, t.value_ns % 10**9)  # fmt: skip
                    syscalls.timer_settime(inj, t.id, 0, inj.put(its), 0)
        finally:
            if by_id:
                inj.raw(abi.NR_PRCTL, abi.PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)

    def restore_rlimits(self) -> None:
        """prlimit64(0, …) inside the process, before its credentials are set (setting
        another process's limits needs CAP_SYS_RESOURCE or its uids). Rlimits belong to
        the process, so the leader sets them for every thread; only those that differ
        from what the restorer inherited from ckpt. Lowering always works; a hard limit
        above ckpt's needs CAP_SYS_RESOURCE, else the restore fails naming the limit."""
        have = procfs.limits(self.pid)
        inj = self.inj
        inj.reset_data()
        buf = inj.alloc(16)
        for r, (soft, hard) in sorted((int(k), v) for k, v in self.proc.rlimits.items()):
            if have.get(r) == [soft, hard]:
                continue
            inj.write(buf, struct.pack("<QQ", _u(soft), _u(hard)))
            try:
                syscalls.prlimit64(inj, 0, r, buf, 0)
            except RemoteError as exc:
                msg = _rlimit_refused(self.proc.pid, r, soft, hard, have.get(r), exc)
                raise RestoreError(msg) from exc

    def restore_creds(self) -> None:
        if self.proc.security is not None:  # per thread, capabilities, seccomp last
            restore_security_creds(self)
        else:  # an image from before security contexts
            for inj in [self.inj, *(ti for _, _, ti in self.threads)]:
                _set_creds(inj, self.proc)
        # a change of uid or gid made the mm non-dumpable (fs.suid_dumpable): as it was
        syscalls.prctl(self.inj, abi.PR_SET_DUMPABLE, self.proc.dumpable, 0, 0, 0)

    def register_rseq(self) -> None:
        """The leader's rseq area, last (the other threads registered theirs as they were
        made: create_threads)."""
        lead = self.proc.threads[0]
        if lead.rseq is not None:
            syscalls.rseq(self.inj, lead.rseq.ptr, lead.rseq.size, 0, lead.rseq.signature)

    def close_table_holders(self) -> None:
        """A member sharing an earlier member's fd table: its memfds sealed, its holders
        closed, before that member restores the table's fds (restore/fds.py)."""
        if self.proc.files_of >= 0:
            close_table_holders(self.inj, self.proc, self.ctx.holder_base)

    def restore_fd_owners(self, pids: dict[int, int]) -> None:
        """SIGIO owners, F_SETSIG, O_ASYNC (restore/fds.py): after every process and thread
        of the tree exists and the credentials are set. pids: at the dump → now."""
        restore_owners(self.inj, self.proc, pids, os.getpgid(self.pid))

    def leave(self) -> None:
        """Scratch gone, then every thread gets its registers back and runs."""
        if self.area is not None:
            self.area.close()
            self.area = None
        s = self.inj.scratch
        syscalls.munmap(self.inj, s.addr, s.size)
        lead = self.proc.threads[0]
        self.tracee.stop_in_signal_path()
        self.tracee.set_xstate(lead.xstate)
        self.tracee.setregs(restore_regs(lead.regs))
        self.tracee.set_sigmask(lead.sigmask)
        # the other threads all at once (C: ck_leave_many): most are parked already,
        # in the stop their last injected program ended with
        ts = [t for t, _, _ in self.threads]
        trs = [tr for _, tr, _ in self.threads]
        same = len({len(t.xstate) for t in ts}) <= 1
        program.leave_many(trs, [t.sigmask for t in ts], [restore_regs(t.regs) for t in ts],
                           [t.xstate for t in ts] if same else None)  # fmt: skip
        if not same:
            for t, tr in zip(ts, trs):
                tr.set_xstate(t.xstate)
        for tr in trs:
            tr.detach()
        self.tracee.detach()


def clone_traced(
    tracee: Tracee, inj: Injector, want: int | None, exit_signal: int, flags: int
) -> Tracee:
    """clone3 in a stopped restorer (or a stand-in of restore/sessions.py) that has a
    scratch area: its child (with CLONE_PARENT: its sibling, which takes the caller's
    own exit signal, so `exit_signal` must be 0), with PID `want` when given, traced
    and stopped before its first instruction (Rebuilder.fork_child)."""
    inj.reset_data()
    set_tid = inj.put(struct.pack("<i", want)) if want else 0
    args = struct.pack("<11Q", flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid,
                       1 if want else 0, 0)  # fmt: skip
    base = PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL
    tracee.set_options(base | PTRACE_O_TRACEFORK | PTRACE_O_TRACECLONE)
    try:
        try:
            pid = syscalls.clone3(inj, inj.put(args), len(args))
        except RemoteError as exc:
            if want and exc.errno == errno.EEXIST:
                raise PidInUse(
                    f"PID {want} (a process of the tree) is in use; restore with --new-pid",
                    pid=want,
                ) from exc
            raise RestoreError(f"cannot create a tree member: {exc.strerror}") from exc
    finally:
        tracee.set_options(base)
    child = Tracee(pid)
    child.attached = True
    st = child.wait()
    if not os.WIFSTOPPED(st):
        raise RestoreError(f"new tree member {pid} did not stop (status {st:#x})")
    return child


def _thread_misc(inj: Injector, t: Thread, *, tid_address: bool = True) -> None:
    """Per-thread kernel state that only the thread itself can set.

    tid_address=False: a thread made by create_threads, whose clear_child_tid the
    clone already set."""
    inj.reset_data()
    sp, flags, size = t.sigaltstack
    if not flags & 2:  # not SS_DISABLE
        syscalls.sigaltstack(inj, inj.put(struct.pack("<QiiQ", sp, flags, 0, size)), 0)
    head, ln = t.robust_list
    if head:
        syscalls.set_robust_list(inj, head, ln)
    if tid_address:
        syscalls.set_tid_address(inj, t.clear_child_tid)


def _set_creds(inj: Injector, p: ProcessImage) -> None:
    """Credentials and no_new_privs belong to each thread (glibc syncs them by signals)."""
    if p.no_new_privs:
        syscalls.prctl(inj, abi.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if p.uids[:3] == [0, 0, 0] and p.gids[:3] == [0, 0, 0]:
        return
    inj.reset_data()
    groups = struct.pack(f"<{len(p.groups)}I", *p.groups)
    syscalls.setgroups(inj, len(p.groups), inj.put(groups) if groups else 0)
    syscalls.setresgid(inj, *p.gids[:3])
    syscalls.setresuid(inj, *p.uids[:3])


def _rlimit_refused(pid: int, r: int, soft: int, hard: int, have, exc: RemoteError) -> str:
    def show(v: int) -> str:
        return "unlimited" if _u(v) == _u(-1) else str(v)

    name = RLIMIT_NAMES[r] if r < len(RLIMIT_NAMES) else f"rlimit {r}"
    msg = (
        f"cannot set {name} of process {pid} to soft {show(soft)}, hard {show(hard)}: "
        f"{os.strerror(exc.errno)}"
    )
    if exc.errno == errno.EPERM and have is not None and _u(hard) > _u(have[1]):
        msg += (
            f" (ckpt's own hard limit is {show(have[1])}; raising it needs CAP_SYS_RESOURCE: "
            "restore from a shell with that hard limit)"
        )
    return msg


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def free_range(busy: list[tuple[int, int]], size: int, lo: int = 1 << 32) -> int:
    """Lowest address >= lo with `size` bytes free of every busy range."""
    spans = sorted(busy)
    addr = lo
    for a, b in spans:
        if b <= addr:
            continue
        if a >= addr + size:
            break
        addr = max(addr, (b + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)
    if addr + size > abi.TASK_SIZE:
        raise RestoreError("no free address range for the restorer's scratch area")
    return addr


class _Batch(program.CallRecorder):
    """The leader's calls, recorded (the Injector interface: syscalls.*) and run as one
    injected program (kernel/program.py) when run() is called; failures are raised
    then, in order, as the calls one by one would have raised them. mmap(v): an
    anonymous mapping of VMA v, which must land at its start."""

    def __init__(self, rb: Rebuilder, make_area: Callable[[int], program.Area], calls: int):
        """make_area(size): the program area (made at the first run, for `calls` calls
        in all, unmapped by close())."""
        self.rb = rb
        self.make_area = make_area
        self.size = (calls + 1) * program.ENTRY + 64 * program.HEADER
        self.area: program.Area | None = None
        self.calls: list[tuple[int, tuple[int, ...], bool, str, object]] = []
        self.landing: dict[int, int] = {}  # call index → where its mmap must land

    def mmap(self, v, prot: int, flags: int) -> None:
        self.landing[len(self.calls)] = v.start
        syscalls.mmap(self, v.start, v.size, prot, flags, _u(-1), 0)

    def run(self) -> None:
        calls, landing = self.calls, self.landing
        self.calls, self.landing = [], {}
        if not calls:
            return
        if self.area is None:
            self.area = self.make_area(max(self.size, (len(calls) + 1) * program.ENTRY))
        prog = program.Program(self.area, self.rb.tracee, self.rb.inj.template, data=0)
        prog.calls = calls
        program.run([prog], raise_first=False)
        for i, r in enumerate(prog.results):
            if r is None:
                break
            if i in landing and not -4096 < r < 0 and r != landing[i]:
                raise RestoreError(f"mapping {landing[i]:#x} landed at {r:#x}")
            if calls[i][2] and -4096 < r < 0:
                prog.raise_first()

    def close(self) -> None:
        if self.area is not None:
            self.area.close()
            self.area = None
