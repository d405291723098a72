"""Copy page runs of the target into an image layer, in batches.

Reads overlap compression: process_vm_readv runs in C without the GIL while
the layer writer's pool compresses earlier batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

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
        self.mem_fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        # pages shared copy-on-write are read so that they stay shared (kernel/memory.py)
        self.pm_fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

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

    def _read_each(self, batch):
        parts, good = [], []
        for run in batch:
            try:
                parts.append(read_runs(self.pid, self.mem_fd, [run], pm_fd=self.pm_fd))
                good.append(run)
            except OSError:
                continue
        return b"".join(parts), good
