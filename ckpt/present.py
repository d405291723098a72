"""The set of pages that hold data, kept up to date from what a tracker reports.

Reading the present map of a big process from the kernel walks every page
table entry (≈20 ms for 4 GiB) — too slow for a short freeze. With uffd-wp
tracking every change of presence is reported as WRITTEN: a page that gets
data was written, and a page zapped by MADV_DONTNEED or munmap loses its
protection and reads as written too. So the map can be updated instead:

    present := (present minus written) plus (written and present now)

for tracked private anonymous VMAs, and replaced by a fresh scan for VMAs
copied whole. Not for file-backed VMAs (private file mappings, shmem): zapping
those leaves a uffd-wp marker, unreported; nor for soft-dirty, which does not
report zapped pages either. Those are always re-read.

Runs are (addr, npages) tuples kept sorted and merged; operations are linear
merges over runs, never loops over pages, and only over the spans that lie in the
range being changed (found by bisection): a round calls update() once per VMA, and a
sparse working set has thousands of spans, so rebuilding the whole map each time
made the final freeze of a 40-thread process with a 0.5 GiB working set spend
~200 ms here.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from .units import PAGE_SIZE


def _spans(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a, a + n * PAGE_SIZE) for a, n in runs]


def _runs(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(a, (b - a) // PAGE_SIZE) for a, b in spans if b > a]


def _normalize(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans.sort()
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of a not covered by b (both sorted, non-overlapping)."""
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        cur = s
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


class PresentMap:
    def __init__(self, runs: Iterable[tuple[int, int]] = ()):
        self.spans = _normalize(_spans(runs))

    def _window(self, start: int, end: int, touching: bool) -> tuple[int, int]:
        """Index range of the spans overlapping [start, end) (or touching it)."""
        spans = self.spans
        if touching:
            i = bisect_left(spans, start, key=lambda sp: sp[1])  # first end >= start
            j = bisect_right(spans, end, key=lambda sp: sp[0])  # first start > end
        else:
            i = bisect_right(spans, start, key=lambda sp: sp[1])  # first end > start
            j = bisect_left(spans, end, key=lambda sp: sp[0])  # first start >= end
        return i, j

    def _splice(self, start: int, end: int, remove, add) -> None:
        """Within [start, end): spans minus `remove`, plus `add` (spans inside it)."""
        i, j = self._window(start, end, touching=True)
        self.spans[i:j] = _normalize(subtract(self.spans[i:j], remove) + add)

    def replace(self, start: int, end: int, runs: Iterable[tuple[int, int]]) -> None:
        """[start, end) was scanned: its present pages are exactly `runs`."""
        self._splice(start, end, [(start, end)], _spans(runs))

    def update(
        self, written: Iterable[tuple[int, int]], present_now: Iterable[tuple[int, int]]
    ) -> None:
        """Pages reported written changed presence as `present_now` (⊆ written) says."""
        w = _normalize(_spans(written))
        if w:
            self._splice(w[0][0], w[-1][1], w, _spans(present_now))

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        i, j = self._window(start, end, touching=False)
        return _runs(intersect(self.spans[i:j], [(start, end)]))
