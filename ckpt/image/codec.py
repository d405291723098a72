"""Chunk compression and checked decompression, safe to call from pool threads.

zstandard releases the GIL while it works, which is what lets two pool threads
compress while the caller reads the next pages; but its contexts are not
thread-safe, so each thread keeps its own (threading.local). A chunk is one
zstd frame with its content size in the frame header; its checksum is zlib's
crc32 of the compressed bytes (zlib releases the GIL too, and runs at ~2 GB/s
here; see docs/FORMAT.md for why not zstd's own xxh64 content checksum).
"""

from __future__ import annotations

import threading
import zlib

import zstandard

from ..errors import ImageCorrupt

DEFAULT_LEVEL = 1  # measured against 3 in docs/FORMAT.md: ~1.7x faster on text, ~8% bigger
_MAX_WINDOW = 1 << 27  # legit frames of ≤ 64 MiB never need more; caps a hostile frame's ask


class Compressor:
    """Compresses chunks with one ZstdCompressor per calling thread."""

    def __init__(self, level: int = DEFAULT_LEVEL):
        self.level = level
        self._local = threading.local()

    def compress(self, data) -> tuple[bytes, int]:
        """Return (zstd frame, crc32 of the frame)."""
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=False
            )
        frame = cctx.compress(data)
        return frame, zlib.crc32(frame)


_dlocal = threading.local()


def decompress(frame: bytes, ulen: int, crc: int, where: str) -> bytes:
    """Checksum, then decompress a chunk; `where` names file, layer and chunk for errors.

    The frame's declared size is checked against the index before zstd
    allocates anything, so a forged frame cannot ask for gigabytes.
    """
    got = zlib.crc32(frame)
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
