"""The gc rename journal: how a killed gc leaves every kept snapshot complete.

gc builds every rewritten snapshot as a complete image under tmp/gc-<id>
first. Only then does it write journal.json (atomically, fsynced) naming the
swaps and removals, and carry them out with renames:

    swap id:    snapshots/<id> → tmp/old-<id>;  tmp/gc-<id> → snapshots/<id>
    remove id:  snapshots/<id> → tmp/del-<id>

Every step is a rename, and apply() looks at what exists before each one, so
running it again after a crash at any point finishes the job (roll forward):
  - no journal: gc died before deciding; tmp/ is garbage, the store is as before;
  - journal: each snapshot is at snapshots/<id> (old or new, both complete) or,
    between the two renames of its swap, at tmp/gc-<id> (complete) — apply()
    moves it into place. The journal is removed only after the renames are
    fsynced; tmp/ is emptied after that.
The next exclusive lock holder (any snapshot or gc) runs recovery first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import faults
from ..errors import ImageCorrupt
from ..image import fsio
from . import layout


@dataclass
class Journal:
    swap: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    def to_obj(self) -> dict:
        return {"op": "gc", "version": 1, "swap": self.swap, "remove": self.remove}


def new_dir(root: str, sid: str) -> str:
    return os.path.join(root, layout.TMP, f"gc-{sid}")


def _snap(root: str, sid: str) -> str:
    return os.path.join(root, layout.SNAPSHOTS, sid)


def write(root: str, j: Journal) -> None:
    layout.write_json_atomic(os.path.join(root, layout.JOURNAL), j.to_obj())


def load(root: str) -> Journal | None:
    path = os.path.join(root, layout.JOURNAL)
    if not os.path.exists(path):
        return None
    try:
        obj = layout.read_json(path)
        j = Journal(list(obj["swap"]), list(obj["remove"]))
        if not all(layout.parse_id(s) is not None for s in j.swap + j.remove):
            raise ValueError("bad snapshot id")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageCorrupt(
            f"{path}: unreadable gc journal ({exc}); the store is left as it is: "
            "inspect snapshots/ and tmp/ by hand"
        ) from None
    return j


def apply(root: str, j: Journal) -> None:
    """Carry out (or finish) the journal's renames, then drop the journal. Idempotent."""
    tmp = os.path.join(root, layout.TMP)
    for n, sid in enumerate(j.swap):
        cur, new, old = _snap(root, sid), new_dir(root, sid), os.path.join(tmp, f"old-{sid}")
        if os.path.isdir(new):
            if os.path.lexists(cur):
                os.rename(cur, old)
                if n == 0:
                    faults.point("gc-swap")
            os.rename(new, cur)
        elif not os.path.lexists(cur) and os.path.isdir(old):  # cannot happen; never lose it
            os.rename(old, cur)
    faults.point("gc-swapped")
    for n, sid in enumerate(j.remove):
        cur = _snap(root, sid)
        if os.path.lexists(cur):
            os.rename(cur, os.path.join(tmp, f"del-{sid}"))
            if n == 0:
                faults.point("gc-remove")
    fsio.fsync_path(os.path.join(root, layout.SNAPSHOTS))
    fsio.fsync_path(tmp)
    os.unlink(os.path.join(root, layout.JOURNAL))
    fsio.fsync_path(root)
    faults.point("gc-cleanup")
