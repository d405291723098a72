"""Regular files a process writes at its own offset: open write-only without O_APPEND
(`model.writes_at_offset`), such as redis' BGSAVE child writing temp-PID.rdb, or a
program's `> out` log.

What the restored process writes lands at its restored offset, so the file must hold
what it held at the dump, byte for byte: a file that changed meanwhile (the original
left running went on writing it, finished and renamed it away) would end up with the
restored writes over or beside bytes it never wrote — a corrupt RDB, silently. So
the dump keeps such a file's content (`Fd.content`), when it is small enough, and the
restore (restore/written.py) puts it back if the file changed, or makes it again at
its name if it is gone; without it the file must be unchanged (restore/checks.py),
else the restore is refused. docs/ARCHITECTURE.md "Files being written".

Content is kept only for a file that one fd record of the whole dump opened (dups and
fds inherited across fork share that one description) and that no process maps: the
file restored from it is then a new inode when it was gone, which only that one
description uses. It counts against the image's data budget (fd_kinds.MAX_FD_DATA),
at most WRITTEN_MAX per process; a larger file keeps no content (never a refusal at
the dump: the restore decides, on what the file is then).
"""

from __future__ import annotations

import errno
import os

from ..kernel import fdobjs, procfs
from ..model import Fd, ProcessImage, UnlinkedFile, writes_at_offset
from .fd_kinds import FdScan

# content of the files a process writes at its offset, in all (of the fd data budget)
WRITTEN_MAX = 32 << 20


def finish(scan: FdScan, out: list[Fd], maps: list[procfs.Mapping]) -> None:
    """Keep the content of each file the process writes at its offset, when it fits."""
    recs: dict[tuple[int, int], list[Fd]] = {}
    for f in out:
        if f.kind == "file" and f.file is not None and f.fd >= 0:
            recs.setdefault((f.file.dev, f.file.ino), []).append(f)
    mapped = {(os.makedev(m.dev_major, m.dev_minor), m.inode) for m in maps if m.inode}
    left = min(scan.budget, WRITTEN_MAX)
    for key, of_file in recs.items():
        rec = of_file[0]
        if len(of_file) > 1 or key in mapped or not writes_at_offset(rec):
            continue
        if rec.file.size > left:
            continue
        content = _content(procfs.fd_path(scan.pid, rec.fd), rec, left)
        if content is None:
            continue
        rec.content = content
        used = sum(len(d) for _, d in content.extents)
        left -= used
        scan.budget -= used


def _content(where: str, rec: Fd, limit: int) -> UnlinkedFile | None:
    """The file's content read through ckpt's own description (`where`, a /proc link),
    or None when it cannot be kept as the FileRef saw it (too large, or changed since:
    someone outside the frozen dump writes it too; the restore then wants it unchanged)."""
    try:
        c = fdobjs.read_sparse(where, limit)
        st = os.stat(where)
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.EACCES, errno.EPERM):
            return None
        raise
    ref = rec.file
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
        ref.dev, ref.ino, ref.size, ref.mtime_ns
    ) or c.size != ref.size:  # fmt: skip
        return None
    return UnlinkedFile(size=c.size, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid,
                        extents=c.extents)  # fmt: skip


def link_tree(procs: list[ProcessImage]) -> None:
    """A file opened by "file" records of two members (each its own description), or
    mapped by another member, keeps no content: the file made again from it would be
    a new inode the others do not use. (An fd inherited across fork is a "peer" of the
    first member's by now, capture/tree.py _link_fds: it takes that description.)"""
    holders: dict[tuple[int, int], int] = {}
    for p in procs:
        seen = {(f.file.dev, f.file.ino) for f in p.fds if f.kind == "file" and f.file}
        seen |= {(v.file.dev, v.file.ino) for v in p.vmas if v.file is not None}
        for key in seen:
            holders[key] = holders.get(key, 0) + 1
    for p in procs:
        for f in p.fds:
            if f.content is not None and holders.get((f.file.dev, f.file.ino), 0) > 1:
                f.content = None
