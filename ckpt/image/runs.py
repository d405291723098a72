"""Interval arithmetic on page runs: normalising present maps, newest-layer-wins resolution.

Everything works on runs (first_page, end_page), never on single pages, so a
1 GiB image with a handful of runs resolves in microseconds. The loops here are
per run, which is fine in Python. tests/test_image.py checks these functions
against a per-page dict reference with hypothesis.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..units import PAGE_SIZE

ZERO = -1  # the `chunk` of a record that says "these pages are all zero"

# A record of one layer: (first_page, end_page, chunk, page_offset_in_chunk);
# chunk == ZERO for zero runs. Records of a layer are sorted and disjoint.
Record = tuple[int, int, int, int]


def _pairs(present) -> Iterable[tuple[int, int]]:
    """Yield (vaddr, npages) from any accepted present-map shape (see normalize)."""
    if isinstance(present, Mapping):
        for key, value in present.items():
            if isinstance(value, int):
                yield key, value
            else:
                yield from _pairs(value)
    else:
        for item in present:
            vaddr, npages = item
            yield vaddr, npages


def normalize(present) -> list[tuple[int, int]]:
    """Turn a present map into sorted, merged, disjoint (first_page, end_page) intervals.

    Accepted shapes: an iterable of (vaddr, npages) pairs; a mapping vaddr → npages;
    or a mapping whose values are iterables of pairs (e.g. {vma_start: [[vaddr, n], …]}),
    which is how a per-VMA present map in the process state looks after msgpack.
    Overlapping or adjacent runs merge. Misaligned input is a programming error.
    """
    out = []
    for vaddr, npages in _pairs(present):
        if not isinstance(vaddr, int) or not isinstance(npages, int):
            raise TypeError(f"present run ({vaddr!r}, {npages!r}) is not (int, int)")
        if vaddr % PAGE_SIZE or vaddr < 0 or npages < 0:
            raise ValueError(f"bad present run (0x{vaddr:x}, {npages})")
        if npages:
            first = vaddr // PAGE_SIZE
            out.append((first, first + npages))
    return merge(out)


def merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping/adjacent (start, end) intervals."""
    intervals.sort()
    merged: list[tuple[int, int]] = []
    for s, e in intervals:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def first_overlap(records: list[Record]) -> Record | None:
    """The first record that overlaps its predecessor in a start-sorted list, or None."""
    end = -1
    for rec in records:
        if rec[0] < end:
            return rec
        end = rec[1]
    return None


@dataclass
class LayerRecords:
    """One layer's records, sorted, with their end pages for bisecting."""

    records: list[Record]
    ends: list[int]

    @classmethod
    def build(cls, records: list[Record]) -> LayerRecords:
        return cls(records, [r[1] for r in records])


def take(
    remaining: list[tuple[int, int]], layer: LayerRecords
) -> tuple[list[Record], list[tuple[int, int]]]:
    """Split the wanted intervals against one layer's records.

    Returns (hits, rest): hits are the parts of `remaining` this layer has a record
    for, as records clipped to the wanted part (page offsets shifted to match);
    rest is what this layer does not cover, still sorted and disjoint.
    """
    recs, ends = layer.records, layer.ends
    n = len(recs)
    hits: list[Record] = []
    rest: list[tuple[int, int]] = []
    j = 0
    for s, e in remaining:
        j = bisect_right(ends, s, j)  # skip records ending at or before s
        cur = s
        while j < n and recs[j][0] < e:
            rs, re_, chunk, off = recs[j]
            a = rs if rs > cur else cur
            b = re_ if re_ < e else e
            if a > cur:
                rest.append((cur, a))
            hits.append((a, b, chunk, off + (a - rs)))
            cur = b
            if re_ > e:
                break  # this record continues into the next wanted interval
            j += 1
        if cur < e:
            rest.append((cur, e))
    return hits, rest


@dataclass
class Resolution:
    """Result of newest-wins resolution, in pages.

    data: (layer, chunk) → [(first_page, npages, page_offset_in_chunk)]
    zero: [(first_page, end_page)] whose newest record is a zero run
    missing: [(first_page, end_page)] that no layer has
    """

    data: dict[tuple[int, int], list[tuple[int, int, int]]]
    zero: list[tuple[int, int]]
    missing: list[tuple[int, int]]


def resolve(wanted: list[tuple[int, int]], layers: list[LayerRecords]) -> Resolution:
    """For every wanted page, find the newest layer with a record of it (data or zero)."""
    data: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    zero: list[tuple[int, int]] = []
    remaining = wanted
    for number in range(len(layers) - 1, -1, -1):
        if not remaining:
            break
        hits, remaining = take(remaining, layers[number])
        for a, b, chunk, off in hits:
            if chunk == ZERO:
                zero.append((a, b))
            else:
                data.setdefault((number, chunk), []).append((a, b - a, off))
    for pieces in data.values():
        _coalesce(pieces)
    return Resolution(data, merge(zero), list(remaining))


def _coalesce(pieces: list[tuple[int, int, int]]) -> None:
    """Merge pieces contiguous both in memory and in the chunk (in place)."""
    pieces.sort()
    out: list[tuple[int, int, int]] = []
    for page, n, off in pieces:
        if out:
            lp, ln, lo = out[-1]
            if lp + ln == page and lo + ln == off:
                out[-1] = (lp, ln + n, lo)
                continue
        out.append((page, n, off))
    pieces[:] = out
