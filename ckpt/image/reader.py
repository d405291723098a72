"""ImageReader: opens and validates an image, plans a restore, streams page data.

Opening checks every header, version, checksum and index number up front, so a
restore fails before it touches a process if the image is damaged anywhere
except inside chunk data (chunks are checked as they are read, or by
verify(deep=True)). The data path works per chunk: a bounded window of chunks
is read and decompressed in a thread pool while the caller writes the previous
ones into the new process.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ImageCorrupt, ImageNotFound
from ..units import PAGE_SIZE
from . import trust
from .blob import read_blob
from .header import KIND_STATE, Header
from .layer_reader import LayerReader
from .layer_writer import LayerEntry
from .runs import normalize, resolve
from .writer import STATE_NAME

MAX_STATE_BYTES = 256 << 20
MAX_LAYERS = 1 << 16

_END = object()
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ChunkRead:
    """Pieces to take from one chunk: (vaddr, npages, page_offset_in_chunk), vaddr-sorted."""

    layer: int
    chunk: int
    pieces: list[tuple[int, int, int]]


@dataclass
class Plan:
    """Where every present page of a restore comes from.

    reads:   chunks to read, in (layer, chunk) order, each with the pieces it supplies
    zero:    (vaddr, npages) runs whose newest record is "all zero": write zeros there
             (for file-backed mappings, the file's content would otherwise show through)
    missing: (vaddr, npages) runs present in the final map that no layer holds; only
             non-empty with plan(..., allow_missing=True)
    """

    reads: list[ChunkRead] = field(default_factory=list)
    zero: list[tuple[int, int]] = field(default_factory=list)
    missing: list[tuple[int, int]] = field(default_factory=list)

    @property
    def data_pages(self) -> int:
        return sum(p[1] for cr in self.reads for p in cr.pieces)

    @property
    def zero_pages(self) -> int:
        return sum(n for _, n in self.zero)


def _bounded_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int, window: int
) -> Iterator[tuple[T, R]]:
    """Like pool.map, in order, but with at most `window` results pending (memory bound).

    Closing the generator early cancels what has not started and waits for the rest.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-unzstd")
    it = iter(items)
    pending: deque = deque()
    try:
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.popleft()
            result = fut.result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, result
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _entry(obj: Any, i: int, path: str) -> LayerEntry:
    """Validate one line of the state file's layer manifest."""
    if not isinstance(obj, dict):
        raise ImageCorrupt(f"{path}: layer manifest entry {i} is not a map")
    ident = obj.get("id")
    if obj.get("layer") != i or not isinstance(ident, bytes) or len(ident) != 16:
        raise ImageCorrupt(f"{path}: layer manifest entry {i} is malformed")
    nums = [obj.get(k) for k in ("index_len", "index_crc", "pages_len")]
    if any(type(n) is not int or n < 0 for n in nums):
        raise ImageCorrupt(f"{path}: layer manifest entry {i} is malformed")
    return LayerEntry(i, ident, *nums)


class ImageReader:
    """A complete, validated image. Use as a context manager (it holds file descriptors)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            if os.path.exists(self.path):
                raise ImageNotFound(f"{self.path}: not an image directory")
            raise ImageNotFound(f"{self.path}: no such image")
        trust.check_owned(os.stat(self.path), self.path, "the image directory")
        state_path = os.path.join(self.path, STATE_NAME)
        if not os.path.exists(state_path):
            raise ImageNotFound(
                f"{self.path}: incomplete image (no {STATE_NAME}): the dump that wrote it "
                "did not finish"
            )
        header, env = read_blob(state_path, KIND_STATE, max_len=MAX_STATE_BYTES)
        self.header: Header = header
        self._envelope = self._check_envelope(env, state_path)
        self.state: dict = self._envelope["state"]
        self.meta: dict = self._envelope.get("meta", {})
        self.layers: list[LayerReader] = []
        try:
            for i, obj in enumerate(self._envelope["layers"]):
                self.layers.append(LayerReader(self.path, _entry(obj, i, state_path)))
        except BaseException:
            self.close()
            raise
        self._records = [lr.index.records for lr in self.layers]

    @staticmethod
    def _check_envelope(env: Any, path: str) -> dict:
        if not isinstance(env, dict):
            raise ImageCorrupt(f"{path}: state payload is not a map")
        if env.get("page_size") != PAGE_SIZE:
            raise ImageCorrupt(f"{path}: page size {env.get('page_size')!r} is not {PAGE_SIZE}")
        if not isinstance(env.get("state"), dict) or not isinstance(env.get("meta", {}), dict):
            raise ImageCorrupt(f"{path}: state or meta is missing or not a map")
        layers = env.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise ImageCorrupt(f"{path}: layer manifest is missing or too long")
        return env

    @property
    def version(self) -> tuple[int, int]:
        """(major, minor) of the state file, i.e. of the writer that committed the image."""
        return self.header.major, self.header.minor

    @property
    def image_id(self) -> bytes:
        return self.header.ident

    # -- restore side ----------------------------------------------------------

    def plan(self, present, *, allow_missing: bool = False) -> Plan:
        """Resolve the final present map against the layer chain: newest layer wins.

        `present`: (vaddr, npages) pairs, a {vaddr: npages} map, or a map of lists of
        pairs (per-VMA). Pages not in it are not restored from the image at all.
        Raises ImageCorrupt if a present page is in no layer (unless allow_missing).
        """
        res = resolve(normalize(present), self._records)
        if res.missing and not allow_missing:
            s, e = res.missing[0]
            total = sum(e - s for s, e in res.missing)
            raise ImageCorrupt(
                f"{self.path}: {total} present page(s) are stored in no layer "
                f"(first at 0x{s * PAGE_SIZE:x}, {e - s} page(s))"
            )
        reads = [
            ChunkRead(
                layer, chunk, [(p * PAGE_SIZE, n, off) for p, n, off in res.data[layer, chunk]]
            )
            for layer, chunk in sorted(res.data)
        ]
        return Plan(
            reads,
            [(s * PAGE_SIZE, e - s) for s, e in res.zero],
            [(s * PAGE_SIZE, e - s) for s, e in res.missing],
        )

    def iter_data(self, plan: Plan, threads: int = 2) -> Iterator[tuple[int, memoryview]]:
        """Yield (vaddr, data) for every data piece of the plan, chunk by chunk.

        Chunks are read, checksummed and decompressed in `threads` threads, at most
        2 x threads ahead of the consumer. A damaged chunk raises ImageCorrupt naming
        its file, layer and chunk.
        """

        def load(cr: ChunkRead) -> bytes:
            return self.layers[cr.layer].read_chunk(cr.chunk)

        for cr, data in _bounded_map(load, plan.reads, threads, 2 * max(1, threads)):
            mv = memoryview(data)
            for vaddr, n, off in cr.pieces:
                yield vaddr, mv[off * PAGE_SIZE : (off + n) * PAGE_SIZE]

    def write_data(
        self,
        plan: Plan,
        write: Callable[[list[tuple[int, int, int]], bytes], None],
        threads: int = 2,
    ) -> None:
        """Hand every chunk of the plan to write(pieces, data) in the pool thread that
        read, checked and decompressed it, so that writing into the process overlaps
        the other chunks' work (write must be thread-safe; it should release the GIL).
        pieces: (vaddr, npages, page_offset_in_data). At most 2 x threads chunks are in
        memory; the first error (ImageCorrupt naming the chunk, or write's) is raised.
        """

        def load_and_write(cr: ChunkRead) -> None:
            write(cr.pieces, self.layers[cr.layer].read_chunk(cr.chunk))

        for _ in _bounded_map(load_and_write, plan.reads, threads, 2 * max(1, threads)):
            pass

    # -- inspection ------------------------------------------------------------

    def verify(self, deep: bool = False, threads: int = 2) -> dict:
        """Check the image. Opening already checked headers, indexes and file lengths;
        deep=True also reads, checksums and decompresses every chunk of every layer."""
        chunks = [(lr, c) for lr in self.layers for c in range(len(lr.index.chunks))]
        checked = 0
        if deep:
            for _ in _bounded_map(lambda lc: lc[0].read_chunk(lc[1]), chunks, threads, 2 * threads):
                checked += 1
        return {
            "path": self.path,
            "format": "{}.{}".format(*self.version),
            "layers": len(self.layers),
            "chunks": len(chunks),
            "chunks_checked": checked,
            "deep": deep,
            "ok": True,
        }

    def summary(self) -> dict:
        """Sizes per layer and in total, for `ckpt show`."""
        layers = [lr.summary() for lr in self.layers]
        keys = ("chunks", "data_pages", "zero_pages", "bytes_raw", "bytes_stored", "index_bytes")
        return {
            "path": self.path,
            "format": "{}.{}".format(*self.version),
            "image_id": self.image_id.hex(),
            "writer": self._envelope.get("writer"),
            "page_size": PAGE_SIZE,
            "state_bytes": self.header.payload_len,
            "layers": layers,
            "total": {k: sum(lay[k] for lay in layers) for k in keys},
        }

    def close(self) -> None:
        for lr in self.layers:
            lr.close()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
