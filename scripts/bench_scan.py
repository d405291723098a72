#!/usr/bin/env python3
"""Cost of one uffd-wp collect-and-rearm round, per GiB mapped.

Compares ckpt's Python path (WpAsyncContext.collect → ck_pagemap_scan_written
→ Runs) with a C reference loop compiled from this file (raw PAGEMAP_SCAN
with WP_MATCHING|CHECK_WPASYNC, looping on walk_end, timed inside C), on one
anonymous private mapping of ckpt's own process:

  clean           nothing written since the last round (the steady state)
  fully written   every page written (one run: the kernel re-protects every PTE)
  every 2nd page  half the pages, as many runs as possible (Python-side cost)
  protect all     PAGEMAP_SCAN with vec=0 (arming a fully populated range)

The writes that make pages dirty happen in C, outside the timed region.

usage: python scripts/bench_scan.py [--gib 1] [--reps 9]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from cffi import FFI

from ckpt.kernel import uffd as U
from ckpt.kernel.native import PAGE_SIZE

HELPER_C = r"""
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>

struct region { uint64_t start, end, categories; };
struct scan_arg { uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages,
                  inverted, mask, anyof, ret; };
#define SCAN _IOWR('f', 16, struct scan_arg)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One collect-and-rearm round over [start, end); returns seconds (or -errno),
   *regions and *pages what it found. vec = 0 instead: protect everything. */
double ref_round(int fd, uint64_t start, uint64_t end, int protect_all,
                 uint64_t *regions, uint64_t *pages)
{
    static struct region vec[512];
    double t0 = now();
    uint64_t pos = start, nreg = 0, npg = 0;
    while (pos < end) {
        struct scan_arg a;
        memset(&a, 0, sizeof(a));
        a.size = sizeof(a);
        a.start = pos;
        a.end = end;
        if (protect_all) {
            a.flags = 1;
        } else {
            a.flags = 1 | 2;
            a.vec = (uint64_t)(uintptr_t)vec;
            a.vec_len = 512;
            a.mask = a.ret = 2;
        }
        long r = ioctl(fd, SCAN, &a);
        if (r < 0) return -1.0;
        for (long i = 0; i < r; i++) npg += (vec[i].end - vec[i].start) / 4096;
        nreg += (uint64_t)r;
        if (a.walk_end <= pos) break;
        pos = a.walk_end;
    }
    double t = now() - t0;
    *regions = nreg;
    *pages = npg;
    return t;
}

/* Write one byte in every stride-th page. */
void touch(uint64_t start, uint64_t npages, uint64_t stride, int value)
{
    for (uint64_t i = 0; i < npages; i += stride)
        ((volatile char *)(uintptr_t)start)[i * 4096] = (char)value;
}
"""

CDEF = """
double ref_round(int fd, uint64_t start, uint64_t end, int protect_all,
                 uint64_t *regions, uint64_t *pages);
void touch(uint64_t start, uint64_t npages, uint64_t stride, int value);
"""


def build_helper(tmp: str):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("bench_scan: needs a C compiler for the reference loop")
    src, so = os.path.join(tmp, "ref.c"), os.path.join(tmp, "ref.so")
    with open(src, "w") as f:
        f.write(HELPER_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", so, src], check=True)
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(so)


class Bench:
    def __init__(self, gib: float, reps: int, ffi, ref):
        self.npages = int(gib * (1 << 30)) // PAGE_SIZE
        self.gib = self.npages * PAGE_SIZE / (1 << 30)
        self.reps = reps
        self.ffi, self.ref = ffi, ref
        self.m = mmap.mmap(-1, self.npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
        self.m.madvise(mmap.MADV_NOHUGEPAGE)
        buf = ffi.from_buffer(self.m)
        self.start = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)
        self.end = self.start + self.npages * PAGE_SIZE
        self.ctx = U.WpAsyncContext.for_self()
        self.ref.touch(self.start, self.npages, 1, 1)  # populate everything
        self.ctx.register(self.start, self.end)
        self.ctx.protect_all(self.start, self.end)
        self.ctx.collect(self.start, self.end)

    def close(self) -> None:
        self.ctx.close()
        self.m.close()

    def _dirty(self, stride: int) -> None:
        if stride:
            self.ref.touch(self.start, self.npages, stride, 2)

    def c_round(self, stride: int, protect_all: bool = False) -> tuple[float, int, int]:
        self._dirty(stride)
        regions = self.ffi.new("uint64_t *")
        pages = self.ffi.new("uint64_t *")
        t = self.ref.ref_round(
            self.ctx.pagemap_fd, self.start, self.end, int(protect_all), regions, pages
        )
        if t < 0:
            raise OSError("reference PAGEMAP_SCAN failed")
        return t, regions[0], pages[0]

    def py_round(self, stride: int, protect_all: bool = False) -> tuple[float, int, int]:
        self._dirty(stride)
        t0 = time.perf_counter()
        if protect_all:
            self.ctx.protect_all(self.start, self.end)
            return time.perf_counter() - t0, 0, 0
        runs = self.ctx.collect(self.start, self.end)
        t = time.perf_counter() - t0
        return t, len(runs), runs.pages

    def measure(self, fn, stride: int, protect_all: bool = False):
        """Median and min seconds of fn over reps rounds, and what the last found.

        Every round starts clean; protect-all rounds start fully written."""
        times, found = [], (0, 0)
        for _ in range(self.reps):
            if protect_all:
                self._dirty(1)
            t, runs, pages = fn(0 if protect_all else stride, protect_all)
            times.append(t)
            found = (runs, pages)
        return statistics.median(times), min(times), found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the mapping (GiB)")
    ap.add_argument("--reps", type=int, default=9, help="rounds per case (median reported)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_scan.") as tmp:
        ffi, ref = build_helper(tmp)
        b = Bench(args.gib, args.reps, ffi, ref)
        try:
            cases = [
                ("clean", 0, False),
                ("fully written", 1, False),
                ("every 2nd page", 2, False),
                ("protect all", 0, True),
            ]
            rows = []
            for name, stride, protect in cases:
                c_med, c_min, c_found = b.measure(b.c_round, stride, protect)
                p_med, p_min, p_found = b.measure(b.py_round, stride, protect)
                if not protect:
                    assert c_found[1] == p_found[1], (name, c_found, p_found)
                rows.append((name, p_found, c_med, c_min, p_med, p_min))
        finally:
            b.close()

    per = 1e3 / b.gib
    print(f"collect-and-rearm per GiB mapped ({b.gib:g} GiB, {args.reps} reps, ms: median/min)")
    head = ("case", "runs", "pages", "C ref ms/GiB", "python ms/GiB", "ratio")
    print(f"{head[0]:<16}{head[1]:>8}{head[2]:>10}{head[3]:>16}{head[4]:>16}{head[5]:>12}")
    for name, (runs, pages), c_med, c_min, p_med, p_min in rows:
        c = f"{c_med * per:.2f}/{c_min * per:.2f}"
        p = f"{p_med * per:.2f}/{p_min * per:.2f}"
        r = f"{p_med / c_med:.2f}/{p_min / c_min:.2f}"
        print(f"{name:<16}{runs:>8}{pages:>10}{c:>16}{p:>16}{r:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
