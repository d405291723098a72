"""ckpt's Python API: the orchestrators the CLI calls and renders (docs/API.md).

    dump(pid, directory, DumpOptions)          → DumpResult       api/dump.py
    snapshot(pid, store, SnapshotOptions)      → SnapshotResult   api/snapshot.py
    restore(directory, RestoreOptions)         → Restored         api/restore.py
    restore_snapshot(store, at, RestoreOptions) → (Restored, id)
    show(directory)                            → dict             api/show.py
    migrate(MigrateOptions, report, stats)     → MigrationStats   api/migrate.py
    receive(ReceiveOptions, report, …)         → ReceiveResult    api/receive.py

Options are dataclasses; each call also takes their fields as keywords
(`dump(pid, d, iterative=True)`). Failures raise ckpt.errors.CkptError subclasses,
each with the exit code the CLI uses.
"""

from __future__ import annotations

from .dump import DumpOptions, DumpResult, dump
from .restore import Restored, RestoreOptions, restore, restore_snapshot, wait_exit_status
from .show import show, snapshot_dir
from .snapshot import SnapshotOptions, SnapshotResult, snapshot

__all__ = [
    "DumpOptions",
    "DumpResult",
    "RestoreOptions",
    "Restored",
    "SnapshotOptions",
    "SnapshotResult",
    "dump",
    "restore",
    "restore_snapshot",
    "show",
    "snapshot",
    "snapshot_dir",
    "wait_exit_status",
]
