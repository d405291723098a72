"""LayerWriter: packs page runs into chunks, compresses them in a pool, writes one layer.

Data path, per add_run():
  1. C finds the non-zero page runs of the buffer (bufops.nonzero_runs);
     all-zero runs become "zero" records and are never stored.
  2. Non-zero runs are appended to the current chunk (slices, no copy for bytes
     input); a run that does not fit is split at the chunk boundary, so every
     index run lies inside one chunk.
  3. A full chunk is submitted to the pool; at most `max_inflight` chunks are
     pending, and the caller blocks on the oldest one before submitting more
     (memory stays at ~2 x max_inflight x chunk_bytes).
  4. Finished chunks are appended to pages.bin in chunk order (deterministic
     files, and the index's offsets are known as soon as a chunk lands).

add_read() is the dump's path: the caller's reader fills the writer's own chunk
buffers (recycled, so never page-faulted again), C drops the zero pages in place,
and the pool compresses, checksums and writes each full buffer while the next one
is read; nothing is copied in Python and nothing waits on the GIL.

A durable image's chunks past its first 8 MiB are written with O_DIRECT (each at a
4 KiB-aligned offset, zero-padded to 4 KiB: readers find chunks by offset, so the
gaps cost them nothing): the bytes go from the writer's buffer to the disk, without
first filling the page cache with gigabytes that commit()'s fsync must then write
back anyway, and that evict everything else. Small layers stay plain (compact, and
cached for a restore right after). Where O_DIRECT is refused (tmpfs), plain writes.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from dataclasses import asdict, dataclass

from ..units import PAGE_SIZE
from . import fsio
from .blob import BlobInfo, write_blob
from .bufops import gather, nonzero_runs, pack_nonzero
from .codec import Compressor
from .header import HEADER_LEN, KIND_INDEX, KIND_PAGES, pack_header
from .index import LayerIndex
from .runs import first_overlap

READ_PAGES = 2048  # at most 8 MiB per read callback
DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to this
DIRECT_AFTER = 8 << 20  # payload bytes written plainly before chunks go O_DIRECT
_staging = threading.local()  # a pool thread's aligned buffer for O_DIRECT writes


def _open_direct(path: str) -> int:
    """A second, O_DIRECT fd on the pages file, or -1 where the file system refuses it."""
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def _write_direct(fd: int, pieces: list, length: int, padded: int, offset: int) -> None:
    """pieces (length bytes) zero-padded to `padded`, at aligned `offset`, through the
    calling thread's page-aligned staging buffer (one memcpy, in C)."""
    buf = getattr(_staging, "buf", None)
    if buf is None or len(buf) < padded:
        if buf is not None:
            buf.close()
        buf = _staging.buf = mmap.mmap(-1, max(padded, 8 << 20))
    gather(buf, pieces, padded)
    mv = memoryview(buf)
    try:
        done = 0
        while done < padded:
            done += os.pwrite(fd, mv[done:padded], offset + done)
    finally:
        mv.release()


class BufferPool:
    """Chunk buffers that outlive a layer (an image writer's rounds share them), so the
    pages they hold are faulted in once. A writer takes one per chunk; the pool thread
    that wrote the chunk gives it back. How many exist is bounded by the writers'
    in-flight window."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list[bytearray] = []  # append/pop are atomic: no lock

    def get(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.nbytes)

    def put(self, buf: bytearray) -> None:
        self._free.append(buf)


def pwritev_all(fd: int, pieces: list, offset: int) -> None:
    """Write pieces back to back at offset (os.pwritev, IOV_MAX pieces a call)."""
    views = [memoryview(p).cast("B") for p in pieces]
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i : i + 1024], offset)
        offset += n
        while i < len(views) and n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        if n:
            views[i] = views[i][n:]


def pages_name(layer: int) -> str:
    return f"layer-{layer:04d}.pages.bin"


def index_name(layer: int) -> str:
    return f"layer-{layer:04d}.index.bin"


@dataclass(frozen=True)
class LayerStats:
    """What one layer cost. bytes_raw counts stored (non-zero) pages before compression."""

    layer: int
    pages_in: int  # pages handed to add_run/add_zero
    zero_pages: int  # of those, recorded as zero runs (not stored)
    data_pages: int  # of those, stored in chunks
    bytes_raw: int  # data_pages * PAGE_SIZE
    bytes_stored: int  # compressed bytes in pages.bin (without its header)
    chunks: int
    seconds: float  # begin_layer() → close()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerEntry:
    """The state file's manifest line for a layer: how to find and trust its files."""

    layer: int
    ident: bytes
    index_len: int
    index_crc: int
    pages_len: int

    def to_obj(self) -> dict:
        return {
            "layer": self.layer,
            "id": self.ident,
            "index_len": self.index_len,
            "index_crc": self.index_crc,
            "pages_len": self.pages_len,
        }


class LayerWriter:
    """Writes layer `layer` of an image; get one from ImageWriter.begin_layer().

    Buffers: a `bytes` object (or a memoryview of one) is kept by reference until
    its chunk is compressed, without a copy; any other buffer (bytearray, mmap,
    memoryview of those) is copied before add_run returns, so the caller may reuse it.
    """

    def __init__(
        self,
        layer: int,
        dirpath: str,
        pool: Executor,
        compressor: Compressor,
        chunk_bytes: int,
        max_inflight: int,
        on_close: Callable[[LayerEntry], None],
        image: str = "",
        buffers: BufferPool | None = None,
        direct: bool = False,
    ):
        self.layer = layer
        self._image = image or dirpath  # named by NoSpace errors
        self._dir = dirpath
        self._pool = pool
        self._compressor = compressor
        self._chunk_bytes = chunk_bytes
        self._max_inflight = max_inflight
        self._on_close = on_close
        self._ident = os.urandom(16)
        self._t0 = time.perf_counter()
        self._pages_path = os.path.join(dirpath, pages_name(layer))
        with self._space_checked(pages_name(layer)):
            self._fd: int | None = fsio.create_file(self._pages_path)
            # Placeholder header; close() rewrites it with the final payload length.
            fsio.write_all(self._fd, pack_header(KIND_PAGES, self._ident, layer, 0, 0))
        # chunks past DIRECT_AFTER through O_DIRECT (a durable image)
        self._dfd = _open_direct(self._pages_path) if direct else -1
        self._pos = 0  # payload bytes reserved so far (pool threads advance it)
        self._pos_lock = threading.Lock()
        self._pending: list = []  # segments of the chunk being filled
        self._pending_len = 0
        self._borrowed = False  # some pending segment is a view of a caller's mutable buffer
        self._buffers = buffers if buffers is not None else BufferPool(chunk_bytes)
        self._buf: bytearray | None = None  # add_read's chunk being filled
        self._fill = 0  # its bytes in use
        self._next_chunk = 0
        self._inflight: deque[Future] = deque()  # in chunk order
        self._chunks: list[tuple[int, int, int, int]] = []
        self._runs: list[list[int]] = []
        self._zero: list[list[int]] = []
        self._pages_in = 0
        self._closed = False
        self.stats: LayerStats | None = None

    # -- producing -------------------------------------------------------------

    def add_run(self, vaddr: int, buf) -> None:
        """Add the pages of one contiguous run starting at vaddr (len(buf) % PAGE_SIZE == 0)."""
        self.add_runs([(vaddr, len(memoryview(buf).cast("B")) // PAGE_SIZE)], buf)

    def add_runs(self, runs, buf) -> None:
        """Add several runs whose pages lie back to back in buf.

        runs: (vaddr, npages) pairs, in buffer order, exactly covering buf; this is
        what the dump's batched reads fill, so one call per batch suffices.
        Zero-page detection runs once (in C) over the whole buffer.
        """
        self._check_open()
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        total = 0
        for vaddr, npages in runs:
            if vaddr % PAGE_SIZE or vaddr < 0 or npages < 0:
                raise ValueError(f"run (0x{vaddr:x}, {npages}): not page aligned")
            total += npages
        if total * PAGE_SIZE != mv.nbytes:
            raise ValueError(f"runs hold {total} pages but the buffer has {mv.nbytes} bytes")
        if not total:
            return
        if self._buf is not None:
            self._seal_buffer()
        self._pages_in += total
        owned = type(mv.obj) is bytes
        nonzero = nonzero_runs(mv, total)  # (first, count) in buffer pages
        nz_len = len(nonzero)
        j = 0
        base = 0  # buffer page where the current run starts
        try:
            for vaddr, npages in runs:
                end = base + npages
                cur = base
                while j < nz_len and nonzero[j][0] < end:
                    first, count = nonzero[j]
                    s = first if first > cur else cur
                    e = min(first + count, end)
                    if s > cur:
                        self._record_zero(vaddr + (cur - base) * PAGE_SIZE, s - cur)
                    self._pack(
                        vaddr + (s - base) * PAGE_SIZE, mv[s * PAGE_SIZE : e * PAGE_SIZE], owned
                    )
                    cur = e
                    if first + count > end:
                        break  # this non-zero stretch continues in the next run
                    j += 1
                if cur < end:
                    self._record_zero(vaddr + (cur - base) * PAGE_SIZE, end - cur)
                base = end
        finally:
            if self._borrowed:
                self._materialize()

    def add_read(
        self, runs, read: Callable[[list[tuple[int, int]], memoryview], list[tuple[int, int]]]
    ) -> int:
        """Add the pages of runs ((vaddr, npages), sorted), which read(batch, view) puts
        straight into the writer's chunk buffer: it fills view with the pages of batch
        (a piece of runs, at most 8 MiB) back to back and returns the runs it read, in
        order (a run that vanished is left out, and its pages are not in view). Zero
        pages are then dropped in place (C). Returns the pages read.
        """
        self._check_open()
        if self._pending:
            self._seal()
        room_max = self._chunk_bytes // PAGE_SIZE
        done = 0
        i, a, left = 0, 0, 0
        runs = list(runs)
        while True:
            if self._buf is None:
                while len(self._inflight) >= self._max_inflight:
                    self._drain_one()
                self._buf, self._fill = self._buffers.get(), 0
            want = min(room_max - self._fill // PAGE_SIZE, READ_PAGES)
            batch: list[tuple[int, int]] = []
            got = 0
            while got < want:
                if not left:
                    if i == len(runs):
                        break
                    a, left = runs[i]
                    if a % PAGE_SIZE or a < 0 or left < 0:
                        raise ValueError(f"run (0x{a:x}, {left}): not page aligned")
                    i += 1
                    continue
                take = min(left, want - got)
                batch.append((a, take))
                got += take
                a += take * PAGE_SIZE
                left -= take
            if not batch:
                return done
            view = memoryview(self._buf)[self._fill : self._fill + got * PAGE_SIZE]
            good = read(batch, view)
            recs, kept = pack_nonzero(view, good)
            off = self._fill // PAGE_SIZE
            for vaddr, npages, data in recs:
                if data:
                    self._record_run(vaddr, npages, off)
                    off += npages
                else:
                    self._record_zero(vaddr, npages)
                self._pages_in += npages
                done += npages
            self._fill += kept * PAGE_SIZE
            if self._fill == self._chunk_bytes:
                self._seal_buffer()

    def _seal_buffer(self) -> None:
        """Submit add_read's chunk buffer (a pool thread hands it back when written)."""
        buf, fill = self._buf, self._fill
        self._buf, self._fill = None, 0
        if not fill:
            self._buffers.put(buf)
            return
        while len(self._inflight) >= self._max_inflight:
            self._drain_one()
        self._inflight.append(self._pool.submit(self._compress_and_write, buf, fill))
        self._next_chunk += 1

    def add_compressed(self, runs, frame, crc: int, ulen: int) -> None:
        """Store one chunk that is already compressed (a zstd frame of `ulen` bytes of
        the runs' pages, `crc` its crc32), as it came over the network: no second
        compression. Zero pages in it stay data (readers never rely on their absence).
        The caller vouches for the frame (the migration receiver checks its crc and
        inflates it itself); `frame` is kept by reference until written.
        """
        self._check_open()
        if self._pending:
            self._seal()
        if self._buf is not None:
            self._seal_buffer()
        total = 0
        chunk = self._next_chunk
        for vaddr, npages in runs:
            if vaddr % PAGE_SIZE or vaddr < 0 or npages <= 0:
                raise ValueError(f"run (0x{vaddr:x}, {npages}): not page aligned")
            last = self._runs[-1] if self._runs else None
            if last is not None and last[2] == chunk and last[0] + last[1] * PAGE_SIZE == vaddr:
                last[1] += npages
            else:
                self._runs.append([vaddr, npages, chunk, total])
            total += npages
        if total * PAGE_SIZE != ulen or not ulen:
            raise ValueError(f"runs hold {total} pages but the chunk has {ulen} bytes")
        self._pages_in += total
        while len(self._inflight) >= self._max_inflight:
            self._drain_one()
        self._inflight.append(self._pool.submit(self._write_frame, frame, crc, ulen))
        self._next_chunk += 1

    def _write_frame(self, frame, crc: int, ulen: int) -> tuple[int, int, int, int]:
        n = memoryview(frame).nbytes
        return self._write_chunk([frame], n), n, ulen, crc

    def _write_chunk(self, pieces: list, length: int) -> int:
        """Pool thread: reserve the next stretch of the file, write the chunk's pieces
        there (O_DIRECT when open: aligned and zero-padded), return its payload offset."""
        padded = length
        with self._pos_lock:
            direct = self._dfd >= 0 and self._pos >= DIRECT_AFTER
            if direct:
                padded = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
                self._pos = -(-(HEADER_LEN + self._pos) // DIRECT_ALIGN) * DIRECT_ALIGN - HEADER_LEN
            off = self._pos
            self._pos += padded
        with self._space_checked(pages_name(self.layer)):
            if direct:
                try:
                    _write_direct(self._dfd, pieces, length, padded, HEADER_LEN + off)
                    return off
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # an alignment this device does not take: this chunk by plain writes
                    pieces = [*pieces, bytes(padded - length)]
            pwritev_all(self._fd, pieces, HEADER_LEN + off)
        return off

    def _space_checked(self, name: str):
        """A full file system is NoSpace (exit 18) naming the image and the file."""
        return fsio.space_checked(self._image, name)

    def add_zero(self, vaddr: int, npages: int) -> None:
        """Record pages known to be all zero without reading them (e.g. the zero-page PFN)."""
        self._check_open()
        if vaddr % PAGE_SIZE or vaddr < 0 or npages < 0:
            raise ValueError(f"add_zero(0x{vaddr:x}, {npages}): not page aligned")
        if npages:
            self._pages_in += npages
            self._record_zero(vaddr, npages)

    def _record_zero(self, vaddr: int, npages: int) -> None:
        if self._zero:
            last = self._zero[-1]
            if last[0] + last[1] * PAGE_SIZE == vaddr:
                last[1] += npages
                return
        self._zero.append([vaddr, npages])

    def _pack(self, vaddr: int, mv: memoryview, owned: bool) -> None:
        """Append non-zero pages to the current chunk, splitting at chunk boundaries.

        Segments are kept as views; views of a caller's mutable buffer are
        "borrowed" and get copied when their chunk is sealed, or at the end of
        the add_runs() call that lent them, whichever comes first.
        """
        while mv:
            room = self._chunk_bytes - self._pending_len
            piece, mv = mv[:room], mv[room:]
            self._record_run(vaddr, len(piece) // PAGE_SIZE)
            self._pending.append(piece)
            self._borrowed = self._borrowed or not owned
            self._pending_len += len(piece)
            vaddr += len(piece)
            if self._pending_len == self._chunk_bytes:
                self._seal()

    def _materialize(self) -> None:
        """Copy the pending segments into one bytes object the caller cannot change."""
        self._pending = [b"".join(self._pending)] if self._pending else []
        self._borrowed = False

    def _record_run(self, vaddr: int, npages: int, off: int | None = None) -> None:
        chunk = self._next_chunk
        if off is None:
            off = self._pending_len // PAGE_SIZE
        if self._runs:
            last = self._runs[-1]
            if (
                last[2] == chunk
                and last[0] + last[1] * PAGE_SIZE == vaddr
                and last[3] + last[1] == off
            ):
                last[1] += npages
                return
        self._runs.append([vaddr, npages, chunk, off])

    def _seal(self) -> None:
        """Submit the current chunk for compression (after making room in the window)."""
        segs = self._pending
        # One view of an immutable bytes object goes as is; otherwise join, which is
        # also the one copy that borrowed views of a caller's buffer get.
        data = segs[0] if len(segs) == 1 and not self._borrowed else b"".join(segs)
        self._pending, self._pending_len, self._borrowed = [], 0, False
        while len(self._inflight) >= self._max_inflight:
            self._drain_one()
        self._inflight.append(self._pool.submit(self._compress_and_write, data))
        self._next_chunk += 1

    def _compress_and_write(self, data, fill: int = -1) -> tuple[int, int, int, int]:
        """Pool thread: compress, reserve the next stretch of the file, pwrite there.

        Chunks therefore land in completion order, not chunk order (the index has
        every offset), and the producer thread never waits on the disk. With `fill`,
        data is a pool buffer holding that many bytes: it goes back to the pool once
        written (level 0 writes the frame's blocks straight from it).
        """
        ulen = len(data) if fill < 0 else fill
        view = memoryview(data)[:ulen]
        pieces, length, crc = self._compressor.frame(view)
        off = self._write_chunk(pieces, length)
        del pieces, view
        if fill >= 0:
            self._buffers.put(data)
        return off, length, ulen, crc

    def _drain_one(self) -> None:
        """Wait for the oldest chunk (bounds memory, surfaces pool errors) and record it."""
        self._chunks.append(self._inflight.popleft().result())

    # -- finishing -------------------------------------------------------------

    def close(self) -> LayerStats:
        """Wait for this layer's chunks, write its index, and return its stats."""
        self._check_open()
        if self._pending:
            self._seal()
        if self._buf is not None:
            self._seal_buffer()
        while self._inflight:
            self._drain_one()
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        index = LayerIndex(
            self.layer,
            self._pos,
            self._chunks,
            [tuple(r) for r in self._runs],
            [tuple(z) for z in self._zero],
        )
        bad = first_overlap(index.records.records)
        if bad is not None:
            raise ValueError(
                f"layer {self.layer}: page 0x{bad[0] * PAGE_SIZE:x} was added twice; "
                "a layer must hold each page at most once"
            )
        with self._space_checked(pages_name(self.layer)):
            header = pack_header(KIND_PAGES, self._ident, self.layer, self._pos, 0)
            fsio.pwrite_all(self._fd, header, 0)
        os.close(self._fd)
        self._fd = None
        data_pages = index.data_pages
        stats = LayerStats(
            layer=self.layer,
            pages_in=self._pages_in,
            zero_pages=index.zero_pages,
            data_pages=data_pages,
            bytes_raw=data_pages * PAGE_SIZE,
            bytes_stored=self._pos,
            chunks=len(self._chunks),
            seconds=0.0,
        )
        index.stats = {k: v for k, v in stats.as_dict().items() if k != "seconds"}
        index.stats["level"] = self._compressor.level  # informational: any level reads alike
        with self._space_checked(index_name(self.layer)):
            info: BlobInfo = write_blob(
                os.path.join(self._dir, index_name(self.layer)),
                KIND_INDEX,
                self._ident,
                self.layer,
                index.to_obj(),
            )
        self._closed = True
        self.stats = LayerStats(**{**stats.as_dict(), "seconds": time.perf_counter() - self._t0})
        self._on_close(LayerEntry(self.layer, self._ident, info.length, info.crc, self._pos))
        return self.stats

    def _check_open(self) -> None:
        if self._closed or self._fd is None:
            raise RuntimeError(f"layer {self.layer} is closed")

    def discard(self) -> None:
        """Forget in-flight work and close the file (the image writer removes the directory)."""
        for fut in self._inflight:
            fut.cancel()
        # Running workers still pwrite to our fd: wait, or a reused fd number gets their bytes.
        wait(self._inflight)
        self._inflight.clear()
        self._pending = []
        self._buf = None
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closed = True
