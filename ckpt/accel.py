"""ckpt's C layer as plain data code may use it: each name is the C function, or None
where ckpt.kernel does not load (no compiled extension, a stale one, another OS).

image/ and store/ are plain data code (DESIGN.md): they import neither kernel/ nor the
extension, so that `ckpt show` and `ckpt verify` work on any machine. Some of their
byte work is on the dump's and the restore's data path, though, where the C versions
are faster (CRC-32 with PCLMULQDQ: ~16 GB/s against zlib's ~7) and run without the
GIL. So image/ asks this module, the one place that tries the import, and falls back to
its own plain Python versions (same results: tests/test_image_plain.py compares them).
The usual optional-accelerator pattern (msgpack's C extension and its `fallback`):
the choice is made once, at import, and does not depend on what else was imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

crc32: Callable[..., int] | None = None  # (data, crc=0) → zlib.crc32(data, crc)
nonzero_runs: Callable[[Any, int], list[tuple[int, int]]] | None = None  # (buf, npages)
pack_nonzero: Callable[[Any, Any], tuple[list[tuple[int, int, int]], int]] | None = None
gather: Callable[[Any, Any, int], None] | None = None  # (dst, pieces, length)
msgpack_cost: Callable[[Any], int | None] | None = None  # (buf)

try:
    from .kernel import memory as _memory
    from .kernel import msgcost as _msgcost
    from .kernel import native as _native
except ImportError:  # plain Python everywhere (image/bufops.py, image/msgcost.py)
    pass
else:
    crc32 = _memory.crc32
    nonzero_runs = _native.nonzero_runs
    pack_nonzero = _memory.pack_nonzero
    gather = _memory.gather
    msgpack_cost = _msgcost.decode_cost
