"""LayerReader: one layer's checked index plus checked access to its chunks.

Opening a layer validates everything that is cheap: both headers, the index's
crc against the state file's manifest (so an index from another image or an
older run cannot be swapped in), every index number, and the pages file's
length. Chunk contents are checked when read (read_chunk), or all at once by
ImageReader.verify(deep=True).

A chunk is read into the calling thread's reusable page-aligned buffer: from the page
cache when it is all there (preadv2 RWF_NOWAIT), else from the disk with O_DIRECT,
so that a restore of an image that is not cached (e.g. written with O_DIRECT by the
dump) neither waits for the page cache to be filled nor evicts other files for it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading

from ..errors import ImageCorrupt
from ..units import PAGE_SIZE
from . import fsio
from .blob import read_blob
from .codec import decompress
from .header import KIND_INDEX, KIND_PAGES, MAX_HEADER_LEN, parse_header
from .index import MAX_INDEX_BYTES, LayerIndex
from .layer_writer import LayerEntry, index_name, pages_name

_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers
_DIRECT_MIN = 64 << 10  # smaller reads go through the page cache
_tls = threading.local()  # each reading thread's aligned buffer


class LayerReader:
    """A validated layer of an image. `number` 0 is the oldest (base) layer."""

    def __init__(self, dirpath: str, entry: LayerEntry):
        self.number = entry.layer
        self.entry = entry
        self.index_path = os.path.join(dirpath, index_name(entry.layer))
        self.pages_path = os.path.join(dirpath, pages_name(entry.layer))
        header, obj = read_blob(self.index_path, KIND_INDEX, max_len=MAX_INDEX_BYTES)
        self._check_identity(self.index_path, header.ident, header.layer)
        if (header.payload_len, header.payload_crc) != (entry.index_len, entry.index_crc):
            raise ImageCorrupt(
                f"{self.index_path}: does not match the state file's layer manifest "
                "(index replaced or from another image)"
            )
        self.index = LayerIndex.from_obj(obj, self.index_path, entry.layer)
        if self.index.pages_len != entry.pages_len:
            raise ImageCorrupt(f"{self.index_path}: pages length disagrees with the state file")
        self._fd: int | None = None
        self._dfd: int | None = None  # O_DIRECT fd on the same file; -1: not available
        self._lock = threading.Lock()
        self._data_offset = self._check_pages_file()

    def _check_identity(self, path: str, ident: bytes, layer: int) -> None:
        if layer != self.number:
            raise ImageCorrupt(f"{path}: header says layer {layer}, expected {self.number}")
        if ident != self.entry.ident:
            raise ImageCorrupt(f"{path}: belongs to another layer (layer id mismatch)")

    def _check_pages_file(self) -> int:
        """Check the pages file's header and exact length; return where chunk data starts."""
        fd = fsio.open_read(self.pages_path, f"pages of layer {self.number}")
        try:
            size = fsio.file_size(fd, self.pages_path)
            head = fsio.read_head(fd, size, self.pages_path, MAX_HEADER_LEN)
        finally:
            os.close(fd)  # reopened on first read: an image may have thousands of layers
        header = parse_header(head, self.pages_path, KIND_PAGES)
        self._check_identity(self.pages_path, header.ident, header.layer)
        if header.payload_len != self.index.pages_len:
            raise ImageCorrupt(f"{self.pages_path}: length field disagrees with the layer index")
        expected = header.header_len + header.payload_len
        if size < expected:
            raise ImageCorrupt(f"{self.pages_path}: truncated ({size} of {expected} bytes)")
        if size > expected:
            raise ImageCorrupt(f"{self.pages_path}: {size - expected} unexpected trailing bytes")
        return header.header_len

    def _get_fd(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = fsio.open_read(self.pages_path, f"pages of layer {self.number}")
            return self._fd

    def _get_dfd(self) -> int:
        fd = self._get_fd()
        with self._lock:
            if self._dfd is None:
                self._dfd = -1
                try:
                    dfd = os.open(self.pages_path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC |
                                  os.O_NOFOLLOW)  # fmt: skip
                except OSError:
                    return -1
                a, b = os.fstat(fd), os.fstat(dfd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):  # replaced meanwhile
                    os.close(dfd)
                    return -1
                self._dfd = dfd
            return self._dfd

    def _read_frame(self, off: int, clen: int, what: str) -> memoryview:
        """clen bytes at payload offset off, in the thread's buffer (valid until its
        next read): cached bytes with RWF_NOWAIT, the rest straight from the disk."""
        pos = self._data_offset + off
        end = pos + clen
        lo = pos - pos % _ALIGN
        hi = -(-end // _ALIGN) * _ALIGN
        buf = getattr(_tls, "buf", None)
        if buf is None or len(buf) < hi - lo:
            if buf is not None:
                buf.close()
            buf = _tls.buf = mmap.mmap(-1, max(hi - lo, 8 << 20))
        mv = memoryview(buf)
        fd = self._get_fd()
        got = 0
        try:
            got = os.preadv(fd, [mv[pos - lo : end - lo]], pos, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                raise ImageCorrupt(
                    f"{self.pages_path}: read of {what} failed: {exc.strerror}"
                ) from None
        if got < clen:
            start = pos + got
            a = start - start % _ALIGN
            dfd = self._get_dfd() if hi - a >= _DIRECT_MIN else -1
            try:
                n = os.preadv(dfd, [mv[a - lo : hi - lo]], a) if dfd >= 0 else -1
            except OSError:
                n = -1  # e.g. EINVAL: a device with bigger sectors; read it plainly
            if n < end - a:
                rest = fsio.pread_exact(fd, end - start, start, self.pages_path, what)
                mv[start - lo : end - lo] = rest
        return mv[pos - lo : end - lo]

    def where(self, chunk: int) -> str:
        """How error messages name a chunk: file, layer and chunk number."""
        return f"{self.pages_path}: layer {self.number} chunk {chunk}"

    def read_chunk(self, chunk: int) -> bytes:
        """Read, checksum and decompress one chunk (thread-safe: pread + per-thread zstd)."""
        off, clen, ulen, crc = self.index.chunks[chunk]
        frame = self._read_frame(off, clen, f"layer {self.number} chunk {chunk}")
        try:
            return decompress(frame, ulen, crc, self.where(chunk))
        finally:
            frame.release()

    def summary(self) -> dict:
        idx = self.index
        return {
            "layer": self.number,
            "id": self.entry.ident.hex(),
            "chunks": len(idx.chunks),
            "data_runs": len(idx.runs),
            "zero_runs": len(idx.zero),
            "data_pages": idx.data_pages,
            "zero_pages": idx.zero_pages,
            "bytes_raw": idx.data_pages * PAGE_SIZE,
            "bytes_stored": idx.bytes_stored,
            "index_bytes": self.entry.index_len,
        }

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._dfd is not None and self._dfd >= 0:
                os.close(self._dfd)
            self._dfd = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
