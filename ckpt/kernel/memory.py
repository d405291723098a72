"""Page runs of another process: which pages hold data, and bulk reads/writes."""

from __future__ import annotations

import functools
import os

from .native import PAGE_SIZE, check, ffi, lib

_RUNS_CAP = 65536
_SCAN_VEC = 512  # regions per PAGEMAP_SCAN call (more can leave walk_end stale, kernel/uffd.py)


SOFT_DIRTY = 1 << 55


def pagemap_runs(
    pagemap_fd: int, start: int, end: int, *, include_file: bool, zero_pfn: int, require: int = 0
) -> list[tuple[int, int]]:
    """(addr, npages) runs of [start, end) holding data that must be saved.

    `require`: pagemap bits that must also be set (SOFT_DIRTY for that tracker).
    """
    out = ffi.new("uint64_t[]", 2 * _RUNS_CAP)
    nxt = ffi.new("uint64_t *")
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        n = check(
            lib.ck_pagemap_runs(
                pagemap_fd, pos, end, int(include_file), zero_pfn, require, out, _RUNS_CAP, nxt
            ),
            "read /proc/PID/pagemap",
        )
        flat = ffi.unpack(out, 2 * n)
        runs.extend(zip(flat[0::2], flat[1::2]))
        if nxt[0] <= pos:
            break
        pos = nxt[0]
    return _merge(runs)


def pagemap_filter(
    pagemap_fd: int, runs, *, include_file: bool, zero_pfn: int, require: int = 0
) -> list[tuple[int, int]]:
    """The pages among `runs` that hold data (e.g. of the pages a tracker reported written)."""
    flat = [x for r in runs for x in r]
    if not flat:
        return []
    src = ffi.new("uint64_t[]", flat)
    out = ffi.new("uint64_t[]", 2 * _RUNS_CAP)
    consumed = ffi.new("size_t *")
    result: list[tuple[int, int]] = []
    total, done = len(flat) // 2, 0
    while done < total:
        n = check(
            lib.ck_pagemap_filter(pagemap_fd, src + 2 * done, total - done, int(include_file),
                                  zero_pfn, require, out, _RUNS_CAP, consumed),
            "read /proc/PID/pagemap",
        )  # fmt: skip
        got = ffi.unpack(out, 2 * n)
        result.extend(zip(got[0::2], got[1::2]))
        if consumed[0] == 0:  # one input run alone overflows the buffer: split it
            a, k = flat[2 * done], flat[2 * done + 1]
            result.extend(pagemap_runs(pagemap_fd, a, a + k * PAGE_SIZE, include_file=include_file,
                                       zero_pfn=zero_pfn, require=require))  # fmt: skip
            done += 1
        done += consumed[0]
    return _merge(result)


def present_runs(
    pagemap_fd: int, start: int, end: int, *, include_file: bool, zero_pfn: int, use_scan: bool
) -> list[tuple[int, int]]:
    """Like pagemap_runs (the pages holding data), via PAGEMAP_SCAN when available.

    The kernel merges pages into regions, so a mostly-present 4 GiB VMA costs a
    few regions instead of reading 8 MiB of pagemap. Swapped-only regions may be
    uffd-wp markers (no data): those are re-read from pagemap, which tells them
    apart.
    """
    if not use_scan:
        return pagemap_runs(pagemap_fd, start, end, include_file=include_file, zero_pfn=zero_pfn)
    # the raw call, with plain int masks: a sparse heap has thousands of regions,
    # and an IntFlag per region cost more than the kernel's whole walk
    present, swapped = lib.PAGE_IS_PRESENT, lib.PAGE_IS_SWAPPED
    file, pfnzero = lib.PAGE_IS_FILE, lib.PAGE_IS_PFNZERO
    skip = pfnzero | (0 if include_file else file)
    vec = ffi.new("struct ck_page_region[]", _SCAN_VEC)
    walk = ffi.new("uint64_t *")
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        n = check(
            lib.ck_pagemap_scan(pagemap_fd, pos, end, 0, 0, 0, present | swapped,
                                present | swapped | file | pfnzero, vec, _SCAN_VEC, 0, walk),
            "PAGEMAP_SCAN",
        )  # fmt: skip
        for i in range(n):
            r = vec[i]
            c = r.categories
            if c & present:
                if not c & skip:
                    out.append((r.start, (r.end - r.start) // PAGE_SIZE))
            elif not c & pfnzero:  # swap entries, or uffd-wp markers: pagemap tells
                out.extend(
                    pagemap_runs(
                        pagemap_fd, r.start, r.end, include_file=include_file, zero_pfn=zero_pfn
                    )
                )
        if walk[0] <= pos:
            break
        pos = walk[0]
    return _merge(out)


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, n in runs:
        if merged and merged[-1][0] + merged[-1][1] * PAGE_SIZE == a:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((a, n))
    return merged


def read_runs(
    pid: int,
    mem_fd: int,
    runs: list[tuple[int, int]],
    buf: bytearray | None = None,
    pm_fd: int = -1,
):
    """Read runs back to back; returns a bytearray (or fills buf) of sum(npages) pages.
    pm_fd: the process's pagemap: pages that may be shared copy-on-write are read
    through mem_fd, which leaves them shared (process_vm_readv would unshare them)."""
    total = sum(n for _, n in runs) * PAGE_SIZE
    if buf is None:
        buf = bytearray(total)
    arr = ffi.new("uint64_t[]", [x for r in runs for x in r])
    check(
        lib.ck_read_runs(pid, mem_fd, pm_fd, arr, len(runs), ffi.from_buffer(buf)),
        "process_vm_readv",
        target=pid,
    )
    return buf


def pack_nonzero(buf, runs) -> tuple[list[tuple[int, int, int]], int]:
    """Drop the all-zero pages of buf (runs' pages back to back) in place, in C.

    The pages kept are moved down to lie back to back from buf's start. Returns
    ((vaddr, npages, is_data) records in buffer order, pages kept)."""
    flat = [x for r in runs for x in r]
    if not flat:
        return [], 0
    cap = sum(flat[1::2]) + 1
    out = ffi.new("uint64_t[]", 3 * cap)
    kept = ffi.new("uint64_t *")
    arr = ffi.new("uint64_t[]", flat)
    n = check(
        lib.ck_pack_nonzero(ffi.from_buffer(buf, require_writable=True), arr, len(flat) // 2,
                            out, cap, kept),
        "pack_nonzero",
    )  # fmt: skip
    vals = ffi.unpack(out, 3 * n)
    return list(zip(vals[0::3], vals[1::3], vals[2::3])), kept[0]


def crc32(data, crc: int = 0) -> int:
    """zlib.crc32(data, crc), in C with PCLMULQDQ where the CPU has it; no GIL held."""
    n = memoryview(data).nbytes
    return lib.ck_crc32(crc, ffi.from_buffer(data), n) if n else crc


def gather(dst, pieces, length: int) -> None:
    """Copy pieces (buffers) back to back into dst and zero dst up to `length` (C, no GIL)."""
    d = ffi.from_buffer(dst, require_writable=True)
    off = 0
    for p in pieces:
        n = memoryview(p).nbytes
        lib.ck_copy(d + off, ffi.from_buffer(p), n)
        off += n
    if length > off:
        ffi.memmove(d + off, bytes(length - off), length - off)


def write_pieces(pid: int, mem_fd: int, buf, pieces) -> None:
    """Write (vaddr, npages, first_page_in_buf) pieces of buf into process pid
    (process_vm_writev; /proc/PID/mem for pages it may not write). No GIL held."""
    flat = [x for p in pieces for x in p]
    if not flat:
        return
    arr = ffi.new("uint64_t[]", flat)
    check(
        lib.ck_write_pieces(pid, mem_fd, ffi.from_buffer(buf), arr, len(flat) // 3),
        "process_vm_writev",
        target=pid,
    )


@functools.cache
def thp_always() -> bool:
    """Transparent huge pages back every anonymous VMA that does not refuse them."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", "rb") as f:
            return b"[always]" in f.read()
    except OSError:
        return False


def fill_pieces(uffd: int, ranges: list[int], pid: int, mem_fd: int, buf, pieces) -> int:
    """write_pieces, through UFFDIO_COPY where the pages lie in `ranges` (flat sorted
    start, end pairs registered in MISSING mode on uffd, the process's userfaultfd);
    uffd -1: write_pieces. Returns the pages UFFDIO_COPY placed. No GIL held."""
    flat = [x for p in pieces for x in p]
    if not flat:
        return 0
    arr = ffi.new("uint64_t[]", flat)
    rng = ffi.new("uint64_t[]", ranges)
    filled = ffi.new("uint64_t *")
    check(
        lib.ck_fill_pieces(
            uffd,
            rng,
            len(ranges) // 2,
            pid,
            mem_fd,
            ffi.from_buffer(buf),
            arr,
            len(flat) // 3,
            filled,
        ),
        "process_vm_writev",
        target=pid,
    )
    return filled[0] // PAGE_SIZE


def write_runs(mem_fd: int, runs: list[tuple[int, int]], data) -> None:
    """Write data (sum(npages) pages) to runs through /proc/PID/mem."""
    arr = ffi.new("uint64_t[]", [x for r in runs for x in r])
    check(lib.ck_write_runs(mem_fd, arr, len(runs), ffi.from_buffer(data)), "write /proc/PID/mem")


def write_at(mem_fd: int, addr: int, data) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(mem_fd, view[done:], addr + done)
