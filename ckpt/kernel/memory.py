"""Page runs of another process: which pages hold data, and bulk reads/writes."""

from __future__ import annotations

import os

from .native import PAGE_SIZE, check, ffi, lib

_RUNS_CAP = 65536


def pagemap_runs(
    pagemap_fd: int, start: int, end: int, *, include_file: bool, zero_pfn: int
) -> list[tuple[int, int]]:
    """(addr, npages) runs of [start, end) holding data that must be saved."""
    out = ffi.new("uint64_t[]", 2 * _RUNS_CAP)
    nxt = ffi.new("uint64_t *")
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        n = check(
            lib.ck_pagemap_runs(pagemap_fd, pos, end, int(include_file), zero_pfn, out, _RUNS_CAP, nxt),
            "read /proc/PID/pagemap",
        )
        flat = ffi.unpack(out, 2 * n)
        runs.extend(zip(flat[0::2], flat[1::2]))
        if nxt[0] <= pos:
            break
        pos = nxt[0]
    return _merge(runs)


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, n in runs:
        if merged and merged[-1][0] + merged[-1][1] * PAGE_SIZE == a:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((a, n))
    return merged


def read_runs(pid: int, mem_fd: int, runs: list[tuple[int, int]], buf: bytearray | None = None):
    """Read runs back to back; returns a bytearray (or fills buf) of sum(npages) pages."""
    total = sum(n for _, n in runs) * PAGE_SIZE
    if buf is None:
        buf = bytearray(total)
    arr = ffi.new("uint64_t[]", [x for r in runs for x in r])
    check(lib.ck_read_runs(pid, mem_fd, arr, len(runs), ffi.from_buffer(buf)), "process_vm_readv", target=pid)
    return buf


def write_runs(mem_fd: int, runs: list[tuple[int, int]], data) -> None:
    """Write data (sum(npages) pages) to runs through /proc/PID/mem."""
    arr = ffi.new("uint64_t[]", [x for r in runs for x in r])
    check(lib.ck_write_runs(mem_fd, arr, len(runs), ffi.from_buffer(data)), "write /proc/PID/mem")


def write_at(mem_fd: int, addr: int, data) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(mem_fd, view[done:], addr + done)
