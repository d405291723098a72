"""What this kernel offers ckpt, found by using each feature once (`ckpt check`).

Version numbers lie (distributions backport, configs switch things off: the
6.18 kernel here has no soft-dirty), so, like CRIU's kerndat, every answer
comes from actually calling the feature: a throw-away uffd, a PAGEMAP_SCAN of
our own pagemap, a forked child that writes a page after clear_refs, a
seized child, a clone3 into our own PID. A missing feature shows up as
ENOSYS/ENOTTY/EINVAL/EPERM and becomes "no" with that reason as the note;
probing never raises for an absent feature.

probe() is cached per process; the result is a plain dataclass, with
render_text() for the `ckpt check` table and to_json() for `--json`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import abi, procfs
from . import uffd as U
from .native import PAGE_SIZE, ffi, lib, syscall
from .pidfd import PIDFD_THREAD, pidfd_getfd, pidfd_open

T = TypeVar("T")

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = abi.CAP_SYS_RESOURCE
CAP_CHECKPOINT_RESTORE = 40

SYS_PRCTL = abi.NR_PRCTL
SYS_ARCH_PRCTL = abi.NR_ARCH_PRCTL
PR_SET_MM = abi.PR_SET_MM
PR_SET_MM_MAP_SIZE = 15
PRCTL_MM_MAP_SIZE = 104  # sizeof(struct prctl_mm_map)
PR_TIMER_CREATE_RESTORE_IDS = abi.PR_TIMER_CREATE_RESTORE_IDS
PR_TIMER_CREATE_RESTORE_IDS_GET = 2
ARCH_MAP_VDSO_64 = 0x2003

VDSO_NAMES = ("[vvar]", "[vvar_vclock]", "[vdso]")

#: Backends of ckpt/track/, best first.
BACKENDS = ("uffd-wp", "soft-dirty", "full")

#: Features the basic dump/restore cannot do without, and why.
REQUIRED = {
    "ptrace_seize": "ptrace(PTRACE_SEIZE) to stop and inspect the target",
    "process_vm_readv": "process_vm_readv to copy the target's memory",
    "clone3_set_tid": "clone3 with set_tid to restore at the same PID",
    "pr_set_mm_map": "prctl(PR_SET_MM_MAP) to restore mm fields (brk, auxv, exe)",
}


@dataclass(frozen=True)
class VdsoVma:
    name: str
    start: int
    size: int


@dataclass(frozen=True)
class Features:
    """One probe of the running kernel. Booleans mean "used it, and it worked"."""

    kernel_release: str
    # userfaultfd
    userfaultfd_syscall: bool
    userfaultfd_dev: bool
    uffd_features: int  # every feature UFFDIO_API reports (0 without uffd)
    uffd_ioctls: int
    wp_async_anon: bool  # a WP_ASYNC context registered private anonymous memory
    wp_async_file: bool  # ... and a private mapping of a regular file
    wp_async_roundtrip: bool  # protect all, write, PAGEMAP_SCAN reports exactly that
    # PAGEMAP_SCAN
    pagemap_scan: bool
    pagemap_scan_categories: int  # PAGE_IS_* bits the kernel accepts
    # soft-dirty
    soft_dirty: bool
    # processes
    pidfd_open: bool
    pidfd_thread: bool
    pidfd_getfd: bool
    clone3_set_tid: bool
    ptrace_seize: bool
    ptrace_rseq_config: bool
    process_vm_readv: bool
    # restoring mm and kernel state
    pr_set_mm_map: bool
    pr_timer_restore_ids: bool
    arch_map_vdso: bool
    vdso: tuple[VdsoVma, ...]
    proc_timers: bool
    proc_map_files: bool
    xstate_size: int
    # environment
    cap_eff: int
    thp: str
    unprivileged_userfaultfd: int | None
    tcp_repair: bool = False  # TCP_REPAIR on a socket (CAP_NET_ADMIN): established connections
    nft: bool = False  # the nft command: the network lock of --tcp-established
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def uffd_wp_async(self) -> bool:
        return bool(self.uffd_features & U.Feature.WP_ASYNC)

    @property
    def uffd_wp_unpopulated(self) -> bool:
        return bool(self.uffd_features & U.Feature.WP_UNPOPULATED)

    @property
    def pagemap_scan_guard(self) -> bool:
        return bool(self.pagemap_scan_categories & U.Category.GUARD)

    @property
    def pagemap_scan_soft_dirty(self) -> bool:
        return bool(self.pagemap_scan_categories & U.Category.SOFT_DIRTY)

    @property
    def dirty_backend(self) -> str:
        """The tracker ckpt would use: one of BACKENDS."""
        if (
            self.uffd_wp_async
            and self.uffd_wp_unpopulated
            and self.pagemap_scan
            and self.wp_async_roundtrip
        ):
            return "uffd-wp"
        if self.soft_dirty:
            return "soft-dirty"
        return "full"

    def has_cap(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)

    def required_missing(self) -> list[str]:
        """Keys of REQUIRED that this kernel (or ckpt's privileges) lacks."""
        return [key for key in REQUIRED if not getattr(self, key)]


def required_missing(features: Features | None = None) -> list[str]:
    return (features or probe()).required_missing()


# ----------------------------------------------------------------- probing


class _No(Exception):
    """A probe's negative answer with the reason, when it is not an OSError."""


class _Prober:
    """Runs probe steps, turning failures into "no" plus a note."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    def run(self, key: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except OSError as e:
            self.notes[key] = _why(e)
        except (_No, ValueError) as e:
            self.notes[key] = str(e)
        return default

    def note(self, key: str, text: str) -> None:
        self.notes.setdefault(key, text)


def _why(e: OSError) -> str:
    if e.errno is None:
        return str(e)
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{name}: {e.strerror or os.strerror(e.errno)}"


def _err(ret: int, what: str) -> OSError:
    return OSError(-ret, f"{what} failed: {os.strerror(-ret)}")


def _uffd_fd(p: _Prober) -> tuple[bool, bool, int | None]:
    """(syscall works, /dev/userfaultfd works, a fresh fd for UFFDIO_API or None)."""
    sys_fd = p.run("userfaultfd_syscall", lambda: U.uffd_create(U.TRACKING_UFFD_FLAGS), None)
    dev_fd = p.run("userfaultfd_dev", lambda: U.uffd_dev_create(U.TRACKING_UFFD_FLAGS), None)
    keep = sys_fd if sys_fd is not None else dev_fd
    for fd in (sys_fd, dev_fd):
        if fd is not None and fd != keep:
            os.close(fd)
    return sys_fd is not None, dev_fd is not None, keep


def _uffd_api(p: _Prober, fd: int | None) -> tuple[int, int]:
    if fd is None:
        p.note("uffd_features", "no userfaultfd")
        return 0, 0
    try:
        info = p.run("uffd_features", lambda: U.uffd_api(fd, 0), None)
    finally:
        os.close(fd)
    return (int(info.features), info.ioctls) if info else (0, 0)


def _pagemap_scan(p: _Prober) -> tuple[bool, int]:
    """PAGEMAP_SCAN with no masks on an empty range: 0 = supported; then each
    category bit alone, as CRIU probes for PAGE_IS_GUARD."""
    fd = procfs.open_file("self", "pagemap", os.O_RDONLY)
    try:
        ok = p.run("pagemap_scan", lambda: _scan_accepts(fd, 0), False)
        accepted = 0
        if ok:
            for bit in range(16):
                try:
                    if _scan_accepts(fd, 1 << bit):
                        accepted |= 1 << bit
                except OSError:
                    pass
        return ok, accepted
    finally:
        os.close(fd)


def _scan_accepts(fd: int, return_mask: int) -> bool:
    """Masks are validated before the (here empty) walk: EINVAL = unknown bit."""
    U.pagemap_scan(fd, 0, 0, return_mask=return_mask, vec_len=0)
    return True


def _address(m: mmap.mmap) -> int:
    buf = ffi.from_buffer(m)
    try:
        return int(ffi.cast("uintptr_t", buf))
    finally:
        ffi.release(buf)


def _regular_file() -> str:
    """A regular file to map privately: ckpt's own native module (never tmpfs)."""
    from .. import _native

    return _native.__file__


def _wp_async(p: _Prober, features: int, scan_ok: bool) -> tuple[bool, bool, bool]:
    """In ckpt's own mm: a WP_ASYNC context registers private anon and private
    file memory, and protect-all → write → scan reports exactly the writes
    (one populated page, one never-populated page) and then nothing."""
    if not features & U.Feature.WP_ASYNC:
        for key in ("wp_async_anon", "wp_async_file", "wp_async_roundtrip"):
            p.note(key, "no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)")
        return False, False, False
    ctx = p.run("wp_async_anon", U.WpAsyncContext.for_self, None)
    if ctx is None:
        p.note("wp_async_file", p.notes["wp_async_anon"])
        p.note("wp_async_roundtrip", p.notes["wp_async_anon"])
        return False, False, False
    npages = 4
    anon = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    try:
        start = _address(anon)
        end = start + npages * PAGE_SIZE
        anon[0] = 1
        anon_ok = p.run("wp_async_anon", lambda: ctx.register(start, end) or True, False)
        file_ok = p.run("wp_async_file", lambda: _register_file(ctx), False)
        if not anon_ok:
            p.note("wp_async_roundtrip", "could not register anonymous memory")
            return False, file_ok, False
        if not scan_ok:
            p.note("wp_async_roundtrip", "no PAGEMAP_SCAN")
            return anon_ok, file_ok, False

        def roundtrip() -> bool:
            ctx.protect_all(start, end)
            if ctx.collect(start, end):
                raise _No("pages still written right after protect-all")
            anon[0] = 2  # populated, protected page
            anon[2 * PAGE_SIZE] = 3  # never populated: a WP_UNPOPULATED marker
            got = ctx.collect(start, end)
            want = U.Runs([(start, 1), (start + 2 * PAGE_SIZE, 1)])
            if got != want:
                raise _No(f"scan reported {got}, expected {want}")
            if ctx.collect(start, end):
                raise _No("written pages were not re-protected by the scan")
            return True

        return anon_ok, file_ok, p.run("wp_async_roundtrip", roundtrip, False)
    finally:
        ctx.close()  # the last reference: unregisters and drops every wp bit
        anon.close()


def _register_file(ctx: U.WpAsyncContext) -> bool:
    with open(_regular_file(), "rb") as fh:
        m = mmap.mmap(fh.fileno(), PAGE_SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        start = _address(m)
        ctx.register(start, start + PAGE_SIZE)
        ctx.unregister(start, start + PAGE_SIZE)
        return True
    finally:
        m.close()


_SOFT_DIRTY_VERDICT = {
    1: "pagemap bit 55 stays clear after a write (CONFIG_MEM_SOFT_DIRTY off)",
    2: "clear_refs 4 did not clear pagemap bit 55",
    3: "probe child: mmap failed",
    4: "probe child: writing /proc/self/clear_refs failed",
    5: "probe child: reading /proc/self/pagemap failed",
}


def _soft_dirty() -> bool:
    r = lib.ck_probe_soft_dirty()
    if r < 0:
        raise _err(r, "soft-dirty probe child")
    if r == 0:
        return True
    raise _No(_SOFT_DIRTY_VERDICT.get(r, f"probe child died with signal {r - 128}"))


def _pidfd(p: _Prober) -> tuple[bool, bool, bool]:
    pidfd = p.run("pidfd_open", lambda: pidfd_open(os.getpid()), None)
    if pidfd is None:
        p.note("pidfd_getfd", "no pidfd_open")
        p.note("pidfd_thread", "no pidfd_open")
        return False, False, False
    try:
        getfd = p.run("pidfd_getfd", lambda: os.close(pidfd_getfd(pidfd, pidfd)) or True, False)
    finally:
        os.close(pidfd)
    thread = p.run(
        "pidfd_thread",
        lambda: os.close(pidfd_open(threading.get_native_id(), PIDFD_THREAD)) or True,
        False,
    )
    return True, thread, getfd


_CLONE3_WHY = {
    errno.EPERM: "EPERM: needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN",
    errno.ENOSYS: "ENOSYS: no clone3 (Linux 5.3+)",
    errno.E2BIG: "E2BIG: clone3 without set_tid (Linux 5.5+)",
    errno.EINVAL: "EINVAL: set_tid rejected",
}


def _clone3_set_tid() -> bool:
    """clone3 into our own PID: EEXIST proves set_tid (and the permission check
    that comes before the PID lookup)."""
    r = lib.ck_probe_clone3_set_tid(os.getpid())
    if r == -errno.EEXIST:
        return True
    if r > 0:
        raise _No("clone3 ignored set_tid")
    raise _No(_CLONE3_WHY.get(-r) or _why(_err(r, "clone3")))


def _ptrace(p: _Prober) -> tuple[bool, bool, bool]:
    seize = ffi.new("int *")
    rseq = ffi.new("long *")
    readv = ffi.new("long *")
    r = lib.ck_probe_ptrace(seize, rseq, readv)
    if r < 0:
        why = _why(_err(r, "fork"))
        for key in ("ptrace_seize", "ptrace_rseq_config", "process_vm_readv"):
            p.note(key, f"no probe child: {why}")
        return False, False, False
    if seize[0] < 0:
        p.note("ptrace_seize", _why(_err(seize[0], "PTRACE_SEIZE")))
    if rseq[0] < 0:
        p.note("ptrace_rseq_config", _why(_err(rseq[0], "PTRACE_GET_RSEQ_CONFIGURATION")))
    if readv[0] < 0:
        p.note("process_vm_readv", _why(_err(readv[0], "process_vm_readv")))
    return seize[0] == 0, rseq[0] > 0, readv[0] > 0


def _pr_set_mm_map() -> bool:
    size = ffi.new("unsigned int *")
    r = syscall(SYS_PRCTL, PR_SET_MM, PR_SET_MM_MAP_SIZE, int(ffi.cast("uintptr_t", size)), 0, 0)
    if r < 0:
        raise _err(r, "prctl(PR_SET_MM_MAP_SIZE)")
    if size[0] != PRCTL_MM_MAP_SIZE:
        raise _No(f"struct prctl_mm_map is {size[0]} bytes, ckpt knows {PRCTL_MM_MAP_SIZE}")
    return True


def _pr_timer_restore_ids() -> bool:
    r = syscall(SYS_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_GET, 0, 0, 0)
    if r < 0:
        raise _err(r, "prctl(PR_TIMER_CREATE_RESTORE_IDS)")
    return True


def _vdso_layout() -> tuple[VdsoVma, ...]:
    found = []
    with open(procfs.path("self", "maps"), "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 6 and fields[5].decode() in VDSO_NAMES:
                lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
                found.append(VdsoVma(fields[5].decode(), lo, hi - lo))
    return tuple(found)


def _arch_map_vdso(vdso: tuple[VdsoVma, ...]) -> bool:
    """While a vDSO is mapped, ARCH_MAP_VDSO_64 answers EEXIST if it exists at
    all; without one it would map a new vDSO, so it is not called then."""
    if not vdso:
        raise _No("no vDSO mapped here: not probed")
    r = syscall(SYS_ARCH_PRCTL, ARCH_MAP_VDSO_64, vdso[0].start)
    if r == -errno.EEXIST:
        return True
    if r < 0:
        raise _err(r, "arch_prctl(ARCH_MAP_VDSO_64)")
    raise _No("ARCH_MAP_VDSO_64 mapped a second vDSO")  # pragma: no cover


def _map_files() -> bool:
    names = os.listdir(procfs.path("self", "map_files"))
    if not names:
        raise _No("/proc/self/map_files is empty")
    os.readlink(procfs.path("self", "map_files", names[0]))
    return True


def _proc_timers() -> bool:
    with open(procfs.path("self", "timers"), "rb"):
        return True


def _status_field(name: bytes) -> bytes:
    with open(procfs.path("self", "status"), "rb") as f:
        for line in f:
            key, _, value = line.partition(b":")
            if key == name:
                return value.strip()
    raise _No(f"no {name.decode()} in /proc/self/status")


def _thp_mode() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", "rb") as f:
        text = f.read().decode()
    lo, hi = text.find("["), text.find("]")
    if lo < 0 or hi < lo:
        raise _No(f"unexpected THP setting {text.strip()!r}")
    return text[lo + 1 : hi]


def _read_int(path: str) -> int:
    with open(path, "rb") as f:
        return int(f.read().strip())


def _probe_uncached() -> Features:
    p = _Prober()
    sys_ok, dev_ok, fd = _uffd_fd(p)
    uffd_features, uffd_ioctls = _uffd_api(p, fd)
    scan_ok, categories = _pagemap_scan(p)
    wp_anon, wp_file, wp_rt = _wp_async(p, uffd_features, scan_ok)
    pidfd_ok, pidfd_thread, getfd_ok = _pidfd(p)
    seize_ok, rseq_ok, readv_ok = _ptrace(p)
    vdso = p.run("vdso", _vdso_layout, ())
    return Features(
        kernel_release=os.uname().release,
        userfaultfd_syscall=sys_ok,
        userfaultfd_dev=dev_ok,
        uffd_features=uffd_features,
        uffd_ioctls=uffd_ioctls,
        wp_async_anon=wp_anon,
        wp_async_file=wp_file,
        wp_async_roundtrip=wp_rt,
        pagemap_scan=scan_ok,
        pagemap_scan_categories=categories,
        soft_dirty=p.run("soft_dirty", _soft_dirty, False),
        pidfd_open=pidfd_ok,
        pidfd_thread=pidfd_thread,
        pidfd_getfd=getfd_ok,
        clone3_set_tid=p.run("clone3_set_tid", _clone3_set_tid, False),
        ptrace_seize=seize_ok,
        ptrace_rseq_config=rseq_ok,
        process_vm_readv=readv_ok,
        pr_set_mm_map=p.run("pr_set_mm_map", _pr_set_mm_map, False),
        pr_timer_restore_ids=p.run("pr_timer_restore_ids", _pr_timer_restore_ids, False),
        arch_map_vdso=p.run("arch_map_vdso", lambda: _arch_map_vdso(vdso), False),
        vdso=vdso,
        proc_timers=p.run("proc_timers", _proc_timers, False),
        proc_map_files=p.run("proc_map_files", _map_files, False),
        xstate_size=lib.ck_xstate_size(),
        cap_eff=p.run("cap_eff", lambda: int(_status_field(b"CapEff"), 16), 0),
        thp=p.run("thp", _thp_mode, "unavailable"),
        unprivileged_userfaultfd=p.run(
            "unprivileged_userfaultfd",
            lambda: _read_int(procfs.system("sys", "vm", "unprivileged_userfaultfd")),
            None,
        ),
        tcp_repair=p.run("tcp_repair", _tcp_repair, False),
        nft=p.run("nft", _nft, False),
        notes=p.notes,
    )


def _tcp_repair() -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_TCP, 19, 1)  # TCP_REPAIR on a fresh socket
        except PermissionError as exc:
            raise _No("TCP_REPAIR refused: needs CAP_NET_ADMIN") from exc
    return True


def _nft() -> bool:
    from . import netlock

    if not netlock.available():
        raise _No("no `nft` command (apt-get install nftables)")
    return True


@functools.cache
def probe() -> Features:
    """Probe the running kernel once per process (~20 ms: two short-lived children)."""
    return _probe_uncached()


# ----------------------------------------------------------------- output


def _yn(ok: bool) -> str:
    return "yes" if ok else "no"


def _size(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def rows(f: Features) -> list[tuple[str, ...]]:
    """(key, feature, status, note) rows of the `ckpt check` table."""
    n = f.notes

    def row(key: str, label: str, ok: bool, yes: str = "", no: str = "") -> tuple[str, ...]:
        return key, label, _yn(ok), yes if ok else (n.get(key) or no)

    vdso = " ".join(f"{v.name} {_size(v.size)}" for v in f.vdso)
    caps = []
    caps.append(
        "CAP_SYS_RESOURCE missing" if not f.has_cap(CAP_SYS_RESOURCE) else "CAP_SYS_RESOURCE"
    )
    caps.append(
        "CAP_CHECKPOINT_RESTORE present"
        if f.has_cap(CAP_CHECKPOINT_RESTORE)
        else "CAP_CHECKPOINT_RESTORE missing"
    )
    if not f.has_cap(CAP_SYS_PTRACE):
        caps.append("CAP_SYS_PTRACE missing")
    missing = f.required_missing()
    no_category = "category bit refused (EINVAL)" if f.pagemap_scan else "no PAGEMAP_SCAN"
    backend_note = {
        "uffd-wp": "WP_ASYNC + WP_UNPOPULATED + PAGEMAP_SCAN, no freeze per round",
        "soft-dirty": "clear_refs + pagemap bit 55, target frozen while collecting",
        "full": "no dirty tracking: every round copies everything",
    }[f.dirty_backend]
    return [
        ("kernel_release", "kernel release", f.kernel_release, ""),
        row("userfaultfd_syscall", "userfaultfd() syscall", f.userfaultfd_syscall),
        row("userfaultfd_dev", "/dev/userfaultfd", f.userfaultfd_dev),
        (
            "uffd_features",
            "uffd feature bits",
            hex(f.uffd_features),
            " ".join(U.feature_names(f.uffd_features)) or n.get("uffd_features", ""),
        ),
        row("uffd_wp_async", "uffd WP_ASYNC", f.uffd_wp_async, no="Linux 6.7+"),
        row("uffd_wp_unpopulated", "uffd WP_UNPOPULATED", f.uffd_wp_unpopulated, no="Linux 6.4+"),
        row("wp_async_anon", "WP_ASYNC registers private anon", f.wp_async_anon),
        row("wp_async_file", "WP_ASYNC registers private file", f.wp_async_file),
        row(
            "wp_async_roundtrip",
            "WP_ASYNC protect/write/scan round trip",
            f.wp_async_roundtrip,
        ),
        row(
            "pagemap_scan",
            "PAGEMAP_SCAN",
            f.pagemap_scan,
            yes=f"categories {f.pagemap_scan_categories:#x}",
            no="Linux 6.7+",
        ),
        row(
            "pagemap_scan_soft_dirty",
            "PAGEMAP_SCAN PAGE_IS_SOFT_DIRTY",
            f.pagemap_scan_soft_dirty,
            no=no_category,
        ),
        row(
            "pagemap_scan_guard", "PAGEMAP_SCAN PAGE_IS_GUARD", f.pagemap_scan_guard, no=no_category
        ),
        row("soft_dirty", "soft-dirty (pagemap bit 55)", f.soft_dirty),
        row("pidfd_open", "pidfd_open", f.pidfd_open),
        row("pidfd_thread", "pidfd_open PIDFD_THREAD", f.pidfd_thread),
        row("pidfd_getfd", "pidfd_getfd", f.pidfd_getfd),
        row("clone3_set_tid", "clone3 set_tid", f.clone3_set_tid),
        row("ptrace_seize", "ptrace seize/interrupt", f.ptrace_seize),
        row("ptrace_rseq_config", "PTRACE_GET_RSEQ_CONFIGURATION", f.ptrace_rseq_config),
        row("process_vm_readv", "process_vm_readv", f.process_vm_readv),
        row("pr_set_mm_map", "PR_SET_MM_MAP", f.pr_set_mm_map, yes=f"size {PRCTL_MM_MAP_SIZE}"),
        row("pr_timer_restore_ids", "PR_TIMER_CREATE_RESTORE_IDS", f.pr_timer_restore_ids),
        row("arch_map_vdso", "ARCH_MAP_VDSO", f.arch_map_vdso),
        ("vdso", "vdso layout", str(len(f.vdso)) + " vmas", vdso or n.get("vdso", "")),
        row("proc_timers", "/proc/PID/timers", f.proc_timers),
        row("proc_map_files", "/proc/PID/map_files", f.proc_map_files),
        ("xstate_size", "xstate size", str(f.xstate_size), "bytes"),
        ("cap_eff", "capabilities (CapEff)", f"{f.cap_eff:#x}", ", ".join(caps)),
        ("thp", "transparent hugepages", f.thp, n.get("thp", "")),
        (
            "unprivileged_userfaultfd",
            "vm.unprivileged_userfaultfd",
            "-" if f.unprivileged_userfaultfd is None else str(f.unprivileged_userfaultfd),
            n.get("unprivileged_userfaultfd", ""),
        ),
        row("tcp_repair", "TCP_REPAIR", f.tcp_repair, yes="established TCP connections"),
        row(
            "nft",
            "nftables (network lock)",
            f.nft,
            yes="--tcp-established holds outside peers until the restore",
            no="outside TCP peers are reset between dump and restore",
        ),
        ("dirty_backend", "dirty tracking backend", f.dirty_backend, backend_note),
        (
            "required_missing",
            "basic dump/restore",
            "ok" if not missing else "missing",
            "; ".join(REQUIRED[k] for k in missing),
        ),
    ]


def render_text(features: Features) -> str:
    """The aligned `ckpt check` table: feature, status, note."""
    table = [("feature", "status", "note")] + [r[1:] for r in rows(features)]
    w0 = max(len(r[0]) for r in table)
    w1 = max(len(r[1]) for r in table)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in table]
    return "\n".join(lines) + "\n"


def to_json(features: Features) -> dict[str, Any]:
    """A JSON-serializable dict: every probed field plus the derived decisions."""
    d = dataclasses.asdict(features)
    d["vdso"] = [dataclasses.asdict(v) for v in features.vdso]
    d["notes"] = dict(features.notes)
    d.update(
        uffd_feature_names=U.feature_names(features.uffd_features),
        uffd_wp_async=features.uffd_wp_async,
        uffd_wp_unpopulated=features.uffd_wp_unpopulated,
        pagemap_scan_guard=features.pagemap_scan_guard,
        pagemap_scan_soft_dirty=features.pagemap_scan_soft_dirty,
        cap_sys_resource=features.has_cap(CAP_SYS_RESOURCE),
        cap_checkpoint_restore=features.has_cap(CAP_CHECKPOINT_RESTORE),
        dirty_backend=features.dirty_backend,
        required_missing=features.required_missing(),
    )
    return d
