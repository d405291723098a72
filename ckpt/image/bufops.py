"""Byte work on page buffers and chunk frames: CRC-32, which pages are all zero,
dropping those in place, gathering pieces into one buffer.

Each public name is ckpt's C version when ckpt/accel.py has it (the dump's and the
restore's data path: no per-page Python loop, no GIL held), else the plain Python one
defined here, which gives the same results (tests/test_image_plain.py compares them)
at a few GB/s: enough for `ckpt verify` or a compaction on a machine without the
compiled extension. The `*_py` versions are kept importable for those tests.
"""

from __future__ import annotations

import zlib

from .. import accel
from ..units import PAGE_SIZE

ZERO_PAGE = bytes(PAGE_SIZE)
_SCAN_PAGES = 256  # pages copied out at a time to be scanned (1 MiB)


def page_flags_py(buf, npages: int) -> list[bool]:
    """For each of the first npages pages of buf: True when it holds a non-zero byte."""
    mv = memoryview(buf).cast("B")
    flags: list[bool] = []
    for base in range(0, npages, _SCAN_PAGES):
        n = min(_SCAN_PAGES, npages - base)
        # bytes.startswith is a memcmp that stops at the first non-zero byte; a memoryview
        # has no such method, hence the copy (≈ as fast as the compare itself)
        block = mv[base * PAGE_SIZE : (base + n) * PAGE_SIZE].tobytes()
        starts = block.startswith
        flags.extend(not starts(ZERO_PAGE, i * PAGE_SIZE) for i in range(n))
    return flags


def nonzero_runs_py(buf, npages: int) -> list[tuple[int, int]]:
    """(first_page, npages) runs of the pages of buf that are not entirely zero."""
    runs: list[tuple[int, int]] = []
    start = -1
    for i, data in enumerate(page_flags_py(buf, npages)):
        if data and start < 0:
            start = i
        elif not data and start >= 0:
            runs.append((start, i - start))
            start = -1
    if start >= 0:
        runs.append((start, npages - start))
    return runs


def pack_nonzero_py(buf, runs) -> tuple[list[tuple[int, int, int]], int]:
    """Drop the all-zero pages of buf (runs' pages back to back) in place.

    The pages kept are moved down to lie back to back from buf's start. Returns
    ((vaddr, npages, is_data) records in buffer order, neighbours of the same kind
    merged, pages kept)."""
    runs = [(a, n) for a, n in runs]
    mv = memoryview(buf).cast("B")
    flags = page_flags_py(mv, sum(n for _, n in runs))
    recs: list[list[int]] = []
    src = dst = 0
    for a, cnt in runs:
        p = 0
        while p < cnt:
            data = flags[src + p]
            q = p + 1
            while q < cnt and flags[src + q] == data:
                q += 1
            va, np = a + p * PAGE_SIZE, q - p
            last = recs[-1] if recs else None
            if last is not None and last[2] == data and last[0] + last[1] * PAGE_SIZE == va:
                last[1] += np
            else:
                recs.append([va, np, int(data)])
            if data:
                if dst != src + p:  # memoryview assignment is a memmove: overlap is fine
                    mv[dst * PAGE_SIZE : (dst + np) * PAGE_SIZE] = mv[
                        (src + p) * PAGE_SIZE : (src + q) * PAGE_SIZE
                    ]
                dst += np
            p = q
        src += cnt
    return [(va, np, data) for va, np, data in recs], dst


def gather_py(dst, pieces, length: int) -> None:
    """Copy pieces (buffers) back to back into dst and zero dst up to `length`."""
    d = memoryview(dst).cast("B")
    off = 0
    for p in pieces:
        pv = memoryview(p).cast("B")
        d[off : off + pv.nbytes] = pv
        off += pv.nbytes
    if length > off:
        d[off:length] = bytes(length - off)


crc32 = accel.crc32 or zlib.crc32  # (data, crc=0): zlib's CRC-32
nonzero_runs = accel.nonzero_runs or nonzero_runs_py
pack_nonzero = accel.pack_nonzero or pack_nonzero_py
gather = accel.gather or gather_py
