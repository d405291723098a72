"""Regular files unlinked while still open or mapped (kind "unlinked").

A file removed from its directory lives on while an fd or a mapping holds it; nobody
can open it by name any more, so the restore cannot find it again: its content is
kept in the image, as for a memfd (the same budget, fd_kinds.MAX_FD_DATA), with its
mode and owner, once per file (its first fd record, or a record with fd = -1 when
only mappings hold it). Every fd and VMA of it names the file by its FileRef (dev,
ino, the path without " (deleted)"); restore/unlinked.py makes it again with
O_TMPFILE in the same directory, so on the same filesystem, and never with a name.

Refused (one line naming process and fd or mapping): a deleted name of a file that
still has other links (nlink > 0: its remaining names are unknown), a file whose
directory is gone or is another filesystem now (O_TMPFILE would make it elsewhere),
content beyond the budget.
"""

from __future__ import annotations

import errno
import os
import stat as statmod

from ..errors import UnsupportedProcess
from ..kernel import abi, fdobjs, procfs
from ..model import Fd, UnlinkedFile
from .fd_kinds import MAX_FD_DATA, FdScan
from .vmas import file_ref, unlinked_mapping

DELETED = " (deleted)"


def is_unlinked(target: str, st: os.stat_result) -> bool:
    """An fd (or mapping) of a regular file whose last name is gone."""
    return (
        statmod.S_ISREG(st.st_mode)
        and target.endswith(DELETED)
        and target.startswith("/")
        and st.st_nlink == 0
    )


def record(fd: int, target: str, flags: int, cloexec: bool, pos: int, st: os.stat_result) -> Fd:
    """The record of an fd on an unlinked file (its content comes in finish())."""
    path = target[: -len(DELETED)]
    return Fd(fd=fd, kind="unlinked", path=target, flags=flags, cloexec=cloexec, pos=pos,
              file=file_ref(path, st), obj_id=st.st_ino)  # fmt: skip


def finish(scan: FdScan, out: list[Fd], maps: list[procfs.Mapping]) -> None:
    """Each unlinked file of the process, fd or mapping, gets its content once: on its
    first fd record, or on a record with fd = -1 when only mappings hold it."""
    done: set[tuple[int, int]] = set()
    for f in out:
        if f.kind != "unlinked" or f.file is None:
            continue
        key = (f.file.dev, f.file.ino)
        if key not in done:
            done.add(key)
            where = procfs.fd_path(scan.pid, f.fd)
            f.unlinked = _content(scan, f"fd {f.fd}", f.file.path, where)
    for m in maps:
        st = unlinked_mapping(scan.pid, m)
        if st is None or (st.st_dev, st.st_ino) in done:
            continue
        done.add((st.st_dev, st.st_ino))
        rec = Fd(fd=-1, kind="unlinked", path=m.name + DELETED, flags=abi.O_RDWR, cloexec=True,
                 pos=0, file=file_ref(m.name, st), obj_id=st.st_ino)  # fmt: skip
        what = f"the mapping at {m.start:#x}"
        rec.unlinked = _content(scan, what, m.name, procfs.map_file(scan.pid, m.start, m.end))
        out.append(rec)


def _content(scan: FdScan, who: str, path: str, where: str) -> UnlinkedFile:
    """Read the file through `where` (a /proc link: a description of ckpt's own), after
    checking that its directory is still there, on the same filesystem."""
    directory = os.path.dirname(path) or "/"
    st = os.stat(where)
    try:
        dst = os.stat(directory)
        same = statmod.S_ISDIR(dst.st_mode) and dst.st_dev == st.st_dev
    except OSError:
        same = False
    if not same:
        raise UnsupportedProcess(
            f"{who} is an unlinked file ({path}) whose directory is gone or is another "
            "filesystem now (the restore makes the file again there with O_TMPFILE)",
            pid=scan.pid,
        )
    try:
        c = fdobjs.read_sparse(where, scan.budget)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise UnsupportedProcess(
                f"{who} is an unlinked file ({path}) holding more than ckpt keeps in an "
                f"image's state ({MAX_FD_DATA >> 20} MiB for all memfds, pipes and unlinked "
                "files together)",
                pid=scan.pid,
            ) from exc
        raise UnsupportedProcess(f"{who}: cannot read unlinked file {path}: {exc.strerror}",
                                 pid=scan.pid) from exc  # fmt: skip
    scan.budget -= sum(len(d) for _, d in c.extents)
    return UnlinkedFile(size=c.size, mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid,
                        extents=c.extents)  # fmt: skip


def link_tree(procs) -> None:
    """A file several members hold keeps its content on the first record in slot order;
    the others name it only (a mapping-only record of a later member goes)."""
    seen: set[tuple[int, int]] = set()
    for p in procs:
        keep = []
        for f in p.fds:
            if f.kind == "unlinked" and f.unlinked is not None and f.file is not None:
                key = (f.file.dev, f.file.ino)
                if key in seen:
                    f.unlinked = None
                    if f.fd < 0:
                        continue
                seen.add(key)
            keep.append(f)
        p.fds = keep
