"""Reading many snapshots that share layer files, each shared file parsed once.

ImageReader validates every layer index of an image when it opens it. In a
store, snapshot k hard-links the layers of snapshot k-1, so opening 50
snapshots parses the (large) base index 50 times: seconds for a 256 MiB
process. gc and verify instead read each snapshot's state file (manifest +
state) and get LayerReaders from a LayerCache keyed by the files' inodes and
manifest entry: the same inode is the same bytes, so one validated reader
serves every snapshot that links it, and a file that is NOT a link (a copy,
a replacement) is read and validated on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ImageCorrupt, ImageNotFound
from ..image import MAX_STATE_BYTES, LayerReader
from ..image.blob import read_blob
from ..image.header import KIND_STATE
from ..image.layer_writer import LayerEntry, index_name, pages_name
from ..image.runs import merge
from ..image.writer import STATE_NAME
from ..units import PAGE_SIZE
from .chain import Intervals, present_pages


@dataclass
class Envelope:
    """A snapshot's state file: meta, process state and layer manifest."""

    path: str
    meta: dict[str, Any]
    state: dict[str, Any]
    entries: list[LayerEntry]

    @property
    def idents(self) -> tuple[bytes, ...]:
        return tuple(e.ident for e in self.entries)

    def present(self) -> Intervals:
        return present_pages(self.state)


def read_envelope(path: str) -> Envelope:
    """Read and check state.bin of the image at `path` (not its layers)."""
    state_path = os.path.join(path, STATE_NAME)
    if not os.path.exists(state_path):
        raise ImageNotFound(f"{path}: incomplete image (no {STATE_NAME})")
    _, env = read_blob(state_path, KIND_STATE, max_len=MAX_STATE_BYTES)
    if not isinstance(env, dict) or env.get("page_size") != PAGE_SIZE:
        raise ImageCorrupt(f"{state_path}: not a state envelope for {PAGE_SIZE}-byte pages")
    state, meta, layers = env.get("state"), env.get("meta", {}), env.get("layers")
    if not isinstance(state, dict) or not isinstance(meta, dict) or not isinstance(layers, list):
        raise ImageCorrupt(f"{state_path}: state, meta or layer manifest missing")
    entries = []
    for i, obj in enumerate(layers):
        try:
            nums = [obj[k] for k in ("index_len", "index_crc", "pages_len")]
            ident = obj["id"]
            ok = obj["layer"] == i and isinstance(ident, bytes) and len(ident) == 16
            ok = ok and all(type(n) is int and n >= 0 for n in nums)
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise ImageCorrupt(f"{state_path}: layer manifest entry {i} is malformed")
        entries.append(LayerEntry(i, ident, *nums))
    return Envelope(path, meta, state, entries)


class LayerCache:
    """Validated LayerReaders shared by every image that hard-links the same files."""

    def __init__(self) -> None:
        self._readers: dict[tuple, LayerReader] = {}
        self._coverage: dict[int, Intervals] = {}

    def get(self, dirpath: str, entry: LayerEntry) -> LayerReader:
        """The layer `entry` of the image at `dirpath` (ImageCorrupt / ImageNotFound if bad)."""
        try:
            si = os.stat(os.path.join(dirpath, index_name(entry.layer)))
            sp = os.stat(os.path.join(dirpath, pages_name(entry.layer)))
        except FileNotFoundError as exc:
            raise ImageNotFound(f"{exc.filename}: layer {entry.layer} file is missing") from None
        key = (si.st_dev, si.st_ino, sp.st_ino, sp.st_size, entry)
        lr = self._readers.get(key)
        if lr is None:
            lr = self._readers[key] = LayerReader(dirpath, entry)
        return lr

    def chain(self, env: Envelope) -> list[LayerReader]:
        return [self.get(env.path, e) for e in env.entries]

    def coverage(self, lr: LayerReader) -> Intervals:
        """Pages the layer says anything about (data or zero), merged."""
        cov = self._coverage.get(id(lr))
        if cov is None:
            cov = self._coverage[id(lr)] = merge([(r[0], r[1]) for r in lr.index.records.records])
        return cov

    def close(self) -> None:
        for lr in self._readers.values():
            lr.close()
        self._readers.clear()
        self._coverage.clear()


def missing_pages(wanted: Intervals, covered: Intervals) -> Intervals:
    """wanted minus covered (both sorted, disjoint)."""
    out: Intervals = []
    j = 0
    for s, e in wanted:
        cur = s
        while j < len(covered) and covered[j][1] <= cur:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < e:
            cs, ce = covered[k]
            if cs > cur:
                out.append((cur, cs))
            cur = max(cur, ce)
            if ce >= e:
                break
            k += 1
        if cur < e:
            out.append((cur, e))
    return out
