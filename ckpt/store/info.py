"""SnapshotInfo: what `ckpt snapshots` lists, read from each snapshot's snapshot.json.

Why a sidecar file: listing 50 snapshots must not open 50 images (each open
validates every layer index). snapshot.json is written into the image
directory before the image is published, so it appears atomically with it;
the same meta is also inside state.bin, which stays the authority for restore.
"""

from __future__ import annotations

import calendar
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import layout


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot. `time` is Unix seconds (UTC); `layers` is its chain length now."""

    id: str
    seq: int
    time: float
    pid: int | None
    parent: str | None
    full: bool
    reason: str
    pages_written: int
    bytes: int
    freeze_ms: float
    layers: int
    path: str
    weights: tuple[int, ...] = ()  # per layer: snapshot increments it holds (see plan.py)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    error: str | None = None  # snapshot.json unreadable: listing still shows the snapshot

    @property
    def iso(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("meta")
        d["weights"] = list(self.weights)
        d["iso_time"] = self.iso
        return d

    @classmethod
    def from_meta(cls, meta: dict[str, Any], path: str) -> SnapshotInfo:
        layers = int(meta.get("layers", 0))
        weights = meta.get("weights")
        if not isinstance(weights, list) or len(weights) != layers:
            weights = [1] * layers
        pid = meta.get("pid")
        return cls(
            id=str(meta["id"]),
            seq=int(meta["seq"]),
            time=float(meta["time"]),
            pid=int(pid) if isinstance(pid, int) else None,
            parent=meta.get("parent"),
            full=bool(meta.get("full", meta.get("parent") is None)),
            reason=str(meta.get("reason", "")),
            pages_written=int(meta.get("pages_written", 0)),
            bytes=int(meta.get("bytes", 0)),
            freeze_ms=float(meta.get("freeze_ms", 0.0)),
            layers=layers,
            path=path,
            weights=tuple(max(0, int(w)) for w in weights),
            meta=meta,
        )


def load_info(path: str) -> SnapshotInfo:
    """SnapshotInfo of the snapshot directory `path`; a damaged sidecar gives an info
    with `error` set (id, seq and time then come from the directory name)."""
    name = os.path.basename(path)
    try:
        meta = layout.read_json(os.path.join(path, layout.SNAPSHOT_JSON))
        if not isinstance(meta, dict) or meta.get("id") != name:
            raise ValueError("not this snapshot's metadata")
        return SnapshotInfo.from_meta(meta, path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        seq = layout.parse_id(name) or 0
        try:
            t = float(calendar.timegm(time.strptime(name[:16], "%Y%m%dT%H%M%SZ")))
        except ValueError:
            t = 0.0
        return SnapshotInfo(
            id=name, seq=seq, time=t, pid=None, parent=None, full=False, reason="",
            pages_written=0, bytes=0, freeze_ms=0.0, layers=0, path=path,
            error=f"{layout.SNAPSHOT_JSON}: {exc}",
        )  # fmt: skip
