"""userfaultfd WP_ASYNC + PAGEMAP_SCAN wrappers (ckpt/kernel/uffd.py).

The main test replays the protocol of KERNEL_INTERFACES.md §3.5 against a
real child that creates its own uffd and never stops writing, and proves the
copy ckpt assembles from collect-and-rearm rounds equals the child's memory
exactly. The smaller tests pin down the kernel facts the tracker relies on,
in ckpt's own mm (a uffd context works on the mm of its creator).
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import shutil
import signal
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.kernel import uffd as U
from ckpt.kernel.features import probe
from ckpt.kernel.memory import read_runs
from ckpt.kernel.native import PAGE_SIZE, ffi

P = PAGE_SIZE


def _missing() -> list[str]:
    f = probe()
    missing = []
    if not f.uffd_wp_async:
        missing.append("UFFD_FEATURE_WP_ASYNC")
    if not f.uffd_wp_unpopulated:
        missing.append("UFFD_FEATURE_WP_UNPOPULATED")
    if not f.pagemap_scan:
        missing.append("PAGEMAP_SCAN")
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing()), reason=f"kernel lacks {', '.join(_missing())} (Linux 6.7+)"
)


# ------------------------------------------------------------------ helpers


def _addr(m: mmap.mmap) -> int:
    buf = ffi.from_buffer(m)
    try:
        return int(ffi.cast("uintptr_t", buf))
    finally:
        ffi.release(buf)


class Area:
    """An anonymous private mapping of ckpt's own, with its address."""

    def __init__(self, npages: int):
        self.npages = npages
        self.m = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE)
        self.start = _addr(self.m)
        self.end = self.start + npages * P

    def page(self, i: int) -> int:
        return self.start + i * P

    def write(self, i: int, value: int = 1) -> None:
        self.m[i * P] = value & 0xFF

    def zap(self, i: int) -> None:
        self.m.madvise(mmap.MADV_DONTNEED, i * P, P)

    def runs(self, pages) -> U.Runs:
        runs = U.Runs()
        for i in sorted(set(pages)):
            runs.append(self.page(i), 1)
        return runs

    def close(self) -> None:
        self.m.close()


@pytest.fixture
def ctx():
    with U.WpAsyncContext.for_self() as c:
        yield c


@pytest.fixture
def area():
    a = Area(16)
    yield a
    a.close()


def categories(c: U.WpAsyncContext, area: Area, i: int) -> U.Category:
    scan = U.pagemap_scan(c.pagemap_fd, area.page(i), area.page(i + 1), return_mask=0x1FF)
    assert len(scan.regions) == 1
    return scan.regions[0].categories


# ------------------------------------------------------- remote tracking


WRITER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* writer NPAGES THP: map NPAGES (2 MiB aligned; MADV_HUGEPAGE when THP=1),
   fill the first half, create a uffd (stand-in for ckpt's injected syscall),
   print "ADDR FD", wait for one byte on stdin, close the uffd and then write
   random words forever, zapping a random page every 64k writes. */
int main(int argc, char **argv)
{
    long np = atol(argv[1]);
    int thp = atoi(argv[2]);
    size_t len = (size_t)np * 4096, align = 2UL << 20;
    char *raw = mmap(NULL, len + align, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return 2;
    char *r = (char *)(((uintptr_t)raw + align - 1) & ~(align - 1));
    madvise(r, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (long i = 0; i < np / 2; i++) memset(r + i * 4096, (int)(i & 0xff) | 1, 4096);
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1 /* USER_MODE_ONLY */);
    if (fd < 0) return 3;
    printf("%lx %d\n", (unsigned long)(uintptr_t)r, fd);
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return 4;
    close(fd);  /* ckpt's pidfd_getfd copy keeps the context alive */
    uint64_t seed = 12345, ctr = 0;
    for (;;) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        uint64_t pg = (seed >> 33) % (uint64_t)np, off = (seed >> 20) % 512;
        if (seed >> 60)         /* 15 of 16 writes go to a hot 1/32 of the range */
            pg %= (uint64_t)(np / 32 > 0 ? np / 32 : 1);
        ((volatile uint64_t *)(r + pg * 4096))[off] = ++ctr;
        if ((ctr & 0xffff) == 0)
            madvise(r + ((seed >> 13) % (uint64_t)np) * 4096, 4096, MADV_DONTNEED);
        if ((ctr & 0xff) == 0)  /* a few hundred pages per millisecond, not all */
            usleep(20);
    }
}
"""


@pytest.fixture(scope="module")
def writer(tmp_path_factory) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler for the writer child")
    d = tmp_path_factory.mktemp("uffd_writer")
    (d / "writer.c").write_text(WRITER_C)
    exe = str(d / "writer")
    subprocess.run([gcc, "-O1", "-o", exe, str(d / "writer.c")], check=True)
    return exe


class Shadow:
    """ckpt's copy of the child's range, kept up to date run by run."""

    def __init__(self, pid: int, start: int, npages: int):
        self.pid, self.start = pid, start
        self.data = bytearray(npages * P)
        self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def copy(self, runs: U.Runs) -> None:
        if not runs:
            return
        buf = read_runs(self.pid, self.mem_fd, list(runs))
        pos = 0
        for addr, n in runs:
            off = addr - self.start
            self.data[off : off + n * P] = buf[pos : pos + n * P]
            pos += n * P

    def close(self) -> None:
        os.close(self.mem_fd)


def _anon_huge_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("thp", [0, 1], ids=["4k", "thp"])
def test_remote_rounds_lose_no_write(writer, thp):
    """The writer is tuned so a round sees a few hundred of its 2048 pages
    written: with these settings the racy variant (scan, copy, then
    UFFDIO_WRITEPROTECT) lost 38-95 pages in every run, this one none.
    With thp the first half starts as huge pages (split by the first write)."""
    npages, rounds = 2048, 150
    proc = subprocess.Popen(
        [writer, str(npages), str(thp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    ctx = shadow = None
    try:
        addr_s, fd_s = proc.stdout.readline().split()
        start, end = int(addr_s, 16), int(addr_s, 16) + npages * P
        if thp and _anon_huge_kb(proc.pid) == 0:
            pytest.skip("the child got no transparent hugepages (THP disabled?)")
        ctx = U.WpAsyncContext.adopt(proc.pid, int(fd_s))
        assert ctx.api.features & U.Feature.WP_ASYNC
        proc.stdin.write(b"g")  # the child drops its own uffd and starts writing
        proc.stdin.flush()

        ctx.register(start, end)
        ctx.protect_all(start, end)  # arm first, then copy the baseline
        shadow = Shadow(proc.pid, start, npages)
        shadow.copy(U.Runs([(start, npages)]))
        copied = 0
        for _ in range(rounds):
            runs = ctx.collect(start, end)
            shadow.copy(runs)
            copied += runs.pages
            time.sleep(0.001)

        os.kill(proc.pid, signal.SIGSTOP)
        os.waitpid(proc.pid, os.WUNTRACED)
        shadow.copy(ctx.collect(start, end))  # the final, frozen round
        assert not ctx.collect(start, end)  # frozen: nothing written since

        real = read_runs(proc.pid, shadow.mem_fd, [(start, npages)])
        lost = [
            i
            for i in range(npages)
            if real[i * P : (i + 1) * P] != shadow.data[i * P : (i + 1) * P]
        ]
        assert lost == []
        assert copied > rounds  # the child really was writing all along
    finally:
        proc.kill()
        proc.wait()
        for obj in (ctx, shadow):
            if obj is not None:
                obj.close()


def test_adopt_dead_process_fails(writer):
    proc = subprocess.Popen([writer, "16", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        _, fd_s = proc.stdout.readline().split()
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(OSError) as exc:
        U.WpAsyncContext.adopt(proc.pid, int(fd_s))
    assert exc.value.errno == errno.ESRCH


# --------------------------------------------------------- kernel facts


def test_unpopulated_pages_are_written_until_protected(ctx, area):
    """Never-populated pages of a registered VMA read as WRITTEN (6.18; older
    6.7+ kernels said not written): runs include them, PRESENT tells which
    hold data; after protect-all they carry markers (SWAPPED, not WRITTEN)."""
    area.write(0)
    area.write(1)
    ctx.register(area.start, area.end)
    runs = ctx.collect(area.start, area.end)
    assert runs in (area.runs(range(area.npages)), area.runs([0, 1]))
    present = U.pagemap_scan(
        ctx.pagemap_fd,
        area.start,
        area.end,
        mask=U.Category.PRESENT,
        return_mask=U.Category.PRESENT,
    )
    assert [(r.start, r.end) for r in present.regions] == [(area.page(0), area.page(2))]
    assert not ctx.collect(area.start, area.end)  # the scan re-armed all of them

    ctx.protect_all(area.start, area.end)
    cat = categories(ctx, area, 5)
    assert cat & U.Category.SWAPPED and not cat & (U.Category.WRITTEN | U.Category.PRESENT)
    area.write(5)
    assert ctx.collect(area.start, area.end) == area.runs([5])
    assert categories(ctx, area, 5) & U.Category.PRESENT


def test_dontneed_page_shows_up_written(ctx, area):
    for i in range(4):
        area.write(i)
    ctx.register(area.start, area.end)
    ctx.protect_all(area.start, area.end)
    assert not ctx.collect(area.start, area.end)
    area.zap(2)
    cat = categories(ctx, area, 2)
    assert cat & U.Category.WRITTEN
    assert not cat & (U.Category.PRESENT | U.Category.SWAPPED)  # "changed, now zero"
    assert ctx.collect(area.start, area.end) == area.runs([2])
    assert not ctx.collect(area.start, area.end)


def test_check_wpasync_eperm_on_unregistered_vma(ctx, area):
    area.write(0)
    with pytest.raises(U.ScanError) as exc:
        ctx.collect(area.start, area.end)
    assert exc.value.errno == errno.EPERM
    assert not exc.value.runs
    # without re-arming nothing is checked: every page reads written
    assert ctx.collect(area.start, area.end, rearm=False) == area.runs(range(area.npages))
    with pytest.raises(OSError) as exc2:
        ctx.protect_all(area.start, area.end)
    assert exc2.value.errno == errno.EPERM


def test_eperm_part_way_keeps_the_rearmed_runs(ctx, area):
    """The kernel re-protects and flushes the regions of the registered VMA,
    then returns -EPERM for the next one without saying how many it wrote.
    A raw call loses those writes; scan_written hands them back."""
    half = area.npages // 2
    ctx.register(area.start, area.page(half))
    ctx.protect_all(area.start, area.page(half))
    area.write(3)
    area.write(6)
    with pytest.raises(OSError):
        U.pagemap_scan(
            ctx.pagemap_fd,
            area.start,
            area.end,
            flags=U.PM_SCAN_WP_MATCHING | U.PM_SCAN_CHECK_WPASYNC,
            mask=U.Category.WRITTEN,
            return_mask=U.Category.WRITTEN,
        )
    assert not ctx.collect(area.start, area.page(half))  # gone: re-armed, unreported

    area.write(3, 2)
    area.write(6, 2)
    with pytest.raises(U.ScanError) as exc:
        ctx.collect(area.start, area.end)
    assert exc.value.errno == errno.EPERM
    assert exc.value.runs == area.runs([3, 6])
    assert exc.value.walk_end == area.page(7)
    assert not ctx.collect(area.start, area.page(half))
    clone = pickle.loads(pickle.dumps(exc.value))
    assert (clone.errno, clone.runs, clone.walk_end) == (
        errno.EPERM,
        exc.value.runs,
        exc.value.walk_end,
    )


def test_register_refuses_the_vdso(ctx):
    vdso = next(v for v in probe().vdso if v.name == "[vdso]")
    with pytest.raises(OSError) as exc:
        ctx.register(vdso.start, vdso.start + vdso.size)
    assert exc.value.errno == errno.EINVAL
    assert "UFFDIO_REGISTER" in str(exc.value)


def test_unaligned_range_is_a_value_error(ctx, area):
    with pytest.raises(ValueError):
        ctx.collect(area.start + 1, area.end)


def test_second_api_handshake_is_einval(ctx):
    with pytest.raises(OSError) as exc:
        ctx.handshake()
    assert exc.value.errno == errno.EINVAL


# ------------------------------------------ runs against a naive reference

REF_PAGES = 700


@pytest.fixture(scope="module")
def tracked():
    """One registered area for every example: each one ends fully re-armed."""
    area = Area(REF_PAGES)
    c = U.WpAsyncContext.for_self()
    try:
        for i in range(REF_PAGES):
            area.write(i)
        c.register(area.start, area.end)
        c.protect_all(area.start, area.end)
        yield c, area
    finally:
        c.close()
        area.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.sets(st.integers(0, REF_PAGES - 1), max_size=400),
    zaps=st.sets(st.integers(0, REF_PAGES - 1), max_size=20),
    per_call=st.sampled_from([1, 2, 3, 7, 64, 16384]),
)
def test_collect_matches_reference(tracked, writes, zaps, per_call):
    c, area = tracked
    for i in writes:
        area.write(i, 7)
    for i in zaps:
        area.zap(i)
    got = U.scan_written(c.pagemap_fd, area.start, area.end, runs_per_call=per_call)
    assert got == area.runs(writes | zaps)
    assert not c.collect(area.start, area.end)


def test_long_contiguous_run_merges_across_kernel_chunks(ctx):
    """>512 regions force several kernel flushes and C buffer refills; a
    contiguous stretch must still come back as one run."""
    area = Area(4096)
    try:
        ctx.register(area.start, area.end)
        ctx.protect_all(area.start, area.end)
        pattern = list(range(0, 2400, 2)) + list(range(2400, 4096))
        for i in pattern:
            area.write(i)
        for per_call in (5, 1200, 16384):
            got = U.scan_written(
                ctx.pagemap_fd, area.start, area.end, rearm=False, runs_per_call=per_call
            )
            assert got == area.runs(pattern)
            assert got[-1] == (area.page(2400), 4096 - 2400)
        assert ctx.collect(area.start, area.end) == area.runs(pattern)
    finally:
        area.close()


# ---------------------------------------------------------------- Runs


def test_runs_merge_and_order():
    r = U.Runs([(0x1000, 1), (0x2000, 2), (0x10000, 1)])
    assert list(r) == [(0x1000, 3), (0x10000, 1)]
    assert len(r) == 2 and r.pages == 4 and r.nbytes == 4 * P
    assert r[-1] == (0x10000, 1)
    with pytest.raises(ValueError):
        r.append(0x2000, 1)
    other = U.Runs([(0x11000, 1), (0x20000, 1)])
    r.extend(other)
    assert list(r) == [(0x1000, 3), (0x10000, 2), (0x20000, 1)]
    assert list(r.page_addresses())[:3] == [0x1000, 0x2000, 0x3000]
    assert not U.Runs()


def test_feature_names():
    assert U.feature_names(U.Feature.WP_ASYNC | U.Feature.MOVE) == ["WP_ASYNC", "MOVE"]
    assert U.feature_names(1 << 40) == ["bit40"]
