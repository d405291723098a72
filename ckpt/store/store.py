"""Store: a directory of point-in-time snapshots of processes (docs/SNAPSHOTS.md).

Each snapshot is a complete image directory; an incremental one hard-links its
parent's layer files and adds one layer with the pages written since. So any
snapshot restores on its own (ckpt.api.restore(store.path_of(info))),
deleting one never loses a layer another uses, and gc only has to keep chains
short. One flock serializes writers (snapshot, gc) and lets readers share.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ImageExists, ImageNotFound, ImageVersionError, UsageError
from ..image import fsio, trust
from . import gc as gc_mod
from . import journal, layout, retention, timespec
from . import verify as verify_mod
from .chain import ChainWriter
from .info import SnapshotInfo, load_info
from .lock import StoreLock


class Store:
    """An open snapshot store. Cheap to open; methods take the lock they need.

    Writers (begin/commit/tracking_put/tracking_drop/gc/compact) must run inside
    `with store.lock():` (exclusive). Readers (snapshots/latest/resolve/verify)
    take a shared lock for their own duration when the caller holds none; a
    restore should hold `store.lock(shared=True)` until it has read the image,
    so that gc cannot swap the snapshot's directory under it.
    """

    def __init__(self, root: str):
        self.root = root
        self.name = root
        self._lock = StoreLock(os.path.join(root, layout.LOCK), root)
        self._depth = 0
        self.read_wait = 10.0  # how long implicit shared locks wait for a writer

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = False) -> Store:
        """Open the store at `path` (create=True: make it if missing or empty)."""
        root = os.path.abspath(os.fspath(path))
        marker = os.path.join(root, layout.STORE_JSON)
        if not os.path.exists(marker):
            if not create:
                if not os.path.exists(root):
                    raise ImageNotFound(f"{root}: no such snapshot store")
                raise ImageNotFound(f"{root}: not a snapshot store (no {layout.STORE_JSON})")
            cls._create(root)
        trust.check_owned(os.stat(root), root, "the snapshot store")
        store = cls(root)
        store._check_marker()
        for sub in (layout.SNAPSHOTS, layout.TRACKING, layout.TMP):
            os.makedirs(os.path.join(root, sub), fsio.DIR_MODE, exist_ok=True)
        return store

    @staticmethod
    def _create(root: str) -> None:
        parent = os.path.dirname(root)
        if not os.path.isdir(parent):
            raise ImageNotFound(f"{parent}: directory does not exist (cannot create store {root})")
        trust.check_place(parent, f"snapshot store {root}")
        try:
            os.mkdir(root, fsio.DIR_MODE)
        except FileExistsError:
            # empty, or being created right now by another ckpt (two cron jobs at once)
            ours = {layout.STORE_JSON, layout.SNAPSHOTS, layout.TRACKING, layout.TMP, layout.LOCK}
            names = os.listdir(root) if os.path.isdir(root) else None
            if names is None or not all(
                n in ours or n.startswith(layout.STORE_JSON + ".tmp-") for n in names
            ):
                raise ImageExists(
                    f"{root}: exists and is not a snapshot store (choose a new or empty directory)"
                ) from None
        for sub in (layout.SNAPSHOTS, layout.TRACKING, layout.TMP):
            os.makedirs(os.path.join(root, sub), fsio.DIR_MODE, exist_ok=True)
        obj = {
            "format": layout.STORE_FORMAT,
            "version": [layout.STORE_MAJOR, layout.STORE_MINOR],
            "created": time.time(),
        }
        if not os.path.exists(os.path.join(root, layout.STORE_JSON)):
            layout.write_json_atomic(os.path.join(root, layout.STORE_JSON), obj)

    def _check_marker(self) -> None:
        path = os.path.join(self.root, layout.STORE_JSON)
        try:
            obj = layout.read_json(path)
            fmt, version = obj["format"], obj["version"]
            major, minor = int(version[0]), int(version[1])
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ImageNotFound(f"{path}: not a snapshot store marker ({exc})") from None
        if fmt != layout.STORE_FORMAT:
            raise ImageNotFound(f"{path}: not a ckpt snapshot store (format {fmt!r})")
        if major != layout.STORE_MAJOR:
            raise ImageVersionError(
                f"{self.root}: snapshot store version {major}.{minor} is not supported "
                f"(this ckpt reads {layout.STORE_MAJOR}.x)"
            )

    # -- locking -----------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait: float = 0.0, *, shared: bool = False, op: str = "") -> Iterator[Store]:
        """Hold the store lock. Exclusive by default; StoreBusy after `wait` seconds.

        Nested use on the same Store is allowed (an exclusive hold covers a shared
        request). The first exclusive holder finishes or discards what a killed
        run left (journal.json roll-forward, tmp/ leftovers).
        """
        if self._depth:
            if self._lock.shared and not shared:
                raise RuntimeError("cannot upgrade a shared store lock to exclusive")
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._lock.acquire(wait, shared=shared, op=op)
        self._depth = 1
        try:
            if not shared:
                self.recover()
            # a reader never changes the store: a gc that died mid-swap is finished by
            # the next writer (snapshot, gc, compact); until then `unfinished_gc` says so
            yield self
        finally:
            self._depth = 0
            self._lock.release()

    @property
    def unfinished_gc(self) -> bool:
        """A gc was killed after deciding (journal.json): some snapshots it removes are
        still listed, and one it was swapping may be missing until a writer finishes it."""
        return os.path.exists(os.path.join(self.root, layout.JOURNAL))

    def unfinished_gc_note(self) -> str:
        return (
            f"an interrupted gc left {layout.JOURNAL} in {self.root}: the list may still show "
            "snapshots it removes, or miss one it was rewriting; the next snapshot, gc or "
            f"compact finishes it (`ckpt compact {self.root} --dry-run` changes nothing else)"
        )

    @property
    def locked(self) -> bool:
        return self._depth > 0 and not self._lock.shared

    def _need_exclusive(self, what: str) -> None:
        if not self.locked:
            raise RuntimeError(f"Store.{what}() needs `with store.lock():` (exclusive)")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        if self._depth:
            yield
        else:
            with self.lock(self.read_wait, shared=True, op="read"):
                yield

    def recover(self) -> bool:
        """Finish an interrupted gc and remove leftovers. Needs the exclusive lock.
        Returns True if there was anything to do."""
        self._need_exclusive("recover")
        j = journal.load(self.root)
        if j is not None:
            journal.apply(self.root, j)
        return self.clean_tmp() or j is not None

    def clean_tmp(self) -> bool:
        tmp = os.path.join(self.root, layout.TMP)
        names = os.listdir(tmp)
        for name in names:
            p = os.path.join(tmp, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return bool(names)

    # -- listing -----------------------------------------------------------------

    def snapshots(self, pid: int | None = None) -> list[SnapshotInfo]:
        """Every snapshot, oldest → newest (by sequence number); `pid` filters."""
        with self._reading():
            d = os.path.join(self.root, layout.SNAPSHOTS)
            infos = [
                load_info(os.path.join(d, name))
                for name in os.listdir(d)
                if layout.parse_id(name) is not None and os.path.isdir(os.path.join(d, name))
            ]
        infos.sort(key=lambda s: s.seq)
        return infos if pid is None else [s for s in infos if s.pid == pid]

    def latest(self, pid: int | None = None) -> SnapshotInfo | None:
        snaps = self.snapshots(pid)
        return snaps[-1] if snaps else None

    def resolve(self, at: str | None, pid: int | None = None) -> SnapshotInfo:
        """The snapshot `at` names: None = the newest; an id; a unique id prefix; or a
        TIME (ISO 8601 / -1h …) = the newest snapshot taken at or before it."""
        snaps = self.snapshots(pid)
        whose = f" of pid {pid}" if pid is not None else ""
        if not snaps:
            raise ImageNotFound(f"store {self.root} has no snapshots{whose}{self._gc_hint()}")
        if at is None or at in ("", "latest"):
            return snaps[-1]
        if timespec.looks_like_time(at):
            t = timespec.parse_time(at)
            before = [s for s in snaps if s.time <= t]
            if not before:
                raise ImageNotFound(
                    f"store {self.root} has no snapshot{whose} at or before {at} "
                    f"({_iso(t)}); the oldest is {snaps[0].id} ({snaps[0].iso})"
                )
            return max(before, key=lambda s: (s.time, s.seq))
        exact = [s for s in snaps if s.id == at]
        if exact:
            return exact[0]
        matches = [s for s in snaps if s.id.startswith(at)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = ", ".join(s.id for s in matches[:5]) + (" …" if len(matches) > 5 else "")
            raise UsageError(f"snapshot id prefix {at!r} is ambiguous: {shown}")
        raise ImageNotFound(
            f"store {self.root} has no snapshot {at!r}{whose} (ids look like {snaps[-1].id}; "
            f"times like 2026-11-25T23:18 or -1h){self._gc_hint()}"
        )

    def _gc_hint(self) -> str:
        return f"; {self.unfinished_gc_note()}" if self.unfinished_gc else ""

    def path_of(self, info: SnapshotInfo) -> str:
        """The snapshot's image directory (what ImageReader / restore take)."""
        return os.path.join(self.root, layout.SNAPSHOTS, info.id)

    # -- writing a snapshot ------------------------------------------------------

    def begin(self, parent: SnapshotInfo | None, level: int | None = None) -> ChainWriter:
        """An ImageWriter for the next snapshot, in tmp/. With a parent it already
        holds the parent's layers (hard links): add one layer of written pages."""
        self._need_exclusive("begin")
        staging = os.path.join(self.root, layout.TMP, f"snap-{secrets.token_hex(6)}")
        base = self.path_of(parent) if parent is not None else None
        return ChainWriter(staging, level, base=base, parent=parent)

    def commit(self, w: ChainWriter, state: dict[str, Any], meta: dict[str, Any]) -> SnapshotInfo:
        """Publish the snapshot: assigns id and sequence number, adds id/seq/parent/time/
        layers to meta, commits the image and renames it into snapshots/ (atomic: a
        killed commit leaves only tmp/ garbage). meta["time"] may give the freeze time."""
        self._need_exclusive("commit")
        names = os.listdir(os.path.join(self.root, layout.SNAPSHOTS))
        seq = max((layout.parse_id(n) or 0 for n in names), default=0) + 1
        t = float(meta.get("time") or time.time())
        sid = layout.make_id(t, seq)
        layers = w.layers
        mine = [lw.stats for lw in w.written if lw.stats is not None]
        parent = w.parent
        # one increment per snapshot, however many pre-copy layers it wrote (plan.py)
        weights = list(parent.weights) if parent is not None else []
        weights = (weights + [1] + [0] * layers)[:layers]
        full = dict(meta)
        full.setdefault("full", parent is None)
        full.setdefault("pages_written", sum(s.pages_in for s in mine))
        full.setdefault("bytes", sum(s.bytes_stored for s in mine))
        full.update(
            id=sid,
            seq=seq,
            time=t,
            parent=parent.id if parent is not None else None,
            layers=layers,
            weights=weights,
        )
        layout.write_json_new(os.path.join(w.tmp_path, layout.SNAPSHOT_JSON), full)
        staged = w.commit(state, full)
        dest = os.path.join(self.root, layout.SNAPSHOTS, sid)
        try:
            os.rename(staged, dest)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        fsio.fsync_path(os.path.dirname(dest))
        return load_info(dest)

    def abort(self, w: ChainWriter) -> None:
        """Drop an uncommitted snapshot (no-op after commit)."""
        w.abort()

    # -- tracking records --------------------------------------------------------

    def _tracking_path(self, pid: int) -> str:
        return os.path.join(self.root, layout.TRACKING, f"{int(pid)}.json")

    def tracking_get(self, pid: int) -> dict | None:
        """The record last put for pid; None if absent or unreadable (→ full snapshot)."""
        try:
            rec = layout.read_json(self._tracking_path(pid), 1 << 20)
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def tracking_put(self, pid: int, rec: dict) -> None:
        self._need_exclusive("tracking_put")
        layout.write_json_atomic(self._tracking_path(pid), rec)

    def tracking_drop(self, pid: int) -> None:
        self._need_exclusive("tracking_drop")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tracking_path(pid))
            fsio.fsync_path(os.path.join(self.root, layout.TRACKING))

    def tracked_pids(self) -> list[int]:
        d = os.path.join(self.root, layout.TRACKING)
        return sorted(
            int(n[:-5]) for n in os.listdir(d) if n.endswith(".json") and n[:-5].isdigit()
        )

    # -- maintenance -------------------------------------------------------------

    def verify(self, deep: bool = False) -> verify_mod.VerifyReport:
        with self._reading():
            return verify_mod.run(self, deep)

    def gc(
        self,
        keep_last: int | None = None,
        keep_hourly: int | None = None,
        keep_daily: int | None = None,
        max_chain: int = 8,
        *,
        dry_run: bool = False,
        level: int | None = None,
    ) -> gc_mod.GcReport:
        """Retention (all None: keep everything), then compaction to chains ≤ max_chain."""
        self._need_exclusive("gc")
        for n in (keep_last, keep_hourly, keep_daily):
            if n is not None and n < 0:
                raise UsageError("--keep-* counts must be >= 0")
        if max_chain < 1:
            raise UsageError("--max-chain must be >= 1")
        policy = retention.Policy(keep_last, keep_hourly, keep_daily)
        return gc_mod.run(self, policy, max_chain, dry_run=dry_run, level=level)

    def compact(
        self, max_chain: int = 8, *, dry_run: bool = False, level: int | None = None
    ) -> gc_mod.GcReport:
        """Compaction alone: every snapshot is kept."""
        return self.gc(max_chain=max_chain, dry_run=dry_run, level=level)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
