"""ckpt's Python API: the orchestrators the CLI calls and renders (docs/API.md).

    dump(pid, directory, DumpOptions)          → DumpResult       api/dumping.py
    snapshot(pid, store, SnapshotOptions)      → SnapshotResult   api/snapshotting.py
    restore(directory, RestoreOptions)         → Restored         api/restoring.py
    restore_snapshot(store, at, RestoreOptions) → (Restored, id)
    show(directory)                            → dict             api/showing.py
    migrate(MigrateOptions, report, stats)     → MigrationStats   api/migrate.py
    receive(ReceiveOptions, report, …)         → ReceiveResult    api/receive.py

Options are dataclasses; each call also takes their fields as keywords
(`dump(pid, d, iterative=True)`). Failures raise ckpt.errors.CkptError subclasses,
each with the exit code the CLI uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and readers; imported on first use
    from .dumping import DumpOptions, DumpResult, dump
    from .restoring import Restored, RestoreOptions, restore, restore_snapshot, wait_exit_status
    from .showing import show, snapshot_dir
    from .snapshotting import SnapshotOptions, SnapshotResult, snapshot

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

_WHERE = {
    "DumpOptions": "dumping", "DumpResult": "dumping", "dump": "dumping",
    "RestoreOptions": "restoring", "Restored": "restoring", "restore": "restoring",
    "restore_snapshot": "restoring", "wait_exit_status": "restoring",
    "show": "showing", "snapshot_dir": "showing",
    "SnapshotOptions": "snapshotting", "SnapshotResult": "snapshotting", "snapshot": "snapshotting",
}  # fmt: skip


def __getattr__(name: str):
    """Import each orchestrator on first use: `ckpt show` and `ckpt verify` need no
    compiled extension (api/showing.py reads images only), the others load kernel/."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
