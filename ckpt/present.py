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
merges over runs, never loops over pages.
"""

from __future__ import annotations

from collections.abc import Iterable

from .kernel.native import PAGE_SIZE


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

    def replace(self, start: int, end: int, runs: Iterable[tuple[int, int]]) -> None:
        """[start, end) was scanned: its present pages are exactly `runs`."""
        kept = subtract(self.spans, [(start, end)])
        self.spans = _normalize(kept + _spans(runs))

    def update(
        self, written: Iterable[tuple[int, int]], present_now: Iterable[tuple[int, int]]
    ) -> None:
        """Pages reported written changed presence as `present_now` (⊆ written) says."""
        w = _normalize(_spans(written))
        self.spans = _normalize(subtract(self.spans, w) + _spans(present_now))

    def within(self, start: int, end: int) -> list[tuple[int, int]]:
        return _runs(intersect(self.spans, [(start, end)]))
