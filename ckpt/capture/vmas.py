"""Turn /proc/PID/smaps entries into model Vmas, refusing unsupported kinds."""

from __future__ import annotations

import os
import re
import stat as statmod

from ..errors import UnsupportedProcess
from ..kernel import procfs, sysvshm
from ..kernel.native import PAGE_SIZE as PAGE
from ..kernel.procfs import Mapping
from ..model import FileRef, SysvShm, Vma

SPECIAL = {"[vdso]": "vdso", "[vvar]": "vvar", "[vvar_vclock]": "vvar_vclock"}
SYSV_NAME = re.compile(r"/SYSV[0-9a-f]{8}")


def file_ref(path: str, st: os.stat_result) -> FileRef:
    return FileRef(
        path=path, dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns
    )


def classify(pid: int, m: Mapping) -> Vma | None:
    """Model Vma for a mapping, or None for ones that are not restored ([vsyscall])."""
    name = m.name
    if name == "[vsyscall]":
        return None
    if name in SPECIAL:
        return Vma(kind=SPECIAL[name], start=m.start, end=m.end, prot=m.prot, shared=m.shared,
                   name=name, vmflags=list(m.vmflags))  # fmt: skip
    where = f"mapping {m.start:#x}-{m.end:#x} {name or '[anon]'}"
    if "ht" in m.vmflags:
        raise UnsupportedProcess(f"{where} is hugetlbfs memory (not supported yet)", pid=pid)
    if "pf" in m.vmflags or "io" in m.vmflags:
        raise UnsupportedProcess(f"{where} is a device/PFN mapping (not supported)", pid=pid)
    if "dp" in m.vmflags and (m.shared or m.inode):
        raise UnsupportedProcess(f"{where} is MAP_DROPPABLE but not anonymous", pid=pid)
    base = dict(
        start=m.start, end=m.end, prot=m.prot, shared=m.shared, name=name,
        offset=m.offset, vmflags=list(m.vmflags),
    )  # fmt: skip
    if name == "[heap]":
        return Vma(kind="heap", **base)
    if name == "[stack]":
        return Vma(kind="stack", **base)
    if m.inode == 0 or not name:
        if m.shared:
            return Vma(kind="shmem", **base)
        return Vma(kind="anon", **base)
    if m.shared and name == "/dev/zero" and m.deleted:
        return Vma(kind="shmem", **base)
    if m.deleted and name.startswith("/memfd:"):
        # content is saved with the memfd (capture/fd_kinds.py), not as pages
        return Vma(kind="memfd", **base)
    if m.deleted and SYSV_NAME.fullmatch(name):
        return Vma(kind="sysv", sysv=_sysv(pid, m, where), **base)
    if m.deleted:
        st = unlinked_mapping(pid, m)
        if st is not None:  # content saved with its Fd record (capture/unlinked.py)
            return Vma(kind="unlinked", file=file_ref(name, st), **base)
        if name == "/[aio]":
            raise UnsupportedProcess(
                f"process {pid}: {where} is an AIO ring (io_setup): not supported (its "
                "requests in flight and completions cannot be rebuilt)",
                pid=pid,
            )
        raise UnsupportedProcess(
            f"process {pid}: {where} maps a deleted name of a file that has other links, "
            "or a deleted special file: not supported",
            pid=pid,
        )
    if name.startswith("/"):
        try:
            st = os.stat(procfs.map_file(pid, m.start, m.end))
        except OSError as exc:
            raise UnsupportedProcess(
                f"{where}: cannot stat mapped file: {exc.strerror}", pid=pid
            ) from exc
        if not statmod.S_ISREG(st.st_mode):
            raise UnsupportedProcess(f"{where} maps a non-regular file", pid=pid)
        if (st.st_dev, st.st_ino) != _path_identity(name):
            raise UnsupportedProcess(f"{where}: the path now names a different file", pid=pid)
        return Vma(kind="file", file=file_ref(name, st), **base)
    raise UnsupportedProcess(f"{where}: unknown mapping kind", pid=pid)


SPECIAL_DELETED = ("/memfd:", "/SYSV", "/dev/zero")  # objects of their own (fd_kinds, shm)


def unlinked_mapping(pid: int, m: Mapping) -> os.stat_result | None:
    """The file a deleted mapping maps, when it is a regular file without any name left
    (capture/unlinked.py), else None."""
    if not (m.deleted and m.inode and m.name.startswith("/")) or m.name.startswith(SPECIAL_DELETED):
        return None
    try:
        st = os.stat(procfs.map_file(pid, m.start, m.end))
    except OSError:
        return None
    return st if statmod.S_ISREG(st.st_mode) and st.st_nlink == 0 else None


def _sysv(pid: int, m: Mapping, where: str) -> SysvShm:
    """The segment behind a /SYSV<key> mapping (its inode number is the shmid)."""
    seg = sysvshm.segments().get(m.inode)
    if seg is None:
        raise UnsupportedProcess(f"{where}: SysV segment {m.inode} not found", pid=pid)
    whole = (seg.size + PAGE - 1) // PAGE * PAGE
    if m.offset != 0 or m.end - m.start != whole:
        raise UnsupportedProcess(
            f"{where} attaches part of SysV segment {seg.shmid} (a split or partly "
            "unmapped attachment): not supported",
            pid=pid,
        )
    return SysvShm(shmid=seg.shmid, key=seg.key, size=seg.size, mode=seg.mode, uid=seg.uid,
                   gid=seg.gid)  # fmt: skip


def _path_identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def needs_pages(v: Vma) -> tuple[bool, bool]:
    """(save pages at all, include file/shmem pages) for a VMA kind."""
    if v.kind in ("vdso", "vvar", "vvar_vclock"):
        return (False, False)
    if v.kind in ("file", "memfd", "unlinked") and v.shared:
        # the data lives in the file (a memfd's or an unlinked file's is saved with it)
        return (False, False)
    if v.kind in ("shmem", "sysv"):
        return (False, False)  # stored by object, not by mapping (capture/shm.py)
    return (True, False)
