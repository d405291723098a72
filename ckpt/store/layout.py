"""Where things live inside a store, snapshot ids, and small atomic-file helpers.

A store is a directory; everything in it is named here so the other modules
never build paths by hand:

    S/store.json              format marker + version (written once, at creation)
    S/lock                    flock target; holds "pid op" of the exclusive holder
    S/journal.json            present only while gc swaps directories (crash recovery)
    S/snapshots/<id>/         one complete image per snapshot (+ snapshot.json)
    S/tracking/<pid>.json     the snapshot command's per-process tracking record
    S/tmp/                    work in progress; emptied under the exclusive lock
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from ..image import fsio

STORE_FORMAT = "ckpt-store"
STORE_MAJOR = 1
STORE_MINOR = 0

STORE_JSON = "store.json"
LOCK = "lock"
JOURNAL = "journal.json"
SNAPSHOTS = "snapshots"
TRACKING = "tracking"
TMP = "tmp"
SNAPSHOT_JSON = "snapshot.json"  # sidecar inside each snapshot's image directory

MAX_JSON_BYTES = 16 << 20  # cap on any JSON file read from a store

# 20261125T231800Z-0007: UTC second of the snapshot, then the store-wide sequence
# number. Time first so ids read and sort naturally; the sequence number decides
# the order (clocks can step back) and makes ids unique within one second.
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-(\d{4,})$")


def make_id(t: float, seq: int) -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(t))}-{seq:04d}"


def parse_id(name: str) -> int | None:
    """The sequence number of a snapshot id, or None if `name` is not an id."""
    m = ID_RE.match(name)
    return int(m.group(2)) if m else None


def read_json(path: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Read a small JSON file; OSError / ValueError propagate for the caller to word."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return json.loads(data)


def write_json_atomic(path: str, obj: Any) -> None:
    """tmp + fsync + rename + fsync(dir): readers see the old file or the new one, whole."""
    data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode() + b"\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    with fsio.space_checked(os.path.dirname(path), os.path.basename(path)):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, fsio.FILE_MODE)
        try:
            fsio.write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)
        fsio.fsync_path(os.path.dirname(path))


def write_json_new(path: str, obj: Any) -> None:
    """Write a JSON file in a directory that is not published yet (fsync, no rename)."""
    data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode() + b"\n"
    with fsio.space_checked(os.path.dirname(path), os.path.basename(path)):
        fd = fsio.create_file(path)
        try:
            fsio.write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_usage(root: str) -> int:
    """Bytes allocated under root, each inode counted once (hard links share layers)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total
