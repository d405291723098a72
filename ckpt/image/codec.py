"""Chunk compression and checked decompression, safe to call from pool threads.

zstandard releases the GIL while it works, which is what lets two pool threads
compress while the caller reads the next pages; but its contexts are not
thread-safe, so each thread keeps its own (threading.local). A chunk is one
zstd frame with its content size in the frame header; its checksum is zlib's
crc32 of the compressed bytes, computed by ckpt's C layer with PCLMULQDQ where it
loads (~16 GB/s here against zlib's ~7, without the GIL; image/bufops.py), else by
zlib; see docs/FORMAT.md for why not zstd's own xxh64 content checksum.

Level 0 stores: the frame is made of raw blocks (RFC 8878 Raw_Block), built here
without zstd and written from the caller's buffer without a copy (frame_pieces).
Any zstd decoder reads it, so the format and the readers do not change.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from ..errors import ImageCorrupt
from .bufops import crc32

DEFAULT_LEVEL = 1  # measured against 3 in docs/FORMAT.md: ~1.7x faster on text, ~8% bigger
_MAX_WINDOW = 1 << 27  # legit frames of ≤ 64 MiB never need more; caps a hostile frame's ask


STORE_LEVEL = 0  # no compression: raw blocks
_RAW_BLOCK = 128 << 10  # Block_Maximum_Size
_ZSTD_MAGIC = 0xFD2FB528


def raw_frame_pieces(data) -> list:
    """One zstd frame holding `data` in raw blocks, as pieces to write back to back
    (views of data, no copy): frame header, then per 128 KiB block a 3-byte block
    header and the block's bytes. Single_Segment_flag with a 4-byte content size."""
    mv = memoryview(data).cast("B")
    n = mv.nbytes
    if n >= 1 << 32:
        raise ValueError("a chunk is at most 64 MiB")
    pieces: list = [struct.pack("<IBI", _ZSTD_MAGIC, 0xA0, n)]
    for off in range(0, n, _RAW_BLOCK):
        size = min(_RAW_BLOCK, n - off)
        last = off + size >= n
        pieces.append((size << 3 | last).to_bytes(3, "little"))
        pieces.append(mv[off : off + size])
    if not n:
        pieces.append((1).to_bytes(3, "little"))  # one empty last block
    return pieces


class Compressor:
    """Compresses chunks with one ZstdCompressor per calling thread (level 0: stores)."""

    def __init__(self, level: int = DEFAULT_LEVEL):
        self.level = level
        self._local = threading.local()

    def frame(self, data) -> tuple[list, int, int]:
        """(pieces of the chunk's frame, its length, crc32 of the frame), for a writer
        that writes the pieces back to back (os.pwritev). Level 0 keeps views of data."""
        if self.level == STORE_LEVEL:
            pieces = raw_frame_pieces(data)
            crc = 0
            for p in pieces:
                crc = crc32(p, crc)
            return pieces, sum(memoryview(p).nbytes for p in pieces), crc
        frame, crc = self.compress(data)
        return [frame], len(frame), crc

    def compress(self, data) -> tuple[bytes, int]:
        """Return (zstd frame, crc32 of the frame)."""
        if self.level == STORE_LEVEL:
            frame = b"".join(raw_frame_pieces(data))
            return frame, crc32(frame)
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=False
            )
        frame = cctx.compress(data)
        return frame, crc32(frame)


_dlocal = threading.local()


def decompress(frame: bytes, ulen: int, crc: int, where: str) -> bytes:
    """Checksum, then decompress a chunk; `where` names file, layer and chunk for errors.

    The frame's declared size is checked against the index before zstd
    allocates anything, so a forged frame cannot ask for gigabytes.
    """
    got = crc32(frame)
    if got != crc:
        raise ImageCorrupt(f"{where}: checksum mismatch (stored {crc:08x}, computed {got:08x})")
    dctx = getattr(_dlocal, "dctx", None)
    if dctx is None:
        dctx = _dlocal.dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise ImageCorrupt(f"{where}: bad zstd frame header ({exc})") from None
    if size != ulen:
        raise ImageCorrupt(f"{where}: frame holds {size} bytes, index says {ulen}")
    try:
        data = dctx.decompress(frame, max_output_size=ulen, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ImageCorrupt(f"{where}: zstd cannot decode the chunk ({exc})") from None
    if len(data) != ulen:  # pragma: no cover - zstd enforces the declared size
        raise ImageCorrupt(f"{where}: decompressed to {len(data)} bytes, index says {ulen}")
    return data
