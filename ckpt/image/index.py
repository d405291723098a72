"""A layer's index: its chunk table and its runs (data and zero), with strict validation.

The index is what makes a pages file usable: chunk offsets/sizes/checksums and,
for every stored run of pages, which chunk and which page of that chunk hold
it. Validation is the reader's wall against hostile files: after from_obj()
returns, every number is in range, so the data path can trust it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import ImageCorrupt
from ..units import PAGE_SIZE
from .runs import ZERO, LayerRecords, Record, first_overlap

MAX_INDEX_BYTES = 256 << 20  # refuse bigger index files before reading them
MAX_CHUNK_ULEN = 64 << 20  # refuse chunks that would decompress to more than this
ADDR_LIMIT = 1 << 64


def max_clen(ulen: int) -> int:
    """Upper bound of a zstd frame holding `ulen` bytes (ZSTD_compressBound plus slack)."""
    return ulen + (ulen >> 7) + 4096


@dataclass
class LayerIndex:
    """Decoded index of one layer.

    chunks: (offset, clen, ulen, crc32) — offset relative to the end of the pages
            file's header; crc32 of the clen compressed bytes.
    runs:   (vaddr, npages, chunk, page_offset_in_chunk) — pages stored in a chunk.
    zero:   (vaddr, npages) — pages captured in this layer whose content is all zero.
    """

    layer: int
    pages_len: int
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)
    zero: list[tuple[int, int]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_obj(self) -> dict[str, Any]:
        """The msgpack schema (docs/FORMAT.md, "Layer index")."""
        return {
            "layer": self.layer,
            "page_size": PAGE_SIZE,
            "pages_len": self.pages_len,
            "chunks": [list(c) for c in self.chunks],
            "runs": [list(r) for r in self.runs],
            "zero": [list(z) for z in self.zero],
            "stats": self.stats,
        }

    @cached_property
    def records(self) -> LayerRecords:
        """Data and zero runs as one sorted list of page records (cached: indexes are immutable)."""
        recs: list[Record] = [
            (v // PAGE_SIZE, v // PAGE_SIZE + n, chunk, off) for v, n, chunk, off in self.runs
        ]
        recs.extend((v // PAGE_SIZE, v // PAGE_SIZE + n, ZERO, 0) for v, n in self.zero)
        recs.sort()
        return LayerRecords.build(recs)

    @property
    def data_pages(self) -> int:
        return sum(r[1] for r in self.runs)

    @property
    def zero_pages(self) -> int:
        return sum(z[1] for z in self.zero)

    @property
    def bytes_stored(self) -> int:
        return sum(c[1] for c in self.chunks)

    @classmethod
    def from_obj(cls, obj: Any, path: str, layer: int) -> LayerIndex:
        """Validate a decoded index; any inconsistency is ImageCorrupt naming the file."""
        try:
            return _validate(obj, path, layer)
        except ImageCorrupt:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ImageCorrupt(f"{path}: malformed index ({type(exc).__name__}: {exc})") from None


def _int(x: Any, what: str, path: str, lo: int = 0, hi: int = ADDR_LIMIT) -> int:
    if type(x) is not int or not lo <= x < hi:
        raise ImageCorrupt(f"{path}: index field {what} = {x!r} out of range")
    return x


def _rows(obj: dict, key: str, width: int, path: str) -> list[tuple[int, ...]]:
    rows = obj.get(key)
    if not isinstance(rows, list):
        raise ImageCorrupt(f"{path}: index has no list {key!r}")
    out = []
    for row in rows:
        if not isinstance(row, list) or len(row) != width:
            raise ImageCorrupt(f"{path}: bad {key!r} entry {row!r}")
        for x in row:
            if type(x) is not int or x < 0 or x >= ADDR_LIMIT:
                raise ImageCorrupt(f"{path}: bad {key!r} entry {row!r}")
        out.append(tuple(row))
    return out


def _validate(obj: Any, path: str, layer: int) -> LayerIndex:
    if not isinstance(obj, dict):
        raise ImageCorrupt(f"{path}: index is not a map")
    if _int(obj.get("layer"), "layer", path) != layer:
        raise ImageCorrupt(f"{path}: index says layer {obj.get('layer')}, expected {layer}")
    if obj.get("page_size") != PAGE_SIZE:
        raise ImageCorrupt(f"{path}: page size {obj.get('page_size')!r} is not {PAGE_SIZE}")
    pages_len = _int(obj.get("pages_len"), "pages_len", path)
    chunks = _rows(obj, "chunks", 4, path)
    runs = _rows(obj, "runs", 4, path)
    zero = _rows(obj, "zero", 2, path)
    stats = obj.get("stats", {})
    if not isinstance(stats, dict):
        raise ImageCorrupt(f"{path}: index stats is not a map")

    for i, (off, clen, ulen, crc) in enumerate(chunks):
        if not 0 < ulen <= MAX_CHUNK_ULEN or ulen % PAGE_SIZE:
            raise ImageCorrupt(f"{path}: layer {layer} chunk {i}: bad size {ulen}")
        if not 0 < clen <= max_clen(ulen):
            raise ImageCorrupt(f"{path}: layer {layer} chunk {i}: bad stored size {clen}")
        if off + clen > pages_len:
            raise ImageCorrupt(f"{path}: layer {layer} chunk {i}: bad offset {off}")
        if crc >= 1 << 32:
            raise ImageCorrupt(f"{path}: layer {layer} chunk {i}: bad checksum field")
    end = 0
    for off, clen, i in sorted((c[0], c[1], i) for i, c in enumerate(chunks)):
        if off < end:  # chunks may be stored in any order, but never overlap
            raise ImageCorrupt(f"{path}: layer {layer} chunk {i}: overlaps another chunk")
        end = off + clen
    for vaddr, npages, chunk, poff in runs:
        if vaddr % PAGE_SIZE or npages == 0 or vaddr + npages * PAGE_SIZE > ADDR_LIMIT:
            raise ImageCorrupt(f"{path}: bad run (0x{vaddr:x}, {npages})")
        if chunk >= len(chunks) or poff + npages > chunks[chunk][2] // PAGE_SIZE:
            raise ImageCorrupt(
                f"{path}: run (0x{vaddr:x}, {npages}) points outside layer {layer} chunk {chunk}"
            )
    for vaddr, npages in zero:
        if vaddr % PAGE_SIZE or npages == 0 or vaddr + npages * PAGE_SIZE > ADDR_LIMIT:
            raise ImageCorrupt(f"{path}: bad zero run (0x{vaddr:x}, {npages})")
    index = LayerIndex(layer, pages_len, chunks, runs, zero, stats)
    bad = first_overlap(index.records.records)
    if bad is not None:
        raise ImageCorrupt(f"{path}: runs overlap at 0x{bad[0] * PAGE_SIZE:x}")
    return index
