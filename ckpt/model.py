"""Dataclasses of captured process state: what an image's state file holds.

One root object (ProcessImage); each part knows its own fields. Serialized
with dataclasses.asdict → msgpack; `from_dict` rebuilds it and ignores keys it
does not know (a newer minor format may add fields).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")

SLOT_SHIFT = 48  # user addresses stay below 2^47
# Shared memory objects have key spaces of their own, above any tree member's slot:
# object space SHM_SPACE0 + i holds its pages keyed by offset in the object.
SHM_SPACE0 = 1 << 14
MAX_SPACE = (1 << 16) - 1  # keys stay below 2^64


def slot_base(slot: int) -> int:
    """Page keys of tree member `slot` (0 = the root) are slot_base(slot) | vaddr."""
    return slot << SLOT_SHIFT


@dataclass
class FileRef:
    """Identity of a file at dump time, to refuse restoring against a changed file."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int


@dataclass
class SysvShm:
    """The SysV shared memory segment a VMA attaches (kernel/sysvshm.py)."""

    shmid: int
    key: int
    size: int
    mode: int  # permission bits (and SHM_DEST: marked for deletion, gone with its users)
    uid: int
    gid: int


@dataclass
class Vma:
    start: int
    end: int
    prot: int  # PROT_* bits
    shared: bool
    kind: str  # "anon", "file", "shmem", "heap", "stack", "vdso", "vvar", "vvar_vclock",
    #            "unlinked" (an unlinked file: `file` names it, an Fd record holds it)
    name: str
    offset: int = 0
    vmflags: list[str] = field(default_factory=list)
    file: FileRef | None = None
    # Pages holding data at the final freeze, as [vaddr, npages] runs; data is in the layers.
    present: list[list[int]] = field(default_factory=list)
    # MAP_SHARED anonymous memory another process of the tree restores first:
    # [slot, start] of its VMA of the same object (format 2.0 images; newer ones use shm)
    shared_with: list[int] | None = None
    sysv: SysvShm | None = None  # kind "sysv"
    # kinds "shmem" and "sysv": index of the object it maps in the root's `shm` list;
    # its pages are the object's (ShmObject.present), never the VMA's own
    shm: int = -1
    # guard regions (MADV_GUARD_INSTALL) inside it, as [vaddr, npages] runs
    guards: list[list[int]] = field(default_factory=list)
    # copy-on-write since a fork: [vaddr, npages] runs of its present pages that are the
    # parent's (tree slot cow_from, its VMA of the same range) too (capture/cow.py)
    cow_from: int = -1
    cow: list[list[int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class ShmObject:
    """A shared memory object the dumped processes map (MAP_SHARED anonymous memory,
    a SysV segment, a tmpfs file mapped shared): stored once, by offset in the object,
    with the content it has at the freeze whichever process wrote it, including pages
    no process has mapped in.

    Pages are keyed slot_base(space) | offset. `digest` holds 8 bytes per present page
    (in `present` order): the digest of the copy the layers hold, which lets the next
    round or snapshot store only pages whose content changed (capture/shm.py).
    """

    kind: str  # "shmem", "sysv", or "file" (a tmpfs file such as /dev/shm/x, mapped shared)
    space: int
    size: int  # bytes
    dev: int  # identity of the object at the dump (its shmem inode)
    ino: int
    present: list[list[int]] = field(default_factory=list)  # [offset, npages]
    digest: bytes = b""
    sysv: SysvShm | None = None
    name: str = ""  # kind "file": its path (the VMAs mapping it have the FileRef)
    owner: list[int] = field(default_factory=list)  # kind "file": [mode, uid, gid]


@dataclass
class MemfdState:
    """A memfd's content, on the first Fd record of that memfd (see Fd.obj_id)."""

    name: str  # as given to memfd_create
    size: int
    mode: int
    seals: int  # F_GET_SEALS
    extents: list[list] = field(default_factory=list)  # [offset, bytes]; the rest is holes
    maps: list[int] = field(default_factory=list)  # start addresses of VMAs mapping it
    # a process tree: the slot whose restore makes this memfd (this record's content
    # and seals are there); -1: made here
    shared_from: int = -1


@dataclass
class TimerfdState:
    clockid: int
    value_ns: int  # remaining time; 0 = disarmed
    interval_ns: int
    ticks: int  # expirations not read yet
    settime_flags: int = 0


@dataclass
class EpollEntry:
    tfd: int  # the fd number the registration is keyed by
    events: int
    data: int
    src_fd: int = -1  # an fd holding the registered file when tfd no longer does (else tfd)
    # On a "peer" record (an epoll taken from an earlier tree member), Fd.epoll lists the
    # registrations this member adds: only it holds their files (capture/tree.py).


@dataclass
class InotifyWatch:
    wd: int
    mask: int  # user-visible mask (IN_* events, IN_ONESHOT, IN_EXCL_UNLINK…)
    path: str
    dev: int
    ino: int


@dataclass
class FileLock:
    """A lock held through an fd (capture/locks.py, restore/locks.py). Whose it is
    follows from the record that carries it: a POSIX lock is the process's (on the
    first fd of its open file description in that process); flock, OFD locks and
    leases belong to the description (on its one real record in the tree, never on
    a "dup" or "peer")."""

    kind: str  # "flock", "posix", "ofd", "lease" (LOCK_KINDS)
    write: bool  # exclusive (LOCK_EX, F_WRLCK) rather than shared (LOCK_SH, F_RDLCK)
    start: int = 0  # posix/ofd: first byte locked
    end: int = -1  # posix/ofd: last byte locked; -1: to the end of the file and beyond


LOCK_KINDS = frozenset({"flock", "posix", "ofd", "lease"})


@dataclass
class TtyState:
    """A terminal outside the dump, as a process of it used it (capture/tty.py): a shell
    job's (kind "tty", ckpt dump --shell-job), or the pseudo-terminal of a session the
    dump leads whose master is held outside (kind "pts" with obj_id 0, and the session
    leader's "ctty" record), taken back only by `ckpt restore --reattach-tty`."""

    name: str  # the terminal, e.g. /dev/pts/3 (the fd itself may be /dev/tty)
    rdev: int  # its device number
    ctty: bool  # it is the process's controlling terminal
    pgid: int  # a job: the process's group; a "ctty" record: the foreground group
    foreground: bool  # that group was the terminal's foreground process group
    termios: bytes = b""  # struct termios (TCGETS), put back on the terminal
    # an outside pty to reattach: the slave inode's filesystem (its devpts) and owner,
    # and a process that held its master at the dump (PID, start time): the same
    # terminal only while that process still holds a master of this inode
    dev: int = 0
    uid: int = -1
    gid: int = -1
    holder: int = 0
    holder_start: int = 0


@dataclass
class PtyState:
    """A pseudo-terminal pair whose master is held in the dump (capture/tty.py): on the
    first "ptmx" record of the master in the tree; its "pts" records (slave fds) and a
    session leader's "ctty" record name it by obj_id. restore/tty.py makes a new pair (a
    new /dev/pts number) with all of this."""

    index: int  # N of /dev/pts/N at the dump
    ptmx: str  # the path the master was opened through (/dev/ptmx or /dev/pts/ptmx)
    termios: bytes  # the slave's struct termios (TCGETS on the master reads the slave's)
    winsize: bytes  # struct winsize (8 bytes)
    locked: bool = False  # TIOCGPTLCK: the slave cannot be opened
    packet: bool = False  # TIOCGPKT: the master reads in packet mode
    excl: bool = False  # TIOCGEXCL of the master
    slave_excl: bool = False  # TIOCGEXCL of the slave (read through a slave fd of the dump)
    slave_closed: bool = False  # its slave was opened and every slave fd closed since
    uid: int = 0  # the slave inode's owner, group, mode and times
    gid: int = 0
    mode: int = 0o600
    atime_ns: int = 0
    mtime_ns: int = 0
    # what the slave side wrote that the master has not read yet (after output processing)
    output: bytes = b""


@dataclass
class PidfdState:
    """What a pidfd names (kind "pidfd"; capture/fd_kinds.py): its fdinfo's `Pid:` and
    that process's start time. A process of the image (the tree, its zombies) gets a
    pidfd of its restored self (the mapped PID with --new-pid); any other must still
    run with the same start time at restore. PIDFD_THREAD is O_EXCL in Fd.flags."""

    pid: int  # as ckpt saw it (a TID for a thread pidfd); -1: exited and reaped
    start: int = 0  # its start time (clock ticks after boot, /proc/PID/stat field 22)


@dataclass
class UnlinkedFile:
    """The content of a regular file that was unlinked while open or mapped (kind
    "unlinked"): on one record of the image per file (the first that holds it); every
    fd and VMA of it names it by its FileRef (dev, ino; path without " (deleted)").
    restore/unlinked.py makes it again with O_TMPFILE in the same directory. Also the
    content of a file written at its offset (Fd.content)."""

    size: int
    mode: int  # permission bits (setuid, setgid and sticky too)
    uid: int
    gid: int
    extents: list[list] = field(default_factory=list)  # [offset, bytes]; the rest is holes


@dataclass
class Fd:
    fd: int  # -1: an object only mappings hold (a memfd whose fds were closed)
    kind: str  # "file", "chr", "pipe", "fifo", "eventfd", "timerfd", "signalfd",
    #            "epoll", "inotify", "memfd", "dup", "tty", "ptmx", "pts", "ctty"…
    path: str
    flags: int  # open flags without O_CLOEXEC
    cloexec: bool
    pos: int
    file: FileRef | None = None
    # kind "file" written at its offset (writes_at_offset): the file's content at the
    # dump, when it was small enough (capture/written.py; restore/written.py puts it back)
    content: UnlinkedFile | None = None
    rdev: int = 0
    dup_of: int = -1  # another fd of the process sharing this open file description
    # Who gets the description's SIGIO/SIGURG: [F_OWNER_* type (0 TID, 1 PID, 2 PGRP),
    # PID/TID/PGID as the dump saw it] (F_GETOWN_EX); [] when nobody. sigio: F_GETSIG,
    # the signal sent instead of SIGIO (0: SIGIO). O_ASYNC itself is in flags.
    # (A "memfd" record with peer_slot >= 0 is the same description as fd peer_fd of
    # that earlier tree member: inherited across fork; capture/tree.py.)
    owner: list[int] = field(default_factory=list)
    sigio: int = 0
    socket: Socket | None = None  # kind "socket" (ckpt/capture/sockets.py)
    # Identity of the kernel object behind the fd (pipe/FIFO/memfd inode): records
    # with the same obj_id share one object; its state is on the first of them.
    obj_id: int = 0
    pipe_size: int = 0  # pipe/FIFO capacity (F_GETPIPE_SZ), on the object's first fd
    data: bytes = b""  # pipe/FIFO buffered bytes, on the object's first fd
    count: int = 0  # eventfd counter
    semaphore: bool = False  # EFD_SEMAPHORE
    sigmask: int = 0  # signalfd
    timer: TimerfdState | None = None
    epoll: list[EpollEntry] = field(default_factory=list)
    watches: list[InotifyWatch] = field(default_factory=list)
    locks: list[FileLock] = field(default_factory=list)  # held through this fd (FileLock)
    memfd: MemfdState | None = None
    # kind "peer": the same open file description as fd `peer_fd` of the tree's
    # process `peer_slot` (restored there first, then taken with pidfd_getfd)
    peer_slot: int = -1
    peer_fd: int = -1
    tty: TtyState | None = None  # kind "tty"; "pts" and "ctty" of a terminal outside the dump
    pty: PtyState | None = None  # kind "ptmx": on the first record of the pair's master
    pidfd: PidfdState | None = None  # kind "pidfd"
    unlinked: UnlinkedFile | None = None  # kind "unlinked": on the record holding the content


# Fd kinds of major 6 (docs/FORMAT.md): a 5.x reader would refuse them by kind, but the
# major says why (a newer ckpt wrote it)
# ("ptmx": a pty master; "pts": a slave fd, or /dev/tty on one; "ctty": fd -1, the pty a
# session leader has as controlling terminal: a 6.0 reader without them refuses the kinds)
V6_FD_KINDS = frozenset({"pidfd", "unlinked", "proc", "pipe_open", "ptmx", "pts", "ctty"})

# Fd.kind values a state may hold: what restore/fds.py has a handler for (its KINDS), plus
# "dup" (another fd's open file description). Here, not read from restore/, so that
# checking a state needs nothing that loads the compiled extension (`ckpt verify`
# anywhere); tests/test_image_plain.py checks that the two agree.
FD_KINDS = frozenset(
    {
        "pipe_end", "peer", "external", "file", "dir", "chr", "memfd", "pipe", "fifo",
        "eventfd", "signalfd", "timerfd", "epoll", "inotify", "socket", "socket_end", "tty",
        "dup", *V6_FD_KINDS,
    }
)  # fmt: skip


@dataclass
class SigAction:
    signo: int
    handler: int
    flags: int
    restorer: int
    mask: int


@dataclass
class PosixTimer:
    id: int
    clock_id: int
    signo: int
    sigev_value: int
    notify: int  # SIGEV_* value
    notify_tid: int
    interval_ns: int
    value_ns: int  # remaining time; 0 = disarmed


@dataclass
class ITimer:
    which: int
    interval_us: int
    value_us: int


@dataclass
class Rseq:
    ptr: int
    size: int
    signature: int


@dataclass
class SchedAttr:
    """struct sched_attr of one thread (sched_getattr)."""

    policy: int  # SCHED_OTHER 0, FIFO 1, RR 2, BATCH 3, IDLE 5, DEADLINE 6, EXT 7
    flags: int  # SCHED_FLAG_RESET_ON_FORK, DL flags
    nice: int
    priority: int  # rt priority
    runtime: int = 0  # SCHED_DEADLINE, ns
    deadline: int = 0
    period: int = 0
    util_min: int = 0
    util_max: int = 1024


@dataclass
class ThreadAttrs:
    """Per-thread attributes ckpt keeps (docs/ARCHITECTURE.md "Process attributes").
    None: not read (a kernel without it) — left as the restorer has it."""

    sched: SchedAttr | None = None
    affinity: list[int] | None = None  # CPU numbers
    ioprio: int | None = None  # ioprio_get(IOPRIO_WHO_PROCESS)
    timerslack: int | None = None  # ns, PR_GET_TIMERSLACK
    pdeathsig: int = 0  # PR_GET_PDEATHSIG
    tsc: int | None = None  # PR_GET_TSC: PR_TSC_ENABLE 1, PR_TSC_SIGSEGV 2
    mce_kill: int | None = None  # PR_MCE_KILL_GET
    cpuid: int | None = None  # ARCH_GET_CPUID: 1 cpuid works, 0 faults (SIGSEGV)
    io_flusher: bool = False  # PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE)
    # PR_GET_SPECULATION_CTRL of [store bypass, indirect branch, L1D flush] when the
    # system lets prctl control them (PR_SPEC_PRCTL), else None
    spec: list[int] | None = None
    # get_mempolicy: [mode | mode flags, nodemask]; None: no NUMA support
    mempolicy: list[int] | None = None


@dataclass
class ProcAttrs:
    """Per-process attributes ckpt keeps (docs/ARCHITECTURE.md "Process attributes")."""

    oom_score_adj: int = 0
    coredump_filter: int = 0x33
    # MEMBARRIER_CMD_GET_REGISTRATIONS: the REGISTER_* commands the mm has made; -1 unknown
    membarrier: int = -1
    ksm_merge_any: bool = False  # PR_SET_MEMORY_MERGE
    exit_signal: int = 17  # sent to the parent at exit (clone's exit_signal; SIGCHLD)


# Thread.regs keys: x86-64's struct user_regs_struct fields, in their order (kernel/ptrace.py
# reads and writes them by these names; its heal trampoline pops r15 … rdi in this order).
REG_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
    "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds",
    "es", "fs", "gs",
)  # fmt: skip


@dataclass
class Thread:
    tid: int
    regs: dict[str, int]  # REG_NAMES → value
    xstate: bytes
    sigmask: int
    pending: list[bytes]  # 128-byte siginfos of the thread's private queue
    sigaltstack: list[int]  # [ss_sp, ss_flags, ss_size]
    rseq: Rseq | None
    robust_list: list[int]  # [head, len]
    clear_child_tid: int
    comm: bytes = b""  # per-thread name (pthread_setname_np); empty: the process's
    attrs: ThreadAttrs | None = None  # scheduling, affinity, … (capture/attrs.py)


@dataclass
class MmFields:
    start_code: int
    end_code: int
    start_data: int
    end_data: int
    start_brk: int
    brk: int
    start_stack: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    auxv: bytes
    exe: FileRef | None


# default action ignore or stop: CHLD CONT STOP TSTP TTIN TTOU URG WINCH kill nobody
_NOT_FATAL = frozenset({17, 18, 19, 20, 21, 22, 23, 28})


@dataclass
class Zombie:
    """A descendant that had exited and was not waited for yet (capture/tree.py): only its
    PID, its place in the tree and what its parent's wait will read are left. Restored as
    a child of its restored parent that exits the same way (restore/zombies.py)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: bytes
    # the wait status (/proc/PID/stat field 52): code << 8 for exit(code), else the
    # signal that killed it, | 0x80 if it dumped core
    status: int
    exit_signal: int = 17  # what its exit sent the parent (SIGCHLD unless cloned otherwise)
    uids: list[int] = field(default_factory=list)  # real, effective, saved, fs
    gids: list[int] = field(default_factory=list)

    def status_ok(self) -> bool:
        """A status a process can die with: exit(0..255), or a signal whose default
        action terminates (ignore and stop signals never kill), with or without core."""
        sig = self.status & 0x7F
        if not sig:
            return not self.status & ~0xFF00
        return not self.status & ~0xFF and sig <= 64 and sig not in _NOT_FATAL


@dataclass
class ProcessImage:
    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: bytes
    cmdline: bytes
    exe: str
    cwd: str
    umask: int
    personality: int
    uids: list[int]
    gids: list[int]
    groups: list[int]
    rlimits: dict[int, list[int]]
    mm: MmFields
    vmas: list[Vma]
    fds: list[Fd]
    sigactions: list[SigAction]
    shared_pending: list[bytes]
    itimers: list[ITimer]
    posix_timers: list[PosixTimer]
    threads: list[Thread]
    no_new_privs: bool = False
    dumpable: int = 1
    child_subreaper: int = 0
    thp_disable: int = 0
    # The dumped process's descendants, parents before children; process i here
    # is "slot" i + 1 (the root is slot 0). Its pages are keyed slot << 48 | vaddr.
    tree: list[ProcessImage] = field(default_factory=list)
    # A tree member's page keys are slot_base(space) | vaddr; -1: its slot (a member
    # pre-copied with the root keeps the space it had when first seen)
    space: int = -1
    # nftables table dropping the dumped connections' packets and new connections to
    # the listeners until the restore deletes it (kernel/netlock.py); "" when none
    net_lock: str = ""
    starttime: int = 0  # /proc/PID/stat start time: (pid, starttime) names the process
    # the tree's shared memory objects (on the root only); Vma.shm indexes this list
    shm: list[ShmObject] = field(default_factory=list)
    attrs: ProcAttrs | None = None  # oom_score_adj, membarrier, … (capture/attrs.py)
    # credentials per thread, capabilities, seccomp, root, cgroups (capture/security.py);
    # None: an image from before it (restored with uids, gids, groups as before)
    security: SecurityContext | None = None
    # the tree's zombies (on the root only), each a child of a process of the tree
    zombies: list[Zombie] = field(default_factory=list)
    # a tree member made by clone(CLONE_FILES): the slot of the earlier member whose fd
    # table it shares (its parent, or a member sharing its parent's); -1: its own table
    files_of: int = -1

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcessImage:
        return from_dict(cls, data)


# What a format 1.x reader (ckpt before threads, trees and the new fd kinds) can
# restore faithfully. A state using anything else is written as major 2, which 1.x
# readers refuse: some of it they would restore wrongly and say nothing (a tree's
# children, memfd mappings, shared memory, the network lock).
V1_VMA_KINDS = frozenset({"anon", "file", "shmem", "heap", "stack", "vdso", "vvar", "vvar_vclock"})
# (a "sysv" VMA, for instance, a 1.x reader would map as empty anonymous memory)
V1_FD_KINDS = frozenset({"file", "chr", "dup"})


O_ASYNC = 0o20000  # (kernel/abi.py's; model imports nothing of kernel/)


def fd_owned(fd: dict[str, Any]) -> bool:
    """Does this fd record (as to_dict gives it) carry SIGIO state: an owner, a signal
    other than SIGIO, or O_ASYNC?"""
    return bool(fd.get("owner") or fd.get("sigio") or fd.get("flags", 0) & O_ASYNC)


O_ACCMODE, O_WRONLY, O_APPEND, O_PATH = 0o3, 0o1, 0o2000, 0o10000000  # (kernel/abi.py's)


def writes_at_offset(f: Fd) -> bool:
    """A regular file open write-only without O_APPEND: what the process writes lands at
    its own offset, so the restore needs the file as it was at the dump (an O_APPEND
    writer only adds at the end, a reader's file must be unchanged anyway)."""
    return f.kind == "file" and f.flags & (O_ACCMODE | O_APPEND | O_PATH) == O_WRONLY


def state_version(state: dict[str, Any]) -> tuple[int, int]:
    """(major, minor) of the state file for this process state (as to_dict gives it)."""
    procs = [state, *state.get("tree", ())]
    if any(fd_needs_v6(f) for p in procs for f in p.get("fds", ())):
        # a 5.x reader would drop this fd state (or refuse less than it should) silently
        return (6, 0)
    if any(p.get("files_of", -1) >= 0 for p in procs):
        # a 5.x reader would give a clone(CLONE_FILES) member a table of its own
        return (6, 0)
    if state.get("zombies"):
        # a 4.x reader would restore the tree without them: its parents' waits would fail
        return (5, 0)
    v2 = (
        bool(state.get("tree"))
        or bool(state.get("net_lock"))
        or any(
            len(p.get("threads", ())) > 1
            or any(
                v.get("kind") not in V1_VMA_KINDS or v.get("shared_with") for v in p.get("vmas", ())
            )
            or any(f.get("kind") not in V1_FD_KINDS for f in p.get("fds", ()))
            for p in procs
        )
    )
    if any(_needs_v4(p) or not (p.get("security") or {}).get("plain", True) for p in procs):
        # a 3.x reader would drop these process attributes or this sandbox and say nothing
        return (4, 0)
    if state.get("shm"):
        # a 2.0 reader would map the objects' VMAs as empty memory and say nothing
        return (3, 0)
    return (2, 0) if v2 else (1, 1)  # image.FORMAT_MAJOR, FORMAT_MINOR for 1.x


def fd_needs_v6(fd: dict[str, Any]) -> bool:
    """Is this fd's record (as to_dict gives it) something a 5.x reader would restore
    wrong without a word? Each fd feature added in major 6 adds its condition here
    (docs/FORMAT.md "Major 6")."""
    if fd.get("kind") == "peer" and fd.get("epoll"):  # epoll registrations of a member
        return True  # that takes the epoll: a 5.x reader would never add them
    if fd.get("content") is not None:  # a file written at its offset: a 5.x reader
        return True  # would reopen it as it is now, changed or gone
    if fd_owned(fd):  # SIGIO owner, F_SETSIG, O_ASYNC: a 5.x reader would drop them
        return True
    if fd.get("kind") == "memfd" and fd.get("peer_slot", -1) >= 0:  # a 5.x reader: reopens
        return True
    if tcp_closing(fd):  # a 5.x reader would rebuild the connection established, no FIN
        return True
    if socket_settings_v6(fd):  # options, filter, groups, UDP shutdown: a 5.x reader drops them
        return True
    if fd.get("kind") in V6_FD_KINDS:  # pidfds…: a 5.x reader knows no such kind
        return True
    if fd.get("kind") == "pipe" and fd.get("flags", 0) & 3 == 2:  # O_RDWR: a 5.x reader
        return True  # would leave that fd out (it places a read and a write end only)
    if scm_v6(fd):  # files in flight, credentials: a 5.x reader would send bytes alone
        return True
    return bool(fd.get("locks"))  # file locks: a 5.x reader would restore the fd without them


# What a process has without ever setting it (capture/attrs.py): the attributes a
# reader of majors <= 3 ignores. A state with anything else is major 4.
_PLAIN_THREAD = {
    "pdeathsig": (0,), "ioprio": (None, 0), "timerslack": (None, 50_000), "tsc": (None, 1),
    "mce_kill": (None, 2), "cpuid": (None, 1), "io_flusher": (False,),
}  # fmt: skip
_PLAIN_PROC = {
    "oom_score_adj": (0,), "coredump_filter": (0x33,), "membarrier": (-1, 0),
    "ksm_merge_any": (False,), "exit_signal": (17,),
}  # fmt: skip


def _needs_v4(p: dict[str, Any]) -> bool:
    """Guard regions, sealed or droppable memory, or process attributes that are not a
    plain process's (a restricted CPU affinity, a real-time policy, a parent-death
    signal…): a 3.x reader would restore the process without them."""
    vmas = p.get("vmas") or ()
    if any(v.get("guards") or {"sl", "dp"} & set(v.get("vmflags") or ()) for v in vmas):
        return True
    pa = p.get("attrs") or {}
    if any(pa.get(k, ok[0]) not in ok for k, ok in _PLAIN_PROC.items()):
        return True
    cpus = list(range(os.cpu_count() or 1))
    for t in p.get("threads") or ():
        a = t.get("attrs") or {}
        if any(a.get(k, ok[0]) not in ok for k, ok in _PLAIN_THREAD.items()):
            return True
        if a.get("affinity") not in (None, cpus) or any(s & 0x1C for s in a.get("spec") or ()):
            return True
        if (a.get("mempolicy") or [0])[0]:  # not MPOL_DEFAULT
            return True
        s = a.get("sched") or {}
        plain = {"policy": 0, "flags": 0, "nice": 0, "priority": 0, "runtime": 0, "deadline": 0,
                 "period": 0, "util_min": 0}  # fmt: skip
        if any(s.get(k, v) != v for k, v in plain.items()):
            return True
        if s.get("util_max", 0) not in (0, 1024):  # 0: a kernel without uclamp
            return True
    return False


def present_keys(state: dict[str, Any]) -> list[tuple[int, int]]:
    """Every page key the state says holds data, as (key, npages): each process's VMAs
    in its key space, and every shared memory object's pages in the object's.

    The one definition of "what an image must hold" for restore, verify, gc and the
    completeness check a dump runs before it reports success.
    """
    out: list[tuple[int, int]] = []
    for slot, p in enumerate([state, *(state.get("tree") or ())]):
        space = p.get("space", -1)
        base = slot_base(space if isinstance(space, int) and space >= 0 else slot)
        for v in p.get("vmas") or ():
            out.extend((base + int(r[0]), int(r[1])) for r in v.get("present") or ())
    for obj in state.get("shm") or ():
        base = slot_base(int(obj["space"]))
        out.extend((base + int(r[0]), int(r[1])) for r in obj.get("present") or ())
    return out


def to_plain(obj: Any) -> Any:
    """dataclasses.asdict without its deep copies (a 1000-thread image: 0.8 s → ms).

    The result shares no mutable containers with obj: lists and dicts are new;
    leaves (int, str, bytes, bool, None) are immutable.
    """
    kind = type(obj)
    if kind in _LEAVES:  # most values: returned before any dataclass check
        return obj
    conv = _PLAIN.get(kind)
    if conv is not None or _plain_names(kind) is not None:
        return (conv or _plain_code(kind))(obj)
    # (leaves kept inline: no call per register of each thread)
    if isinstance(obj, list | tuple):
        return [v if type(v) in _LEAVES else to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: v if type(v) in _LEAVES else to_plain(v) for k, v in obj.items()}
    return obj


_PLAIN: dict[type, Callable[[Any], dict[str, Any]]] = {}


def _plain_code(kind: type) -> Callable[[Any], dict[str, Any]]:
    """to_plain of a dataclass type as one dict display (a 1024-thread state: ~145k calls
    of to_plain, one per value, before): each field's value as is when it is a leaf,
    else through to_plain, exactly as the loop over its fields did."""
    items = ", ".join(f"{n!r}: v if type(v := o.{n}) in L else tp(v)" for n in _field_names(kind))
    env: dict[str, Any] = {"L": _LEAVES, "tp": to_plain}
    exec(compile(f"def p(o):\n    return {{{items}}}", f"<to_plain {kind.__name__}>", "exec"), env)
    _PLAIN[kind] = env["p"]
    return env["p"]


# Exact types only: a subclass (an IntEnum, say) takes the general path as before.
_LEAVES = frozenset({int, str, bytes, bool, float, type(None)})


@functools.cache
def _plain_names(kind: type) -> tuple[str, ...] | None:
    """The field names of a dataclass type, else None: dataclasses.is_dataclass per
    object cost a third of to_plain (145k calls for a 1024-thread image)."""
    return _field_names(kind) if dataclasses.is_dataclass(kind) else None


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _hints(cls: type) -> tuple[tuple[str, Any], ...]:
    """(field name, type) of a dataclass; get_type_hints is slow, and called per object."""
    hints = get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def from_dict(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass tree from plain data (as msgpack returns it), every field
    checked against the schema (ckpt/schema.py): a wrong type, a value out of range or
    a missing field raises schema.SchemaError (a ValueError) naming it."""
    from . import schema

    if cls is ProcessImage:
        return schema.build_state(data)
    return schema.build(cls, data)


@functools.cache
def _shape(tp: Any) -> tuple[str, Any]:
    """How to convert a value of type tp: ("dc", cls), ("list", item type),
    ("dict", (key type, value type)), ("opt", inner type) or ("leaf", None)."""
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "dc", tp
    if origin is list and args:
        return "list", args[0]
    if origin is dict and len(args) == 2:
        return "dict", args
    if args and type(None) in args:  # Optional[X]
        return "opt", next(a for a in args if a is not type(None))
    return "leaf", None


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    kind, arg = _shape(tp)
    if kind == "dc":
        return from_dict(arg, value)
    if kind == "list":
        if _shape(arg)[0] == "leaf":
            return list(value)
        return [_convert(arg, v) for v in value]
    if kind == "dict":
        return {_convert(arg[0], k): _convert(arg[1], v) for k, v in value.items()}
    if kind == "opt":
        return _convert(arg, value)
    return value


# -- security context (ckpt/capture/security.py, ckpt/restore/security.py) -----------------


@dataclass
class SeccompFilter:
    """One seccomp filter program, as PTRACE_SECCOMP_GET_FILTER gives it."""

    prog: bytes  # struct sock_filter[] (8 bytes per instruction)
    flags: int = 0  # SECCOMP_FILTER_FLAG_LOG (the only flag the kernel reports)


@dataclass
class Creds:
    """One thread's credentials and sandbox (they belong to each thread)."""

    uids: list[int]  # real, effective, saved, filesystem
    gids: list[int]
    groups: list[int]
    caps: list[int]  # inheritable, permitted, effective, bounding, ambient (bit masks)
    securebits: int = 0
    no_new_privs: bool = False
    seccomp_mode: int = 0  # 0 none, 1 strict, 2 filter
    # its filters, oldest first, as indexes into SecurityContext.filters: threads that
    # share a filter object (inherited at clone, or synced with TSYNC) name the same one
    seccomp: list[int] = field(default_factory=list)


@dataclass
class CgroupRef:
    hierarchy: int  # /proc/PID/cgroup's hierarchy ID on the dumping host (0: v2)
    controllers: str  # "" for v2; "cpu,cpuacct", "name=systemd", … (v1)
    path: str  # relative to the cgroup namespace's root


@dataclass
class SecurityContext:
    threads: list[Creds]  # one per thread, in ProcessImage.threads order
    filters: list[SeccompFilter] = field(default_factory=list)
    # filters ckpt shared with the process (ckpt ran under seccomp: it could not read
    # them); the restorer inherits them from ckpt
    inherited_filters: int = 0
    root: str = "/"  # the root directory (chroot), as the dumping ckpt saw its path
    loginuid: int | None = None  # None: no audit support
    lsm: str = ""  # /proc/PID/attr/current; "" when no LSM labels processes
    cgroups: list[CgroupRef] = field(default_factory=list)
    # nothing here a reader that ignores it (format <= 3) would not restore anyway: the
    # leader's uids, gids and groups for every thread, no seccomp, no chroot, the
    # dumping ckpt's cgroups and loginuid, the capabilities setresuid leaves
    plain: bool = True


# -- sockets (ckpt/capture/sockets.py, ckpt/restore/sockets.py) ------------------------------


@dataclass
class SocketMsg:
    """One queued datagram (unix dgram/seqpacket) or the whole stream backlog; a stream
    whose queue carries files in flight or credentials comes as segments, each ending
    where a read stops (capture/inflight.py)."""

    data: bytes
    source: bytes | None = None  # unix dgram: the sender's bound name (None: unnamed)
    # files in flight with it (SCM_RIGHTS), in order: indexes into its Socket.inflight
    # (format 6)
    fds: list[int] = field(default_factory=list)
    # SCM_CREDENTIALS the socket reads with it (kept when it has SO_PASSCRED or
    # SO_PASSPIDFD): [pid, uid, gid] as the dump saw them; [] none kept (format 6)
    creds: list[int] = field(default_factory=list)


@dataclass
class TcpConn:
    """A TCP connection, as TCP_REPAIR reads it (kernel/tcp_repair.py): established,
    or closing (state); the sequences and queues leave the FINs out, the restore
    plays them again from the state."""

    snd_seq: int
    rcv_seq: int
    outq: bytes
    unsent: int
    inq: bytes
    mss: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    timestamp: int
    window: list[int]  # TCP_REPAIR_WINDOW: snd_wl1 snd_wnd max_window rcv_wnd rcv_wup
    # tcpi_state: 1 ESTABLISHED, or a closing state (4 FIN_WAIT1, 5 FIN_WAIT2,
    # 8 CLOSE_WAIT, 9 LAST_ACK, 11 CLOSING; TCP_STATES); not ESTABLISHED = format 6
    state: int = 1


TCP_STATES = frozenset({1, 4, 5, 8, 9, 11})


@dataclass
class TcpClosed:
    """A TCP socket in state CLOSE after a connection or a connect that failed (the
    kernel's tcp_done: a reset, a timeout, both FINs acknowledged, a refused SYN),
    which its process still holds: what it can observe of it (capture/sockets.py
    _tcp_closed; rebuilt by kernel/tcp_closed.py; format 6). The shutdown bits are
    Socket.shutdown, the local name Socket.local."""

    handshake: bool  # the connection had been established (else its SYN was refused)
    error: int = 0  # the error pending (SO_ERROR), not read by the process yet
    fin: bool = False  # the peer's FIN had arrived: recv gives 0 before the error
    port_held: bool = False  # bound explicitly (or accepted): it keeps its port
    disconnected: bool = False  # connect(AF_UNSPEC) since (a failed blocking connect)
    inq: bytes = b""  # received, not read by the process yet (a reset keeps it)
    mss: int = 0  # its MSS as the connection left it (tcpi_snd_mss; TCP_MAXSEG reads it)


def tcp_closing(fd: dict[str, Any]) -> bool:
    """A socket fd record (as to_dict gives it) whose TCP connection is not ESTABLISHED
    (closing, or closed: a 5.x reader would bind a closed one to its old port)."""
    s = fd.get("socket") or {}
    return (s.get("tcp") or {}).get("state", 1) != 1 or s.get("state") == "closed"


# the socket options a 5.x reader sets (it skips any other name without a word)
SOCKET_OPTIONS_5 = frozenset({
    "SO_REUSEADDR", "SO_REUSEPORT", "SO_KEEPALIVE", "SO_BROADCAST", "SO_PRIORITY",
    "SO_RCVLOWAT", "SO_PASSCRED", "SO_OOBINLINE", "SO_MARK", "SO_TIMESTAMP", "SO_TIMESTAMPNS",
    "SO_LINGER", "SO_RCVTIMEO", "SO_SNDTIMEO", "SO_PASSSEC", "IP_TOS", "IP_FREEBIND",
    "IPV6_V6ONLY", "IPV6_TCLASS", "TCP_NODELAY", "TCP_CORK", "TCP_KEEPIDLE", "TCP_KEEPINTVL",
    "TCP_KEEPCNT", "TCP_LINGER2", "TCP_DEFER_ACCEPT", "TCP_WINDOW_CLAMP", "TCP_USER_TIMEOUT",
    "TCP_FASTOPEN", "TCP_NOTSENT_LOWAT", "TCP_CONGESTION",
})  # fmt: skip


def flying_socket(f: Fd) -> bool:
    """A record of a unix socket only a message in flight holds (capture/inflight.py): fd
    -1 and no tree member that takes it (a handed-over record names one: peer_slot)."""
    return f.kind == "socket" and f.fd < 0 and f.peer_slot < 0 and f.socket is not None


def scm_v6(fd: dict[str, Any]) -> bool:
    """A socket fd record (as to_dict gives it) whose queue carries files in flight or
    credentials, or the record of a socket in flight (fd -1, no tree member takes it)."""
    s = fd.get("socket") or {}
    if s.get("inflight") or any(m.get("fds") or m.get("creds") for m in s.get("queue") or ()):
        return True
    return bool(s) and fd.get("fd", 0) < 0 and fd.get("peer_slot", -1) < 0


def socket_settings_v6(fd: dict[str, Any]) -> bool:
    """A socket fd record (as to_dict gives it) with what a 5.x reader would leave out
    without a word: an option it does not know, a BPF filter, multicast groups, a shut
    down UDP socket."""
    s = fd.get("socket") or {}
    if any(name not in SOCKET_OPTIONS_5 for name in s.get("options", ())):
        return True
    if s.get("filter") or s.get("mcast"):
        return True
    return s.get("family") in (2, 10) and bool(s.get("shutdown"))  # AF_INET, AF_INET6


@dataclass
class McastGroup:
    """A multicast group a UDP socket joined (IP_ADD_MEMBERSHIP, MCAST_JOIN_GROUP...),
    with its source filter (kernel/sockets.py memberships, join_groups)."""

    iface: str  # the interface's name (indexes differ between hosts)
    group: str  # the group's address (IPv4 or IPv6)
    include: bool = False  # MCAST_INCLUDE: only from `sources`; else from all but them
    sources: list[str] = field(default_factory=list)


@dataclass
class Socket:
    """One socket, named by its inode so that several fds or processes can share it.

    state: "unbound", "bound", "listen", "connected" (unix), "pending" (unix,
    connected to a listener that has not accepted it yet), "established" (TCP),
    "closed" (TCP in state CLOSE after a connection: `closed`).
    Addresses: unix names are bytes (b"\\0..." abstract); inet ones [host, port,...].
    """

    ino: int
    family: int
    type: int
    protocol: int
    state: str
    local: Any = None
    remote: Any = None
    peer_ino: int = 0  # the other end, when it is a socket of the dumped process
    listener_ino: int = 0  # "pending"/accepted: the listening socket it came through
    backlog: int = 0
    pending: list[int] = field(default_factory=list)  # unix listener: clients waiting, in order
    shutdown: int = 0  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2 (UDP, TCP: format 6)
    peer_closed: bool = False
    accepted: bool = False  # unix stream: the accept()ed end of a connection
    name_file: list[int] | None = None  # unix path: [mode, uid, gid] of the socket file
    name_deleted: bool = False  # unix path: the socket file was unlinked
    # name → value, in the order the restore sets them (kernel/sockets.py option_table);
    # names beyond SOCKET_OPTIONS_5 are format 6
    options: dict[str, Any] = field(default_factory=dict)
    filter: bytes = b""  # classic BPF program (struct sock_filter array; format 6)
    mcast: list[McastGroup] = field(default_factory=list)  # groups joined (format 6)
    # the open file descriptions in flight in `queue` (SCM_RIGHTS), each once: a "peer"
    # (one a tree member holds: peer_slot, peer_fd) or one made again ("file", "dir",
    # "chr", "pipe", "memfd", "eventfd", "socket": the record with fd -1 of the unix
    # socket `obj_id`); `fd` is the index (capture/inflight.py; format 6)
    inflight: list[Fd] = field(default_factory=list)
    sndbuf: int = 0
    rcvbuf: int = 0
    buf_lock: int = 0
    peek_off: int = -1
    queue: list[SocketMsg] = field(default_factory=list)  # received, not yet read
    tcp: TcpConn | None = None
    closed: TcpClosed | None = None  # state "closed" (TCP; format 6)
