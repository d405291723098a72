"""verify: is every snapshot restorable, and (--deep) is every chunk intact?

Per snapshot: the image opens (headers, versions, index checksums, file
lengths, layer manifest) and every page of its present map resolves to some
layer. With deep=True every chunk of every layer is read, checksummed and
decompressed — once per layer file, however many snapshots share it through
hard links — and each damage is reported in every snapshot that contains it,
naming the snapshot, its layer and the chunk. `restorable` is False only when
a damaged chunk holds a page the snapshot's restore would read.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from ..errors import CkptError
from ..image import LayerReader
from ..image.runs import resolve
from ..model import ProcessImage
from ..units import PAGE_SIZE
from . import layout
from .chain import bounded_map, union
from .images import Envelope, LayerCache, missing_pages, read_envelope

if TYPE_CHECKING:
    from .store import Store


@dataclass
class SnapshotCheck:
    id: str
    ok: bool = True
    restorable: bool = True
    layers: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    store: str
    deep: bool
    snapshots: list[SnapshotCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # store-level (not one snapshot's)
    notes: list[str] = field(default_factory=list)  # harmless (leftovers a lock holder cleans)
    layers_checked: int = 0
    chunks_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.snapshots)

    @property
    def failed(self) -> list[SnapshotCheck]:
        return [c for c in self.snapshots if not c.ok]

    def first_error(self) -> str:
        for c in self.failed:
            return f"snapshot {c.id}: {c.errors[0]}"
        return self.problems[0] if self.problems else ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _scan(lr: LayerReader, threads: int) -> dict[int, str]:
    """Read every chunk of a layer; chunk → reason for the damaged ones."""
    bad: dict[int, str] = {}
    for chunk, res in bounded_map(lr.read_chunk, range(len(lr.index.chunks)), threads, 2 * threads):
        if isinstance(res, CkptError):
            msg, where = str(res), lr.where(chunk) + ": "
            bad[chunk] = msg[len(where) :] if msg.startswith(where) else msg
        elif isinstance(res, BaseException):
            raise res
    return bad


def _used_chunks(env: Envelope, chain: list[LayerReader]) -> set[tuple[int, int]]:
    """(layer, chunk) pairs a restore of this snapshot reads (newest layer wins)."""
    res = resolve(env.present(), [lr.index.records for lr in chain])
    return set(res.data)


def run(store: Store, deep: bool = False, threads: int = 2) -> VerifyReport:
    t0 = time.monotonic()
    rep = VerifyReport(store=store.root, deep=deep)
    snap_dir = os.path.join(store.root, layout.SNAPSHOTS)
    for name in sorted(os.listdir(snap_dir)):
        if layout.parse_id(name) is None:
            rep.problems.append(f"{os.path.join(snap_dir, name)}: not a snapshot (unexpected name)")
    if store.unfinished_gc:
        rep.notes.append(store.unfinished_gc_note())
    leftovers = os.listdir(os.path.join(store.root, layout.TMP))
    if leftovers:
        rep.notes.append(
            f"tmp/ holds {len(leftovers)} leftover(s) of an interrupted run; "
            "the next snapshot or gc removes them"
        )
    cache = LayerCache()
    damaged: dict[int, dict[int, str]] = {}  # id(LayerReader) → chunk → reason
    try:
        for info in store.snapshots():
            chk = SnapshotCheck(info.id, layers=info.layers)
            rep.snapshots.append(chk)
            _check_one(info, chk, cache, damaged, rep, deep, threads)
            chk.ok = not chk.errors
    finally:
        cache.close()
    rep.seconds = time.monotonic() - t0
    return rep


def _check_one(info, chk, cache, damaged, rep, deep: bool, threads: int) -> None:
    if info.error:
        chk.errors.append(info.error)
    try:
        env = read_envelope(info.path)
        chain = cache.chain(env)
    except CkptError as exc:
        chk.errors.append(str(exc))
        chk.restorable = False
        return
    try:  # the validation restore runs (ckpt/schema.py), before anything reads the state
        ProcessImage.from_dict(env.state)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        chk.errors.append(f"process state is malformed ({exc})")
        chk.restorable = False
        return
    if not info.error and len(chain) != info.layers:
        chk.errors.append(
            f"{layout.SNAPSHOT_JSON} says {info.layers} layers, the image has {len(chain)}"
        )
    chk.layers = len(chain)
    lost = missing_pages(env.present(), union(cache.coverage(lr) for lr in chain))
    if lost:
        first = lost[0][0]
        chk.errors.append(
            f"{sum(b - a for a, b in lost)} present page(s) are stored in no layer "
            f"(first at 0x{first * PAGE_SIZE:x})"
        )
        chk.restorable = False
    if not deep:
        return
    hurt: list[tuple[int, int]] = []
    for lr in chain:
        if id(lr) not in damaged:
            damaged[id(lr)] = _scan(lr, threads)
            rep.layers_checked += 1
            rep.chunks_checked += len(lr.index.chunks)
        for chunk, reason in sorted(damaged[id(lr)].items()):
            chk.errors.append(
                f"layer {lr.number} ({os.path.basename(lr.pages_path)}) chunk {chunk}: {reason}"
            )
            hurt.append((lr.number, chunk))
    if hurt and chk.restorable and set(hurt) & _used_chunks(env, chain):
        chk.restorable = False
