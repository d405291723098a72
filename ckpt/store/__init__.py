"""Snapshot stores: point-in-time snapshots of processes, retention and compaction.

    from ckpt.store import Store
    store = Store.open(path, create=True)
    with store.lock(wait=5):                  # exclusive: snapshot, gc, compact
        w = store.begin(store.latest(pid))    # an ImageWriter holding the parent's layers
        ...                                   # add one layer of written pages
        info = store.commit(w, state, meta)
    store.resolve("-1h")                      # newest snapshot at or before an hour ago

docs/SNAPSHOTS.md describes the layout, retention, compaction and crash safety.
"""

from .chain import ChainWriter
from .gc import GcReport
from .info import SnapshotInfo
from .retention import Policy
from .store import Store
from .verify import SnapshotCheck, VerifyReport

__all__ = [
    "ChainWriter",
    "GcReport",
    "Policy",
    "SnapshotCheck",
    "SnapshotInfo",
    "Store",
    "VerifyReport",
]
