"""Writing chains: an ImageWriter that can link single layers, and the layer merge.

ImageWriter(base=OLD) links ALL of OLD's layers. Compaction needs a prefix of
one image's layers followed by layers built here, so ChainWriter adds
link_layer(). (It touches ImageWriter's manifest list; if ImageWriter grows a
public way to link a single layer, this subclass should use it.)

merge_layer() builds one layer that is the union of consecutive source layers:
per page, the newest record among them (data or zero), restricted to the
pages some snapshot using the new layer can still ask for (its `live` set).
It resolves with the image package's own interval code, reads each needed
chunk once (checked and decompressed in a small pool, bounded look-ahead), and
hands the writer one buffer per chunk.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..image import ImageWriter, LayerReader, LayerStats, LayerWriter
from ..image.layer_writer import LayerEntry, index_name, pages_name
from ..image.runs import LayerRecords, merge, normalize, resolve
from ..model import present_keys
from ..units import PAGE_SIZE

T = TypeVar("T")
R = TypeVar("R")

Intervals = list[tuple[int, int]]  # sorted, disjoint (first_page, end_page)


class ChainWriter(ImageWriter):
    """An ImageWriter for the store: links single layers, remembers the layers it wrote.

    `parent` is the SnapshotInfo an incremental snapshot continues from (None: full).
    """

    def __init__(self, path: str, level: int | None = None, *, base=None, parent=None):
        super().__init__(path, level, base=base)
        self.parent = parent
        self.written: list[LayerWriter] = []

    def begin_layer(self) -> LayerWriter:
        lw = super().begin_layer()
        self.written.append(lw)
        return lw

    def link_layer(self, src_dir: str, entry: LayerEntry) -> None:
        """Add an existing layer file pair (same position) by hard link."""
        self._check_usable()
        if entry.layer != len(self._entries):
            raise ValueError(
                f"layer {entry.layer} cannot be linked at position {len(self._entries)}"
            )
        if self._open is not None and self._open.stats is None:
            raise RuntimeError(f"layer {self._open.layer} is still open")
        for name in (pages_name(entry.layer), index_name(entry.layer)):
            src, dst = os.path.join(src_dir, name), os.path.join(self.tmp_path, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        self._entries.append(entry)

    @property
    def entries(self) -> list[LayerEntry]:
        return list(self._entries)


def present_runs(state: dict[str, Any]) -> list[tuple[int, int]]:
    """Every page key a snapshot's state needs, as (key, npages): the root's, each tree
    member's (in its key space) and the shared memory objects' (model.present_keys)."""
    return present_keys(state)


def present_pages(state: dict[str, Any]) -> Intervals:
    return normalize(present_runs(state))


def union(sets: Iterable[Intervals]) -> Intervals:
    return merge([iv for s in sets for iv in s])


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Intersection of two sorted disjoint interval lists."""
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int = 2, window: int = 4
) -> Iterator[tuple[T, R | BaseException]]:
    """(item, fn(item)) in order, computed ahead in a pool; exceptions are yielded, not raised.

    At most `window` results are pending, so memory stays bounded.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-store")
    it = iter(items)
    pending: deque = deque()

    def submit() -> bool:
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            return True
        return False

    try:
        while len(pending) < window and submit():
            pass
        while pending:
            item, fut = pending.popleft()
            try:
                result: Any = fut.result()
            except Exception as exc:  # handed to the caller, who decides
                result = exc
            submit()
            yield item, result
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def merge_layer(w: ChainWriter, sources: list[LayerReader], live: Intervals | None) -> LayerStats:
    """Write the next layer of `w`: union of `sources` (oldest first), newest record wins."""
    lw = w.begin_layer()
    records: list[LayerRecords] = [lr.index.records for lr in sources]
    mentioned = merge([(r[0], r[1]) for lrec in records for r in lrec.records])
    wanted = mentioned if live is None else intersect(mentioned, live)
    res = resolve(wanted, records)
    for s, e in res.zero:
        lw.add_zero(s * PAGE_SIZE, e - s)

    def load(key: tuple[int, int]) -> bytes:
        layer, chunk = key
        return sources[layer].read_chunk(chunk)

    for key, data in bounded_map(load, sorted(res.data)):
        if isinstance(data, BaseException):
            raise data
        mv = memoryview(data)
        pieces = res.data[key]
        runs = [(page * PAGE_SIZE, n) for page, n, _ in pieces]
        if len(pieces) == 1:
            _, n, off = pieces[0]
            lw.add_runs(runs, mv[off * PAGE_SIZE : (off + n) * PAGE_SIZE])
        else:
            buf = b"".join(mv[off * PAGE_SIZE : (off + n) * PAGE_SIZE] for _, n, off in pieces)
            lw.add_runs(runs, buf)
    return lw.close()
