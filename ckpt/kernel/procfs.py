"""Parsers for /proc/PID files, returning dataclasses.

Files are read as bytes (a path or comm may hold any byte), `comm` in stat is
everything between the first '(' and the LAST ')', and a line we do not
understand is an error rather than a guess. The proc root can be redirected
(`PROC_ROOT`) so tests can feed fake trees.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass, field

from ..errors import AccessDenied, NoSuchProcess

PROC_ROOT = "/proc"


class ProcParseError(ValueError):
    """A /proc file did not have the format we rely on."""


# /proc as the processes ckpt injects into see it (paths handed to an injected openat):
# never redirected, unlike PROC_ROOT, which is ckpt's own view (fake trees in tests)
TARGET_PROC = "/proc"


def path(pid: int | str, *parts: str) -> str:
    return os.path.join(PROC_ROOT, str(pid), *parts)


def fd_path(pid: int, fd: int) -> str:
    """/proc/PID/fd/N: the magic link to the open file itself."""
    return path(pid, "fd", str(fd))


def map_file(pid: int, start: int, end: int) -> str:
    """/proc/PID/map_files/START-END: the file a mapping maps (opened as that file)."""
    return path(pid, "map_files", f"{start:x}-{end:x}")


def system(*parts: str) -> str:
    """A file of /proc that is not a process's (cpuinfo, sys/kernel/...)."""
    return os.path.join(PROC_ROOT, *parts)


def open_file(pid: int, name: str, flags: int) -> int:
    """An fd on /proc/PID/<name> (mem, pagemap, clear_refs…), close-on-exec."""
    return os.open(path(pid, name), flags | os.O_CLOEXEC)


def in_target(*parts: str | int) -> str:
    """A /proc path as another process sees it (one ckpt injects into, or a child it
    runs), e.g. in_target("self", "fd", 5): never redirected."""
    return "/".join([TARGET_PROC, *(str(p) for p in parts)])


def pid_path(target: str) -> tuple[int, str] | None:
    """(PID, the rest) of a path under /proc/PID as a process names it (an fd's d_path:
    "/proc/1234/status" → (1234, "status"), "/proc/1234" → (1234, "")); None otherwise."""
    head, sep, rest = target.removeprefix(TARGET_PROC + "/").partition("/")
    if not target.startswith(TARGET_PROC + "/") or not head.isdigit() or head[0] == "0":
        return None
    return int(head), rest if sep else ""


def on_procfs(st: os.stat_result) -> bool:
    """Is `st` (an fd's stat) a file of the proc filesystem ckpt reads?"""
    return st.st_dev == os.stat(PROC_ROOT).st_dev


def read_bytes(pid: int, *parts: str) -> bytes:
    """Read a /proc file, mapping ENOENT/ESRCH to NoSuchProcess and EACCES to AccessDenied."""
    p = path(pid, *parts)
    try:  # os-level reads: a third cheaper than open() (a thread's files, 1024 threads)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
        return b"".join(chunks)
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid) from exc
    except PermissionError as exc:
        raise AccessDenied(f"permission denied reading {p}", pid=pid) from exc
    except ProcessLookupError as exc:
        raise NoSuchProcess(f"process {pid} exited", pid=pid) from exc
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise NoSuchProcess(f"process {pid} exited", pid=pid) from exc
        raise


def read_task_files(pid: int, tids: list[int], name: str) -> list[bytes | None]:
    """/proc/PID/task/TID/<name> of each of tids, read in one call into C (a thread's
    status, stat, children, cgroup: read_bytes per file costs a third more at 1024
    threads). None for a thread that is gone (ENOENT, ESRCH); EACCES is AccessDenied,
    as in read_bytes."""
    from .native import ffi, lib  # (lazily: this module parses without the extension)

    if not tids:
        return []
    d = path(pid, "task").encode()
    ids = ffi.new("int[]", tids)
    lens = ffi.new("long[]", len(tids))
    cap = 2048 * len(tids)
    new = ffi.new_allocator(should_clear_after_alloc=False)  # (filled by the kernel)
    while True:
        buf = new("char[]", cap)
        used = lib.ck_read_task_files(d, ids, len(tids), name.encode(), buf, cap, lens)
        if used != -errno.ENOSPC:
            break
        cap *= 4
    if used < 0:
        if used in (-errno.ENOENT, -errno.ESRCH):
            raise NoSuchProcess(f"no such process: {pid}", pid=pid)
        raise OSError(-used, f"{d.decode()}: {os.strerror(-used)}")
    raw = ffi.buffer(buf, used)[:]
    out: list[bytes | None] = []
    at = 0
    for tid, n in zip(tids, lens):
        if n >= 0:
            out.append(raw[at : at + n])
            at += n
        elif n in (-errno.ENOENT, -errno.ESRCH):
            out.append(None)
        elif n == -errno.EACCES:
            p = path(pid, "task", str(tid), name)
            raise AccessDenied(f"permission denied reading {p}", pid=pid)
        else:
            raise OSError(-n, f"{path(pid, 'task', str(tid), name)}: {os.strerror(-n)}")
    return out


def runs_ckpt(pid: int) -> bool:
    """Whether PID's command line names ckpt (False once it is gone): the image
    writer's test for a leftover's writer (image/writer.remove_leftovers)."""
    try:
        return b"ckpt" in read_bytes(pid, "cmdline")
    except (OSError, NoSuchProcess, AccessDenied):
        return False


def readlink(pid: int, *parts: str) -> str:
    p = path(pid, *parts)
    try:
        return os.readlink(p)
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid) from exc
    except PermissionError as exc:
        raise AccessDenied(f"permission denied reading {p}", pid=pid) from exc


# ---------------------------------------------------------------- stat


@dataclass
class Stat:
    pid: int
    comm: bytes
    state: str
    ppid: int
    pgrp: int
    session: int
    flags: int
    num_threads: int
    starttime: int
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_signal: int

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & 0x00200000)  # PF_KTHREAD


def parse_stat(data: bytes) -> Stat:
    lpar, rpar = data.find(b"("), data.rfind(b")")
    if lpar < 0 or rpar < lpar:
        raise ProcParseError("stat: no (comm)")
    rest = data[rpar + 2 :].split()
    if len(rest) < 50:
        raise ProcParseError(f"stat: {len(rest) + 2} fields, expected at least 52")
    f = [0, 0, *rest]  # f[i] is field number i+1 ... keep 1-based below

    def n(i: int) -> int:
        return int(f[i - 1])

    return Stat(
        pid=int(data[:lpar]),
        comm=data[lpar + 1 : rpar],
        state=rest[0].decode(),
        ppid=n(4),
        pgrp=n(5),
        session=n(6),
        flags=n(9),
        num_threads=n(20),
        starttime=n(22),
        start_code=n(26),
        end_code=n(27),
        start_stack=n(28),
        exit_signal=n(38),
        start_data=n(45),
        end_data=n(46),
        start_brk=n(47),
        arg_start=n(48),
        arg_end=n(49),
        env_start=n(50),
        env_end=n(51),
    )


def stat(pid: int) -> Stat:
    return parse_stat(read_bytes(pid, "stat"))


# ---------------------------------------------------------------- status


def parse_status(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


# What str.splitlines() ends a line at besides "\n" (parse_status splits so).
_OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


_OTHER_ASCII_BREAKS = (b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e")


def status_values(data: bytes, keys: tuple[str, ...]) -> dict[str, str]:
    """parse_status(data) reduced to `keys` (names without ":"), found by searching
    instead of splitting every line: a thread's status has ~60 lines, and refuse()
    reads every thread's before the freeze (~12 µs a thread less at 1024 threads)."""
    text = data.decode("utf-8", "surrogateescape")
    # ASCII (every status): the other line ends are control bytes, found by memchr (the
    # regex search alone cost ~4 µs a thread, more than the rest)
    other = (
        any(c in data for c in _OTHER_ASCII_BREAKS)
        if data.isascii()
        else _OTHER_BREAKS.search(text) is not None
    )
    if other:  # lines as splitlines() cuts them
        full = parse_status(data)
        return {k: full[k] for k in keys if k in full}
    out: dict[str, str] = {}
    for k in keys:
        head = k + ":"
        i = text.rfind("\n" + head)  # the last such line, as in parse_status's dict
        if i >= 0:
            i += 1
        elif text.startswith(head):
            i = 0
        else:
            continue
        j = text.find("\n", i)
        out[k] = text[i + len(head) : j if j >= 0 else len(text)].strip()
    return out


def status(pid: int) -> dict[str, str]:
    return parse_status(read_bytes(pid, "status"))


#: The lines of a frozen thread's status ckpt reads (ptrace.Tracee.status): its
#: credentials and sandbox (creds.parse_creds, seccomp.frozen_modes) and what
#: capture/attrs.refuse() refuses (LAM, shadow stacks). A reader of another line adds
#: it here: ThreadStatus refuses to answer for a line it was not given.
THREAD_STATUS_KEYS = (
    "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
    "NoNewPrivs", "Seccomp", "Seccomp_filters", "untag_mask", "x86_Thread_features",
)  # fmt: skip
_THREAD_STATUS_KEYS = frozenset(THREAD_STATUS_KEYS)


class ThreadStatus(dict):
    """status_values(data, THREAD_STATUS_KEYS): a thread's status reduced to the lines
    ckpt reads (a third of parse_status's cost, per thread of a freeze). Asking for a
    line outside THREAD_STATUS_KEYS is a LookupError, never a silent default."""

    def get(self, key: str, default=None):
        if key not in _THREAD_STATUS_KEYS:
            raise LookupError(f"status line {key!r} is not in procfs.THREAD_STATUS_KEYS")
        return dict.get(self, key, default)

    def __missing__(self, key: str):
        if key not in _THREAD_STATUS_KEYS:
            raise LookupError(f"status line {key!r} is not in procfs.THREAD_STATUS_KEYS")
        raise KeyError(key)


def thread_status(data: bytes) -> ThreadStatus:
    """A thread's /proc status (data) as ThreadStatus."""
    return ThreadStatus(status_values(data, THREAD_STATUS_KEYS))


def private_resident(pid: int) -> int:
    """Bytes of pid's resident anonymous memory (RssAnon), 0 for a process that is gone
    or has none (a zombie, a kernel thread)."""
    try:
        value = status(pid).get("RssAnon", "0 kB")
    except NoSuchProcess:
        return 0
    return int(value.split()[0]) * 1024


# ---------------------------------------------------------------- limits

#: /proc/PID/limits row names (fs/proc/base.c lnames), in RLIMIT_* order
LIMIT_NAMES = (
    "Max cpu time", "Max file size", "Max data size", "Max stack size", "Max core file size",
    "Max resident set", "Max processes", "Max open files", "Max locked memory",
    "Max address space", "Max file locks", "Max pending signals", "Max msgqueue size",
    "Max nice priority", "Max realtime priority", "Max realtime timeout",
)  # fmt: skip
RLIM_INFINITY = -1  # as the resource module and older images spell it


def parse_limits(data: bytes) -> dict[int, list[int]]:
    """/proc/PID/limits → {RLIMIT_*: [soft, hard]}, values raw (the file's units are
    the rlimit's own), "unlimited" as RLIM_INFINITY. Every limit must be there."""
    lines = data.decode("ascii", "replace").splitlines()
    if not lines or not lines[0].startswith("Limit "):
        raise ProcParseError("limits: no header line")
    out: dict[int, list[int]] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        r = next((i for i, n in enumerate(LIMIT_NAMES) if line.startswith(n + " ")), None)
        fields = line[len(LIMIT_NAMES[r]) :].split() if r is not None else []
        if r is None or len(fields) < 2 or r in out:
            raise ProcParseError(f"limits: unexpected line {line!r}")
        try:
            out[r] = [RLIM_INFINITY if v == "unlimited" else int(v) for v in fields[:2]]
        except ValueError as exc:
            raise ProcParseError(f"limits: unexpected line {line!r}") from exc
    if len(out) != len(LIMIT_NAMES):
        missing = [LIMIT_NAMES[i] for i in range(len(LIMIT_NAMES)) if i not in out]
        raise ProcParseError(f"limits: missing {', '.join(missing)}")
    return out


def limits(pid: int) -> dict[int, list[int]]:
    """Resource limits of any process we may read /proc of (prlimit on another
    process needs CAP_SYS_RESOURCE or its uids)."""
    return parse_limits(read_bytes(pid, "limits"))


# ---------------------------------------------------------------- maps / smaps


@dataclass
class Mapping:
    """One VMA as /proc/PID/smaps shows it."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    name: str  # path, [heap], [stack], [vdso], ... or ""
    vmflags: list[str] = field(default_factory=list)
    deleted: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def prot(self) -> int:
        return (
            (1 if self.perms[0] == "r" else 0)
            | (2 if self.perms[1] == "w" else 0)
            | (4 if self.perms[2] == "x" else 0)
        )

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.name.startswith("/")


def _unescape(name: bytes) -> str:
    # the kernel escapes '\n' as "\012" in names
    return name.replace(b"\\012", b"\n").decode("utf-8", "surrogateescape")


# A VMA's line starts with a hex digit; smaps' key lines (~20 per VMA: 50k lines for the
# stacks and guard pages of 1024 threads) with a capital letter, VmFlags with 'V'.
_HEX_FIRST = frozenset(b"0123456789abcdef")


def parse_maps(data: bytes) -> list[Mapping]:
    """Parse maps or smaps (smaps adds key: value lines and VmFlags per VMA)."""
    out: list[Mapping] = []
    for raw in data.split(b"\n"):
        if not raw or (raw[0] not in _HEX_FIRST and raw[0] != 0x56):  # 'V'
            continue  # an smaps key line
        head = raw.split(b" ", 1)[0]
        if b"-" in head and not head.endswith(b":"):
            parts = raw.split(None, 5)
            if len(parts) < 5:
                raise ProcParseError(f"maps: bad line {raw[:80]!r}")
            lo, hi = parts[0].split(b"-")
            maj, mnr = parts[3].split(b":")
            name = parts[5].strip() if len(parts) > 5 else b""
            deleted = name.endswith(b" (deleted)")
            if deleted:
                name = name[: -len(b" (deleted)")]
            out.append(
                Mapping(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=parts[1].decode(),
                    offset=int(parts[2], 16),
                    dev_major=int(maj, 16),
                    dev_minor=int(mnr, 16),
                    inode=int(parts[4]),
                    name=_unescape(name),
                    deleted=deleted,
                )
            )
        elif raw.startswith(b"VmFlags:"):
            if not out:
                raise ProcParseError("smaps: VmFlags before any VMA")
            out[-1].vmflags = raw[8:].decode().split()
    return out


def smaps(pid: int) -> list[Mapping]:
    return parse_maps(read_bytes(pid, "smaps"))


def maps(pid: int) -> list[Mapping]:
    return parse_maps(read_bytes(pid, "maps"))


def _key(m: Mapping) -> tuple:
    return (m.start, m.end, m.perms, m.offset, m.dev_major, m.dev_minor, m.inode, m.name, m.deleted)


def maps_with_flags(pid: int, prior: list[Mapping] | None) -> list[Mapping]:
    """smaps as of now, cheaply when nothing changed since `prior` (an smaps read).

    smaps walks every page table to count RSS (≈25 ms for 4 GiB), maps does
    not. When every VMA of maps is exactly one of `prior`, its VmFlags are
    taken from there; any difference falls back to reading smaps. Used inside
    the final freeze, right after a pre-copy round read smaps; tracking status
    (`uw`) is not trusted from it anyway (PAGEMAP_SCAN with CHECK_WPASYNC
    refuses an unregistered VMA, which is then copied whole).
    """
    if not prior:
        return smaps(pid)
    known = {_key(m): m.vmflags for m in prior}
    now = maps(pid)
    for m in now:
        flags = known.get(_key(m))
        if flags is None:
            return smaps(pid)
        m.vmflags = list(flags)
    return now


# ---------------------------------------------------------------- auxv


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    if len(data) % 16:
        raise ProcParseError("auxv: length not a multiple of 16")
    pairs = [struct.unpack_from("<QQ", data, i) for i in range(0, len(data), 16)]
    out = []
    for t, v in pairs:
        out.append((t, v))
        if t == 0:
            break
    return out


# ---------------------------------------------------------------- fdinfo


@dataclass
class FdInfo:
    pos: int
    flags: int
    mnt_id: int
    ino: int
    extra: dict[str, str]


def parse_fdinfo(data: bytes) -> FdInfo:
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in fields:
            fields[key.strip()] = value.strip()
    try:
        return FdInfo(
            pos=int(fields.pop("pos")),
            flags=int(fields.pop("flags"), 8),
            mnt_id=int(fields.pop("mnt_id", "0")),
            ino=int(fields.pop("ino", "0")),
            extra=fields,
        )
    except (KeyError, ValueError) as exc:
        raise ProcParseError(f"fdinfo: {exc}") from exc


@dataclass
class FdLock:
    """A `lock:` line of /proc/PID/fdinfo/N, in /proc/locks' format:
    `lock:\\t1: POSIX  ADVISORY  WRITE 4242 fe:00:2150753 5 14`. The kernel lists the
    locks taken through this fd's open file description: flock, OFD locks and leases
    (owned by the description, so on every fd of it, in every process), and the
    process's own POSIX locks taken through it (fs/locks.c show_fd_locks)."""

    kind: str  # FLOCK, POSIX, OFDLCK, LEASE (DELEG: nfsd's, never on a process's fd)
    state: str  # ADVISORY for locks; ACTIVE, BREAKING or BREAKER for a lease
    type: str  # READ, WRITE (UNLCK: a lease being broken to nothing)
    pid: int  # who took it; -1 for OFD locks (they belong to no process)
    start: int  # first byte (0 for flock and leases)
    end: int  # last byte; -1 for "EOF" (to the end of the file and beyond)


def parse_fd_locks(data: bytes) -> list[FdLock]:
    """Every `lock:` line of an fdinfo file (parse_fdinfo keeps only the first)."""
    out = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        key, sep, value = line.partition(":")
        if sep and key == "lock":
            out.append(_lock_line(value)[0])
    return out


def locks_on(dev: int, ino: int) -> list[FdLock]:
    """The locks /proc/locks lists on the file (dev, ino), waiters left out: who holds
    what on it now (a restore that cannot take a lock back names them)."""
    with open(system("locks"), "rb") as f:
        data = f.read()
    out = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        if "->" in line:  # a waiter, blocked behind the lock listed before it
            continue
        lock, ldev, lino = _lock_line(line)
        if (ldev, lino) == (dev, ino):
            out.append(lock)
    return out


def _lock_line(value: str) -> tuple[FdLock, int, int]:
    """`1: POSIX  ADVISORY  WRITE 4242 fe:00:2150753 5 14` → (lock, dev, inode)."""
    parts = value.split()
    try:
        if len(parts) != 8 or not parts[0].endswith(":"):
            raise ValueError(f"{len(parts)} fields")
        kind, state, type_, pid, dev_ino, start, end = parts[1:]
        major, minor, ino = dev_ino.split(":")
        lock = FdLock(kind, state, type_, int(pid), int(start), -1 if end == "EOF" else int(end))
        return lock, os.makedev(int(major, 16), int(minor, 16)), int(ino)
    except ValueError as exc:
        raise ProcParseError(f"lock line {value.strip()!r}: {exc}") from exc


# ---------------------------------------------------------------- timers


@dataclass
class PosixTimer:
    id: int
    signo: int
    sigev_value: int
    notify: str  # "signal", "thread", "none"
    notify_tid: int
    clock_id: int
    by_tid: bool = False  # "…/tid.N": SIGEV_THREAD_ID, to thread N (else "…/pid.N")


def parse_timers(data: bytes) -> list[PosixTimer]:
    timers: list[PosixTimer] = []
    cur: dict[str, str] = {}

    def flush() -> None:
        if not cur:
            return
        try:
            signo, value = cur["signal"].split("/")
            kind, rest = cur["notify"].split("/")
            tid = int(rest.split(".", 1)[1]) if "." in rest else 0
            timers.append(
                PosixTimer(
                    id=int(cur["ID"]),
                    signo=int(signo),
                    sigev_value=int(value, 16),
                    notify=kind,
                    notify_tid=tid,
                    clock_id=int(cur["ClockID"]),
                    by_tid=rest.startswith("tid"),
                )
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise ProcParseError(f"timers: bad entry {cur}") from exc
        cur.clear()

    for line in data.decode().splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "ID":
            flush()
        cur[key.strip()] = value.strip()
    flush()
    return timers


def tasks(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(path(pid, "task")))
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid) from exc


def fds(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(path(pid, "fd")))
    except FileNotFoundError as exc:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid) from exc
    except PermissionError as exc:
        raise AccessDenied(f"permission denied listing fds of {pid}", pid=pid) from exc
