"""gc and compact: retention, then compaction, then an atomic swap (see journal.py).

Order, and why it is safe to kill at any point:
  1. plan      decide kept/removed (retention.py) and new chains (plan.py); no writes
  2. build     each snapshot whose chain changes is written complete under
               tmp/gc-<id> (ChainWriter: hard links for layers it keeps, merged
               layers for the rest), then re-read: it must cover every present page
  3. journal   journal.json names the swaps and removals (fsynced)
  4. swap      renames (journal.apply); the journal goes last
  5. clean     tmp/ is emptied; freed space is whatever lost its last link
Before 3 a kill leaves the store as it was plus garbage in tmp/; from 3 on the
next lock holder rolls forward. Removing a snapshot never loses a layer a kept
one uses: kept snapshots hold their own hard links to every layer they read.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .. import faults
from ..errors import ImageCorrupt
from ..image.layer_writer import LayerEntry
from . import journal, layout, retention
from .chain import ChainWriter, Intervals, merge_layer, union
from .images import Envelope, LayerCache, missing_pages, read_envelope
from .info import SnapshotInfo
from .plan import DEFAULT_FANOUT, ChainPlan, LayerKey, SnapIn, plan

if TYPE_CHECKING:
    from .store import Store


@dataclass
class GcReport:
    """What gc did (or, with dry_run, would do). Sizes count each inode once."""

    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    compacted: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)  # kept id → why
    chain_before: dict[str, int] = field(default_factory=dict)  # kept id → layers
    chain_after: dict[str, int] = field(default_factory=dict)
    layers_written: int = 0
    bytes_written: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def max_chain_before(self) -> int:
        return max(self.chain_before.values(), default=0)

    @property
    def max_chain_after(self) -> int:
        return max(self.chain_after.values(), default=0)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(
            bytes_freed=self.bytes_freed,
            max_chain_before=self.max_chain_before,
            max_chain_after=self.max_chain_after,
        )
        return d


@dataclass
class _Built:
    """A layer written for some snapshot, reusable (hard link) by that snapshot's descendants."""

    owner: str
    dirpath: str
    entry: LayerEntry


class _Gc:
    def __init__(self, store: Store, level: int | None):
        self.store = store
        self.root = store.root
        self.level = level
        self.cache = LayerCache()
        self.envs: dict[str, Envelope] = {}
        self.layer_at: dict[bytes, tuple[str, LayerEntry]] = {}  # ident → (dir, entry)
        self.built: dict[tuple[int, int], list[_Built]] = {}  # (id(part), position) → builds
        self._live: dict[str, Intervals] = {}

    def close(self) -> None:
        self.cache.close()

    # -- planning ----------------------------------------------------------------

    def read_kept(self, kept: list[SnapshotInfo]) -> list[SnapIn]:
        """Manifests of the kept snapshots (state files only: layers open lazily)."""
        snaps = []
        for info in kept:
            env = self.envs[info.id] = read_envelope(info.path)
            n = len(env.entries)
            weights = info.weights if len(info.weights) == n else (1,) * n
            keys = []
            for e, wt in zip(env.entries, weights):
                self.layer_at.setdefault(e.ident, (info.path, e))
                keys.append(LayerKey(e.ident, e.layer, wt))
            snaps.append(SnapIn(info.id, tuple(keys)))
        return snaps

    def live(self, pl: ChainPlan, order: list[str]) -> None:
        """Pages each snapshot or a descendant sharing its new layers can still ask for."""
        kids = pl.children()
        for sid in reversed(order):
            own = self.envs[sid].present()
            self._live[sid] = union([own] + [self._live[k] for k in kids.get(sid, ())])

    # -- building ----------------------------------------------------------------

    def build(self, info: SnapshotInfo, pl: ChainPlan, report: GcReport) -> str:
        """Write snapshot `info` with its planned chain under tmp/gc-<id>; returns that dir."""
        sid = info.id
        env = self.envs[sid]
        chain = pl.chains[sid]
        flat = tuple(k.ident for part in chain for k in part.sources)
        if flat != env.idents:  # newest-wins is only preserved for runs of consecutive layers
            raise AssertionError(f"gc plan for {sid} does not cover its layers in order")
        dest = journal.new_dir(self.root, sid)
        ancestors = pl.ancestors(sid)
        fresh: list[tuple[int, int, LayerEntry]] = []
        w = ChainWriter(dest, self.level)
        try:
            for pos, part in enumerate(chain):
                key = part.existing_at(pos)
                if key is not None:
                    w.link_layer(*self.layer_at[key.ident])
                    continue
                hit = next(
                    (b for b in self.built.get((id(part), pos), ()) if b.owner in ancestors), None
                )
                if hit is not None:
                    w.link_layer(hit.dirpath, hit.entry)
                    continue
                sources = [self.cache.get(*self.layer_at[k.ident]) for k in part.sources]
                stats = merge_layer(w, sources, self._live[sid])
                report.layers_written += 1
                report.bytes_written += stats.bytes_stored
                fresh.append((id(part), pos, w.entries[-1]))
            meta = dict(info.meta or env.meta)
            meta.update(
                layers=len(chain),
                weights=[p.weight for p in chain],
                compacted={"time": time.time(), "layers_before": info.layers},
            )
            layout.write_json_new(os.path.join(w.tmp_path, layout.SNAPSHOT_JSON), meta)
            w.commit(env.state, meta)
        except BaseException:
            w.abort()
            raise
        for part_id, pos, entry in fresh:
            self.built.setdefault((part_id, pos), []).append(_Built(sid, dest, entry))
        self._check(dest, env)
        return dest

    def _check(self, dest: str, old: Envelope) -> None:
        """The new image opens and covers every present page (a bug must never reach the swap)."""
        env = read_envelope(dest)
        covered = union(self.cache.coverage(lr) for lr in self.cache.chain(env))
        lost = missing_pages(old.present(), covered)
        if lost:
            raise ImageCorrupt(
                f"{dest}: compaction lost {sum(e - s for s, e in lost)} present page(s); "
                "the store was not changed"
            )


def run(
    store: Store,
    policy: retention.Policy,
    max_chain: int = 8,
    *,
    dry_run: bool = False,
    fanout: int = DEFAULT_FANOUT,
    level: int | None = None,
) -> GcReport:
    t0 = time.monotonic()
    if max_chain < 1:
        raise ValueError("max_chain must be >= 1")
    root = store.root
    report = GcReport(dry_run=dry_run, bytes_before=layout.disk_usage(root))
    snaps = store.snapshots()
    why = retention.select(snaps, policy, store.tracked_pids())
    kept = [s for s in snaps if s.id in why]
    report.kept = [s.id for s in kept]
    report.removed = [s.id for s in snaps if s.id not in why]
    report.reasons = why
    report.chain_before = {s.id: s.layers for s in kept}
    # A kept snapshot whose snapshot.json is damaged is left exactly as it is.
    workable = [s for s in kept if s.error is None]
    g = _Gc(store, level)
    try:
        pl = plan(g.read_kept(workable), max_chain, fanout)
        report.compacted = list(pl.changed)
        report.chain_after = {s.id: s.layers for s in kept}
        report.chain_after.update({sid: len(pl.chains[sid]) for sid in pl.changed})
        faults.point("gc-plan")
        if dry_run:
            report.bytes_after = report.bytes_before
            report.seconds = time.monotonic() - t0
            return report
        if pl.changed:
            g.live(pl, [s.id for s in workable])
        by_id = {s.id: s for s in workable}
        for n, sid in enumerate(pl.changed):
            g.build(by_id[sid], pl, report)
            if n == 0:
                faults.point("gc-build")
    except BaseException:
        shutil.rmtree(os.path.join(root, layout.TMP), ignore_errors=True)
        os.makedirs(os.path.join(root, layout.TMP), exist_ok=True)
        raise
    finally:
        g.close()
    faults.point("gc-built")
    j = journal.Journal(swap=list(pl.changed), remove=list(report.removed))
    if j.swap or j.remove:
        journal.write(root, j)
        faults.point("gc-journal")
        journal.apply(root, j)
    store.clean_tmp()
    report.bytes_after = layout.disk_usage(root)
    report.seconds = time.monotonic() - t0
    return report
