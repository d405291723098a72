"""Soft-dirty tracking: pagemap bit 55 + clear_refs "4".

Reading the bits and clearing them are two operations, so the target must be
frozen across both (a write in between would be cleared unseen). Copying can
happen after thaw: data read later is only newer. New VMAs are born
VM_SOFTDIRTY, so they are reported whole without special casing.
"""

from __future__ import annotations

import os

from ..kernel import native, procfs
from ..kernel.memory import SOFT_DIRTY, pagemap_runs
from ..kernel.procfs import Mapping
from ..kernel.remote import Injector
from .base import Tracker


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"
    needs_freeze = True
    returns_present = True

    def __init__(self, pid: int):
        super().__init__(pid)
        self.armed = False
        self.pm_fd = procfs.open_file(pid, "pagemap", os.O_RDONLY)
        self.zero_pfn = native.zero_pfn()
        self.include_file: dict[int, bool] = {}

    def _clear(self) -> None:
        with open(procfs.path(self.pid, "clear_refs"), "w") as f:
            f.write("4")

    def arm(self, inj: Injector) -> None:
        self._clear()
        self.armed = True

    def is_tracked(self, m: Mapping) -> bool:
        return self.armed

    def collect(self, m: Mapping) -> list[tuple[int, int]] | None:
        include_file = m.shared  # shmem pages carry the file bit
        return pagemap_runs(
            self.pm_fd, m.start, m.end, include_file=include_file, zero_pfn=self.zero_pfn,
            require=SOFT_DIRTY,
        )  # fmt: skip

    def after_collect(self) -> None:
        self._clear()

    def disarm(self) -> None:
        # Nothing lives in the target; soft-dirty bits are harmless when unused.
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1
