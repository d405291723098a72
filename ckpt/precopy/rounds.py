"""The pre-copy loop: rounds while the target runs, then one short frozen round.

    round 0   arm tracking (brief freeze for the injection), copy every page → layer 0
    round k   written = collect-and-rearm per VMA; copy them (target running) → layer k
              stop when the estimated final round fits the downtime target, the
              written set stops shrinking, or the round/time budget is spent
    final     freeze; collect; copy; capture registers and the rest → last layer

Re-arm always happens BEFORE the copy, so a page written during the copy is
reported again next round: a torn copy is always superseded (DESIGN.md).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import faults
from ..capture.pages import PageCopier
from ..capture.target import Target
from ..errors import DumpError, NoSuchProcess
from ..kernel import native, procfs
from ..model import slot_base
from ..present import PresentMap
from ..track.base import Tracker
from .collect import collect
from .policy import Policy, PrecopyStats, RoundStats, stop_reason

PAGE = native.PAGE_SIZE
HOOK_TIMEOUT = 120.0  # the test round hook's answer (tests only)


@dataclass
class Member:
    """A descendant pre-copied along with the root (dump --iterative of a tree).

    Its pages go to the same layers, keyed slot_base(space) | vaddr; `space` is
    fixed when it is first seen (the final freeze may order the tree differently).
    """

    target: Target
    tracker: Tracker
    space: int
    pm_fd: int = -1
    copier: PageCopier | None = None
    present: PresentMap = field(default_factory=PresentMap)
    last_maps: list | None = None
    whole_next: bool = True
    gone: bool = False

    def open(self) -> None:
        self.pm_fd = procfs.open_file(self.target.pid, "pagemap", os.O_RDONLY)
        self.copier = PageCopier(self.target.pid, slot_base(self.space))

    def close(self) -> None:
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1
        if self.copier is not None:
            self.copier.close()


class Precopy:
    """Runs the rounds before the final freeze, writing one layer per round."""

    def __init__(
        self,
        target: Target,
        tracker: Tracker,
        writer,
        policy: Policy,
        progress: Callable[[RoundStats], None] | None = None,
        *,
        shm=None,
    ):
        self.target = target
        self.tracker = tracker
        self.writer = writer
        self.policy = policy
        self.progress = progress
        self.stats = PrecopyStats(tracker=tracker.name)
        self.pm_fd = procfs.open_file(target.pid, "pagemap", os.O_RDONLY)
        self.zero_pfn = native.zero_pfn()
        self.copier = PageCopier(target.pid)
        self.bytes_stored = 0
        #: copy everything in the next round regardless of tracking (full snapshot)
        self.whole_next = False
        #: smaps of the last round (VmFlags reused by the final freeze when unchanged)
        self.last_maps: list | None = None
        #: pages holding data, maintained round by round (exact with uffd-wp)
        self.present = PresentMap()
        #: descendants pre-copied with the root (armed by the caller)
        self.members: list[Member] = []
        #: the tree's shared memory objects (capture/shm.SharedMemory), copied by
        #: content each round: writes through any process's mapping count
        self.shm = shm

    def add_member(self, m: Member) -> None:
        try:
            m.open()
        except (FileNotFoundError, ProcessLookupError):  # exited and reaped since armed
            m.close()
            m.gone = True
        self.members.append(m)

    def member(self, pid: int, starttime: int) -> Member | None:
        """The pre-copied member that is this process, if it was followed all along."""
        return next(
            (
                m
                for m in self.members
                if not m.gone and m.target.pid == pid and m.target.starttime == starttime
            ),
            None,
        )

    def close(self) -> None:
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1
        self.copier.close()
        for m in self.members:
            m.close()

    def run_rounds(self, t_start: float) -> None:
        k = 0
        while True:
            self.one_round(k)
            if k == 1:
                faults.point("round")
            _round_hook(k, self.target.pid)
            reason = self.should_stop(k, t_start)
            if reason:
                self.stats.stop_reason = reason
                return
            k += 1

    def one_round(self, k: int) -> RoundStats:
        t0 = time.monotonic()
        tracee = self.target.freeze() if self.tracker.needs_freeze else None
        try:
            maps = procfs.smaps(self.target.pid)
            runs, written = collect(
                self.target.pid, self.tracker, self.pm_fd, self.zero_pfn, whole=self.whole_next,
                mappings=maps, present=self.present,
            )  # fmt: skip
            self.last_maps = maps
            self.whole_next = False
        finally:
            if tracee is not None:
                tracee.detach()
        self.target.check()
        if self.shm is not None:
            self.shm.discover(self.target.pid, maps)
        member_runs = [(m, *self._collect_member(m)) for m in self.members if not m.gone]
        written += sum(w for _, _, w in member_runs)
        layer = self.writer.begin_layer()
        t_copy = time.monotonic()
        pages = self.copier.copy(runs, layer, tolerant=True)
        for m, mruns, _ in member_runs:
            pages += m.copier.copy(mruns, layer, tolerant=True)
        if self.shm is not None:
            shared = self.shm.copy(layer)
            pages += shared
            written += shared
        self.bytes_stored += getattr(layer.close(), "bytes_stored", 0)
        copy_s = time.monotonic() - t_copy
        if pages and copy_s > 0:
            rate = pages * PAGE / copy_s
            self.stats.copy_rate = (
                rate if not self.stats.copy_rate else 0.5 * (rate + self.stats.copy_rate)
            )
        secs = time.monotonic() - t0
        rs = RoundStats(
            round=k, pages_written=written, pages_copied=pages, bytes_copied=pages * PAGE,
            seconds=secs, dirty_rate_pages_s=(written / secs if k and secs > 0 else 0.0),
            est_freeze_ms=self.estimate_freeze_ms(written if k else pages),
        )  # fmt: skip
        self.stats.rounds.append(rs)
        if self.progress:
            self.progress(rs)
        return rs

    def _collect_member(self, m: Member) -> tuple[list[tuple[int, int]], int]:
        """A member's round; one that exited (or was replaced) just drops out."""
        if not m.target.alive():
            m.gone = True
            return [], 0
        tracee = None
        try:
            tracee = m.target.freeze() if m.tracker.needs_freeze else None
            maps = procfs.smaps(m.target.pid)
            runs, written = collect(
                m.target.pid, m.tracker, m.pm_fd, self.zero_pfn, whole=m.whole_next,
                mappings=maps, present=m.present,
            )  # fmt: skip
        except (DumpError, NoSuchProcess):
            m.gone = True
            return [], 0
        finally:
            if tracee is not None and tracee.attached:
                tracee.detach()
        m.last_maps = maps
        m.whole_next = False
        if self.shm is not None:
            self.shm.discover(m.target.pid, maps)
        return runs, written

    def estimate_freeze_ms(self, pages_next: int) -> float:
        rate = self.stats.copy_rate or 1e9
        return self.stats.base_freeze_ms + pages_next * PAGE / rate * 1000

    def should_stop(self, k: int, t_start: float) -> str:
        return stop_reason(self.stats.rounds, self.policy, k, time.monotonic() - t_start)


def _round_hook(k: int, pid: int) -> None:
    """Test hook: tell the test at CKPT_TEST_ROUND_SOCKET (a unix socket) that round k
    of pid is done, and wait for its one-byte answer; the test makes the workload
    mutate between rounds meanwhile (tests/precopy_helpers.py Hook). Nothing is run."""
    path = os.environ.get("CKPT_TEST_ROUND_SOCKET")
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(HOOK_TIMEOUT)
            s.connect(path)
            s.sendall(f"{k} {pid}\n".encode())
            s.recv(1)
    except OSError:
        return  # the test sees from its own log which rounds it was told about
