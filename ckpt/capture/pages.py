"""Copy page runs of the target into an image layer, in batches.

Reads overlap compression: process_vm_readv runs in C without the GIL while
the layer writer's pool compresses earlier batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from ..kernel import procfs
from ..kernel.memory import read_runs
from ..kernel.native import PAGE_SIZE

BATCH_PAGES = 2048  # 8 MiB per process_vm_readv batch


def batches(runs: Iterable[tuple[int, int]], max_pages: int = BATCH_PAGES):
    """Group runs into batches of at most max_pages pages, splitting long runs."""
    batch: list[tuple[int, int]] = []
    size = 0
    for a, n in runs:
        while n:
            take = min(n, max_pages - size)
            batch.append((a, take))
            size += take
            a += take * PAGE_SIZE
            n -= take
            if size == max_pages:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class PageCopier:
    """Reads runs from a process (through one /proc/PID/mem fd) into a layer."""

    def __init__(self, pid: int, base: int = 0):
        self.pid = pid
        self.base = base  # added to page keys: a tree member's slot (capture/tree.py)
        self.mem_fd = procfs.open_file(pid, "mem", os.O_RDONLY)
        # pages shared copy-on-write are read so that they stay shared (kernel/memory.py)
        self.pm_fd = procfs.open_file(pid, "pagemap", os.O_RDONLY)

    def close(self) -> None:
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1

    def copy(
        self,
        runs: list[tuple[int, int]],
        layer,
        *,
        tolerant: bool = False,
        on_half: Callable[[], None] | None = None,
    ) -> int:
        """Copy runs into layer; returns pages copied.

        tolerant: the target is running, so a run may vanish under us (munmap).
        Skipping it is safe: a VMA that is gone is not in the final map, and
        one re-created in its place is untracked, hence copied whole later.
        """
        if hasattr(layer, "add_read"):  # an image layer: read into its chunk buffers
            return self._copy_into(runs, layer, tolerant, on_half)
        total = sum(n for _, n in runs)
        done = 0
        half = on_half
        for batch in batches(runs):
            try:
                buf = read_runs(self.pid, self.mem_fd, batch, pm_fd=self.pm_fd)
                good = batch
            except OSError:
                if not tolerant:
                    raise
                buf, good = self._read_each(batch)
            layer.add_runs([(a + self.base, n) for a, n in good] if self.base else good, buf)
            done += sum(n for _, n in good)
            if half is not None and done * 2 >= total:
                half()
                half = None
        return done

    def _copy_into(self, runs, layer, tolerant: bool, on_half) -> int:
        """LayerWriter.add_read: pages go from the target straight into the writer's
        chunk buffers (C, without the GIL), in two halves for the on_half hook."""
        base = self.base

        def read(batch, view):
            try:
                read_runs(self.pid, self.mem_fd, batch, view, pm_fd=self.pm_fd)
                good = batch
            except OSError:
                if not tolerant:
                    raise
                good, off = [], 0
                for a, n in batch:
                    try:
                        read_runs(self.pid, self.mem_fd, [(a, n)], view[off:], pm_fd=self.pm_fd)
                    except OSError:
                        continue
                    good.append((a, n))
                    off += n * PAGE_SIZE
            return [(a + base, n) for a, n in good] if base else good

        if on_half is None:
            return layer.add_read(runs, read)
        first, second = _halves(runs)
        done = layer.add_read(first, read)
        on_half()
        return done + layer.add_read(second, read)

    def _read_each(self, batch):
        parts, good = [], []
        for run in batch:
            try:
                parts.append(read_runs(self.pid, self.mem_fd, [run], pm_fd=self.pm_fd))
                good.append(run)
            except OSError:
                continue
        return b"".join(parts), good


def _halves(runs):
    """runs split where half of their pages lie before (a run may be cut in two)."""
    half = sum(n for _, n in runs) // 2
    first, seen = [], 0
    for i, (a, n) in enumerate(runs):
        if seen + n >= half:
            k = half - seen
            if k:
                first.append((a, k))
            rest = [(a + k * PAGE_SIZE, n - k)] if n - k else []
            return first, rest + list(runs[i + 1 :])
        first.append((a, n))
        seen += n
    return first, []
