"""The on-disk image format (v1): a directory of layers plus the final process state.

    from ckpt.image import ImageWriter, ImageReader

    with ImageWriter(path) as w:          # writes into PATH.tmp-<pid>-<rand>
        lw = w.begin_layer()
        lw.add_run(vaddr, pages)          # bytes, len % PAGE_SIZE == 0
        stats = lw.close()
        w.commit(state, meta)             # fsync + atomic rename → PATH

    with ImageReader(path) as r:          # validates headers, versions, indexes
        plan = r.plan(present_runs)       # newest layer wins; the present map decides
        for vaddr, data in r.iter_data(plan): ...

docs/FORMAT.md describes the bytes; this package is the only code that knows them.
"""

from .codec import DEFAULT_LEVEL
from .header import FORMAT_MAJOR, FORMAT_MINOR
from .index import MAX_CHUNK_ULEN, MAX_INDEX_BYTES
from .layer_reader import LayerReader
from .layer_writer import LayerStats, LayerWriter
from .reader import MAX_STATE_BYTES, ChunkRead, ImageReader, Plan
from .writer import ImageWriter

__all__ = [
    "DEFAULT_LEVEL",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "MAX_CHUNK_ULEN",
    "MAX_INDEX_BYTES",
    "MAX_STATE_BYTES",
    "ChunkRead",
    "ImageReader",
    "ImageWriter",
    "LayerReader",
    "LayerStats",
    "LayerWriter",
    "Plan",
]
