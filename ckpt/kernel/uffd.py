"""userfaultfd + PAGEMAP_SCAN: the kernel side of the uffd-wp dirty tracker.

The protocol (KERNEL_INTERFACES.md §3.5): a uffd is created *inside* the
target (its context belongs to the creator's mm), ckpt takes a copy with
pidfd_getfd, does UFFDIO_API(WP_ASYNC) and registers every trackable VMA in
WP mode, write-protects everything with one PAGEMAP_SCAN, copies a baseline,
and then each round asks PAGEMAP_SCAN for the written pages *and* re-protects
them in the same call. A write that lands after a page was re-protected is
simply reported next round, so nothing is ever lost.

Two facts every caller must keep in mind:

- "Written" is not "has data": never-populated pages inside a registered VMA
  are reported as written (6.18), and MADV_DONTNEED'd pages are reported as
  written but are no longer present. Decide what to store from PRESENT (or
  from the bytes read), never from WRITTEN alone.
- A WP_ASYNC uffd generates no messages; nobody has to read it.

All addresses are page aligned; ranges are [start, end).
"""

from __future__ import annotations

import enum
import os
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from . import procfs
from .native import PAGE_SIZE, check, ffi, lib
from .pidfd import pidfd_getfd, pidfd_open, pidfd_send_signal

UFFD_API = lib.UFFD_API
UFFD_USER_MODE_ONLY = lib.UFFD_USER_MODE_ONLY

#: Flags for the uffd created inside a target. USER_MODE_ONLY costs nothing in
#: WP_ASYNC mode (kernel writes just mark the page written) and lifts the
#: CAP_SYS_PTRACE requirement from the target.
TRACKING_UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY


class Feature(enum.IntFlag):
    """UFFDIO_API feature bits (uffdio_api.features)."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


#: What the tracker asks for. WP_ASYNC implies WP_UNPOPULATED on every kernel
#: that has it; asking for both says so explicitly.
TRACKING_FEATURES = Feature.WP_ASYNC | Feature.WP_UNPOPULATED


class Category(enum.IntFlag):
    """PAGE_IS_* bits of PAGEMAP_SCAN masks and page_region.categories."""

    WPALLOWED = lib.PAGE_IS_WPALLOWED
    WRITTEN = lib.PAGE_IS_WRITTEN
    FILE = lib.PAGE_IS_FILE
    PRESENT = lib.PAGE_IS_PRESENT
    SWAPPED = lib.PAGE_IS_SWAPPED
    PFNZERO = lib.PAGE_IS_PFNZERO
    HUGE = lib.PAGE_IS_HUGE
    SOFT_DIRTY = lib.PAGE_IS_SOFT_DIRTY
    GUARD = lib.PAGE_IS_GUARD


PM_SCAN_WP_MATCHING = lib.PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC = lib.PM_SCAN_CHECK_WPASYNC


def feature_names(bits: int) -> list[str]:
    """Names of the set feature bits; unknown bits as 'bitN' (newer kernels)."""
    known = {f.value: f.name for f in Feature}
    return [known.get(1 << i, f"bit{i}") for i in range(64) if bits >> i & 1]


def _check_range(start: int, end: int) -> None:
    if start % PAGE_SIZE or end % PAGE_SIZE or end < start:
        raise ValueError(f"range {start:#x}-{end:#x} is not a page-aligned [start, end)")


# ---------------------------------------------------------------- userfaultfd


@dataclass(frozen=True)
class ApiInfo:
    """UFFDIO_API reply: every feature the kernel supports, and the fd's ioctls."""

    features: Feature
    ioctls: int


def uffd_create(flags: int = TRACKING_UFFD_FLAGS) -> int:
    """userfaultfd(flags) in ckpt's own process: a context for ckpt's own mm.

    For probes and tests; the tracker creates its uffd inside the target.
    """
    return check(lib.ck_uffd_create(flags), "userfaultfd")


def uffd_dev_create(flags: int = TRACKING_UFFD_FLAGS) -> int:
    """/dev/userfaultfd + USERFAULTFD_IOC_NEW: same as uffd_create, gated only by
    the device node's permissions instead of vm.unprivileged_userfaultfd."""
    return check(lib.ck_uffd_dev_create(flags), "USERFAULTFD_IOC_NEW")


def uffd_api(fd: int, features: int = 0) -> ApiInfo:
    """The UFFDIO_API handshake; allowed once per fd (a second call is EINVAL).

    Requesting a feature the kernel does not know fails with EINVAL.
    """
    f = ffi.new("uint64_t *")
    io = ffi.new("uint64_t *")
    check(lib.ck_uffd_api(fd, int(features), f, io), "UFFDIO_API", target=_feat_str(features))
    return ApiInfo(Feature(f[0]), io[0])


def _feat_str(features: int) -> str:
    return "|".join(feature_names(features)) or "no features"


def register_wp(fd: int, start: int, end: int) -> None:
    """UFFDIO_REGISTER [start, end) in WP mode.

    Register VMA by VMA: one refused VMA fails the whole call (EINVAL for
    vdso/droppable, EPERM for read-only shared file maps, EBUSY when another
    uffd owns it).
    """
    _register(fd, start, end, lib.UFFDIO_REGISTER_MODE_WP)


def register_missing(fd: int, start: int, end: int) -> None:
    """UFFDIO_REGISTER [start, end) in MISSING mode: UFFDIO_COPY may then fill its
    empty pages (restore/fill.py). Anonymous private, shmem and hugetlb VMAs only."""
    _register(fd, start, end, lib.UFFDIO_REGISTER_MODE_MISSING)


def _register(fd: int, start: int, end: int, mode: int) -> None:
    _check_range(start, end)
    check(lib.ck_uffd_register(fd, start, end - start, mode), "UFFDIO_REGISTER",
          target=_rng(start, end))  # fmt: skip


def unregister(fd: int, start: int, end: int) -> None:
    """UFFDIO_UNREGISTER; also drops the wp bits and markers of the range."""
    _check_range(start, end)
    check(
        lib.ck_uffd_unregister(fd, start, end - start), "UFFDIO_UNREGISTER", target=_rng(start, end)
    )


def writeprotect(fd: int, start: int, end: int, protect: bool = True) -> None:
    """UFFDIO_WRITEPROTECT. Not atomic with reading the written set: the tracker
    uses PAGEMAP_SCAN for that; this is for tests and explicit un-protect."""
    _check_range(start, end)
    check(
        lib.ck_uffd_writeprotect(fd, start, end - start, int(protect)),
        "UFFDIO_WRITEPROTECT",
        target=_rng(start, end),
    )


def _rng(start: int, end: int) -> str:
    return f"{start:#x}-{end:#x}"


# --------------------------------------------------------------------- runs


class Runs:
    """Sorted, non-overlapping page runs (start address, page count).

    Stored flat in an array('Q') (start0, n0, start1, n1, ...) so the data
    path can hand the whole thing to C without a per-run Python object.
    Adjacent runs are always merged.
    """

    __slots__ = ("flat",)

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()):
        self.flat = array("Q")
        for start, npages in pairs:
            self.append(start, npages)

    def append(self, start: int, npages: int) -> None:
        """Add a run at or after the end of the last one, merging if adjacent."""
        if npages <= 0:
            return
        f = self.flat
        if f:
            last_end = f[-2] + f[-1] * PAGE_SIZE
            if start < last_end:
                raise ValueError(f"run {start:#x} overlaps or precedes the last run")
            if start == last_end:
                f[-1] += npages
                return
        f.append(start)
        f.append(npages)

    def extend_flat(self, flat: array | bytes | memoryview) -> None:
        """Append flat (start, npages) pairs that already come sorted and merged."""
        more = flat if isinstance(flat, array) else array("Q", bytes(flat))
        if not more:
            return
        if self.flat and self.flat[-2] + self.flat[-1] * PAGE_SIZE == more[0]:
            self.flat[-1] += more[1]
            more = more[2:]
        self.flat.extend(more)

    def _extend_raw(self, out, n: int) -> None:
        """Append n pairs from a C uint64_t buffer without intermediate copies."""
        f = self.flat
        skip = 0
        if f and f[-2] + f[-1] * PAGE_SIZE == out[0]:
            f[-1] += out[1]
            skip = 1
        if n > skip:
            f.frombytes(ffi.buffer(out + 2 * skip, 16 * (n - skip)))

    def extend(self, other: Runs) -> None:
        self.extend_flat(other.flat)

    def __len__(self) -> int:
        return len(self.flat) // 2

    def __bool__(self) -> bool:
        return bool(self.flat)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        it = iter(self.flat)
        return zip(it, it, strict=True)

    def __getitem__(self, i: int) -> tuple[int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.flat[2 * i], self.flat[2 * i + 1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Runs):
            return self.flat == other.flat
        return NotImplemented

    __hash__ = None  # mutable

    @property
    def pages(self) -> int:
        return sum(self.flat[1::2])

    @property
    def nbytes(self) -> int:
        return self.pages * PAGE_SIZE

    def page_addresses(self) -> Iterator[int]:
        """Every page address (tests and small ranges only)."""
        for start, n in self:
            yield from range(start, start + n * PAGE_SIZE, PAGE_SIZE)

    def __repr__(self) -> str:
        head = ", ".join(f"({s:#x}, {n})" for s, n in list(self)[:4])
        more = f", ... {len(self) - 4} more" if len(self) > 4 else ""
        return f"Runs([{head}{more}], pages={self.pages})"


# ------------------------------------------------------------- PAGEMAP_SCAN


class Region(NamedTuple):
    """One page_region: [start, end) with the categories in return_mask."""

    start: int
    end: int
    categories: Category

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


class Scan(NamedTuple):
    regions: list[Region]
    walk_end: int  # == end when the whole range was walked


class ScanError(OSError):
    """PAGEMAP_SCAN failed part-way through a range.

    `runs` were reported, and with rearm already write-protected again, before
    the failure: the caller must still copy them or their writes are lost.
    `walk_end` is where the failing call started (e.g. the first VMA that is
    not WP_ASYNC-registered, for EPERM).
    """

    def __init__(self, errno_: int, message: str, runs: Runs, walk_end: int):
        super().__init__(errno_, message)
        self.runs = runs
        self.walk_end = walk_end

    def __reduce__(self):
        return (_rebuild_scan_error, (self.errno, self.strerror, list(self.runs), self.walk_end))


def _rebuild_scan_error(errno_, message, pairs, walk_end):
    return ScanError(errno_, message, Runs(pairs), walk_end)


def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int = 0,
    inverted: int = 0,
    mask: int = 0,
    anyof: int = 0,
    return_mask: int = 0,
    vec_len: int = 256,
    max_pages: int = 0,
) -> Scan:
    """One raw PAGEMAP_SCAN call, for probes, tests and diagnostics.

    vec_len=0 passes no buffer at all (with WP_MATCHING: protect everything).
    Does not loop: check walk_end. Kernel quirks (6.18): with vec_len > 512
    walk_end can be stale (an earlier internal refill point) after a walk that
    reached the end; and a failing call (e.g. EPERM) has already flushed, and
    with WP_MATCHING re-protected, regions it does not count. scan_written()
    handles both.
    """
    vec = ffi.new("struct ck_page_region[]", vec_len) if vec_len else ffi.NULL
    walk = ffi.new("uint64_t *")
    n = check(
        lib.ck_pagemap_scan(
            pagemap_fd, start, end, flags, inverted, mask, anyof, return_mask,
            vec, vec_len, max_pages, walk,
        ),
        "PAGEMAP_SCAN",
    )  # fmt: skip
    regions = [Region(vec[i].start, vec[i].end, Category(vec[i].categories)) for i in range(n)]
    return Scan(regions, walk[0])


_RUNS_PER_CALL = 16384
_tls = threading.local()


def _out_buffer():
    buf = getattr(_tls, "runs", None)
    if buf is None:
        buf = _tls.runs = ffi.new("uint64_t[]", 2 * _RUNS_PER_CALL)
    return buf


def scan_written(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    rearm: bool = True,
    runs_per_call: int = _RUNS_PER_CALL,
) -> Runs:
    """Written pages of [start, end) as merged runs.

    rearm=True is the tracker's round: report and write-protect again in one
    atomic step, and fail with EPERM (ScanError, carrying the runs already
    re-armed) on a VMA that is not WP_ASYNC-registered. rearm=False only
    looks: unregistered VMAs then report every page as written.
    """
    _check_range(start, end)
    runs_per_call = max(1, min(runs_per_call, _RUNS_PER_CALL))
    out = _out_buffer()
    walk = ffi.new("uint64_t *")
    runs = Runs()
    pos = start
    while pos < end:
        n = lib.ck_pagemap_scan_written(pagemap_fd, pos, end, int(rearm), out, runs_per_call, walk)
        if n < 0:
            raise ScanError(
                -n, f"PAGEMAP_SCAN ({_rng(pos, end)}) failed: {os.strerror(-n)}", runs, pos
            )
        if n:
            runs._extend_raw(out, n)
        pos = walk[0]
    return runs


def protect_all(pagemap_fd: int, start: int, end: int, *, check_wpasync: bool = True) -> None:
    """Write-protect every page of [start, end), never-populated ones included.

    With check_wpasync a VMA that is not WP_ASYNC-registered is EPERM instead
    of being skipped silently (holes between VMAs are fine).
    """
    _check_range(start, end)
    check(
        lib.ck_pagemap_scan_protect_all(pagemap_fd, start, end, int(check_wpasync)),
        "PAGEMAP_SCAN(protect all)",
        target=_rng(start, end),
    )


# ---------------------------------------------------------- WpAsyncContext


class WpAsyncContext:
    """A WP_ASYNC uffd context plus the pagemap of the mm it belongs to.

    Built over fds the caller already holds (typically the pidfd_getfd copy
    of a uffd created inside the target by syscall injection, and that
    target's /proc/PID/pagemap); `adopt()` does the pidfd part. Closing the
    last reference to the uffd ends tracking and clears every wp bit, so the
    context owns and closes its fds unless told otherwise.
    """

    def __init__(
        self,
        uffd: int,
        pagemap_fd: int,
        *,
        pid: int | None = None,
        pidfd: int | None = None,
        owns_fds: bool = True,
    ):
        self.uffd = uffd
        self.pagemap_fd = pagemap_fd
        self.pid = pid
        self.pidfd = pidfd
        self.owns_fds = owns_fds
        self.api: ApiInfo | None = None

    @classmethod
    def adopt(cls, pid: int, target_fd: int, *, handshake: bool = True) -> WpAsyncContext:
        """Take the uffd `target_fd` of process `pid` (created there) and its pagemap.

        The pidfd pins the identity: if pid died (and was maybe reused) while
        the pagemap was being opened, the liveness check fails with ESRCH.
        """
        pidfd = pidfd_open(pid)
        fds: list[int] = [pidfd]
        try:
            uffd = pidfd_getfd(pidfd, target_fd)
            fds.append(uffd)
            pm = procfs.open_file(pid, "pagemap", os.O_RDONLY)
            fds.append(pm)
            pidfd_send_signal(pidfd, 0)
            ctx = cls(uffd, pm, pid=pid, pidfd=pidfd)
            if handshake:
                ctx.handshake()
            return ctx
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    @classmethod
    def for_self(cls, *, handshake: bool = True) -> WpAsyncContext:
        """A context on ckpt's own mm (probes, tests, benchmarks)."""
        try:
            uffd = uffd_create()
        except OSError:
            uffd = uffd_dev_create()
        try:
            pm = procfs.open_file("self", "pagemap", os.O_RDONLY)
        except BaseException:
            os.close(uffd)
            raise
        ctx = cls(uffd, pm, pid=os.getpid())
        if handshake:
            try:
                ctx.handshake()
            except BaseException:
                ctx.close()
                raise
        return ctx

    def handshake(self, features: int = TRACKING_FEATURES) -> ApiInfo:
        """UFFDIO_API (once per uffd). EINVAL means the kernel lacks a feature."""
        self.api = uffd_api(self.uffd, features)
        return self.api

    def register(self, start: int, end: int) -> None:
        register_wp(self.uffd, start, end)

    def unregister(self, start: int, end: int) -> None:
        unregister(self.uffd, start, end)

    def protect_all(self, start: int, end: int) -> None:
        protect_all(self.pagemap_fd, start, end)

    def collect(self, start: int, end: int, *, rearm: bool = True) -> Runs:
        """Written pages of [start, end), re-armed atomically (see scan_written)."""
        return scan_written(self.pagemap_fd, start, end, rearm=rearm)

    def collect_ranges(self, ranges: Iterable[tuple[int, int]], *, rearm: bool = True) -> Runs:
        """collect() over sorted, disjoint ranges (e.g. every registered VMA)."""
        runs = Runs()
        for start, end in ranges:
            runs.extend(self.collect(start, end, rearm=rearm))
        return runs

    def close(self) -> None:
        if self.owns_fds:
            for name in ("uffd", "pagemap_fd", "pidfd"):
                fd = getattr(self, name)
                if fd is not None and fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    def __enter__(self) -> WpAsyncContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WpAsyncContext(pid={self.pid}, uffd={self.uffd}, pagemap_fd={self.pagemap_fd})"
