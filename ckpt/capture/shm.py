"""Shared memory captured by object: each shmem object once, by offset, whoever wrote it.

Why not through the processes' page tables: a page of a MAP_SHARED object can be in
no dumped process's page tables at all (the child that wrote it exited; a process
only read other pages; PostgreSQL's backends come and go), and two processes that
write the same page would each store their own, possibly older, copy. So the
object itself is read, through an fd on it (kernel/shmobj.py): SEEK_DATA/SEEK_HOLE
say which pages hold data, and every such page is compared by digest with the copy
the image already holds. Only pages whose content changed are stored again.

The digest comparison is what makes pre-copy rounds and incremental snapshots exact
for shared memory: no write tracking can see writes made through another process's
mapping (one not tracked, or already exited), but content comparison does not care
who wrote. A round reads every data page of every object (memcpy speed plus a
17 GB/s digest); the freeze re-reads them all, so a page torn by a concurrent write
in a round is always superseded.

Per object, ckpt keeps one 8-byte digest per page (0: the image holds no copy), in
an anonymous mapping so that untouched parts of a huge sparse object cost nothing.
A snapshot's state carries the digests of its present pages (ShmObject.digest), so
the next snapshot continues from them.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import DumpError, UnsupportedProcess
from ..kernel import native, shmobj
from ..kernel.native import PAGE_SIZE
from ..kernel.procfs import Mapping
from ..model import MAX_SPACE, SHM_SPACE0, ShmObject, SysvShm, Vma, slot_base
from .vmas import SYSV_NAME

BATCH_PAGES = 2048  # 8 MiB per read
SHM_KINDS = ("shmem", "sysv")  # always objects; a shared "file" mapping is one on tmpfs


Ident = tuple[int, int, bool]  # (st_dev, st_ino, a SysV segment)


def ident_of(m: Mapping) -> Ident:
    """The key of the object a /proc/PID/maps line maps: (st_dev, st_ino, sysv).

    (dev, ino) alone does not tell objects apart: a SysV segment's inode number is its
    shmid (ipc/shm.c sets i_ino to it), on the same internal shmem mount as anonymous
    MAP_SHARED memory (and memfds), whose inode numbers count up on their own, so a
    segment and an anonymous object can show the same dev and inode (kernel.shm_next_id
    even chooses the id). Each tmpfs mount (/dev/shm) has its own dev."""
    return (os.makedev(m.dev_major, m.dev_minor), m.inode, shm_kind(m) == "sysv")


def _record_ident(o: dict) -> Ident:
    """The key of an object record of a state (ShmObject as a dict; every format)."""
    return (int(o["dev"]), int(o["ino"]), o.get("kind") == "sysv")


@dataclass
class _Object:
    kind: str
    space: int
    file: shmobj.ObjectFile
    table: mmap.mmap  # 8-byte digest per page of what the image holds (0: nothing)
    sysv: SysvShm | None = None
    extents: list[tuple[int, int]] | None = None  # (first_page, npages) at the last copy
    name: str = ""  # the path of a tmpfs file

    @property
    def npages(self) -> int:
        return (self.file.size + PAGE_SIZE - 1) // PAGE_SIZE


class SharedMemory:
    """The shared memory objects of one dump or snapshot run, and what the image holds.

    `prior`: the parent snapshot's objects (state dicts): an object still alive with
    the same identity and size keeps its key space and digests, so only what changed
    since is stored.

    `project`: a migration whose destination builds the process while the rounds
    arrive (restore/staged.py), which places pages by address: every object must be
    mapped whole by exactly one VMA (offset 0), and its pages are keyed by their
    address there instead of by object, then listed as that VMA's own (format 2.0
    style). Content is still read from the object and compared by digest. A VMA that
    moves makes its object go again whole at the new address.
    """

    def __init__(self, prior: Iterable[dict] = (), *, project: bool = False):
        self.project = project
        self.bases: dict[Ident, int] = {}  # project: the address of offset 0
        self.objects: dict[Ident, _Object] = {}
        self.prior = {_record_ident(o): o for o in prior}
        used = [int(o["space"]) for o in self.prior.values()]
        self._next_space = max([SHM_SPACE0 - 1, *used]) + 1
        self.order: list[Ident] = []  # objects the final capture refers to
        self.not_objects: set[Ident] = set()  # shared files not on tmpfs
        self._index: dict[Ident, int] = {}

    def close(self) -> None:
        for obj in self.objects.values():
            shmobj.close(obj.file)
            obj.table.close()
        self.objects.clear()

    # -- finding objects ----------------------------------------------------------------

    def discover(self, pid: int, maps: Iterable[Mapping], vmas: Iterable[Vma] = ()) -> None:
        """Open the objects `pid` maps that are not open yet (a pre-copy round).

        A mapping that vanished meanwhile is skipped: the final freeze sees the truth.
        """
        kinds = {v.start: v for v in vmas}
        shared = []
        for m in maps:
            if not m.shared or not m.inode:
                continue
            v = kinds.get(m.start)
            kind = v.kind if v is not None else shm_kind(m)
            if kind not in SHM_KINDS and not (kind == "file" and not self.project):
                continue
            if ident_of(m) in self.not_objects:
                continue
            if ident_of(m) not in self.objects:
                try:
                    if not self._open(pid, m, kind, v.sysv if v is not None else None):
                        continue
                except OSError:
                    continue
            shared.append(m)
        if self.project:
            self._place(pid, shared)

    def _place(self, pid: int, shared: list[Mapping]) -> None:
        """project: each object's address; an object moved since is stored whole again."""
        count: dict[Ident, int] = {}
        for m in shared:
            count[ident_of(m)] = count.get(ident_of(m), 0) + 1
        for m in shared:
            ident = ident_of(m)
            obj = self.objects.get(ident)
            if obj is None:
                continue
            whole = -(-obj.file.size // PAGE_SIZE) * PAGE_SIZE
            if count[ident] != 1 or m.offset != 0 or m.end - m.start != whole:
                raise DumpError(
                    f"process {pid} now maps shared memory at {m.start:#x} in a way the "
                    "destination cannot build while the rounds arrive (part of an object, "
                    "or one object twice); migrate again: it will go as an image"
                )
            if self.bases.get(ident) != m.start:
                self.bases[ident] = m.start
                obj.table[:] = bytes(len(obj.table))

    def ref(self, pid: int, m: Mapping, v: Vma) -> int:
        """Index of the object VMA `v` maps in the final capture (opened if new); -1
        for a shared file mapping whose file is not in memory (its data is the file's)."""
        if v.kind == "file" and (self.project or ident_of(m) in self.not_objects):
            return -1
        if not m.inode:
            raise UnsupportedProcess(
                f"mapping {v.start:#x}-{v.end:#x} is shared memory without an object", pid=pid
            )
        ident = ident_of(m)
        if ident not in self.objects:
            try:
                if not self._open(pid, m, v.kind, v.sysv):
                    return -1
            except OSError as exc:
                raise DumpError(
                    f"process {pid}: cannot open the shared memory at {v.start:#x}: "
                    f"{exc.strerror or exc}"
                ) from exc
        obj = self.objects[ident]
        obj.kind, obj.sysv = v.kind, v.sysv  # a round may have opened it from maps alone
        if self.project and ident in self._index:
            raise DumpError(
                f"process {pid} maps one shared memory object twice: the destination cannot "
                "build it while the rounds arrive; migrate again (it will go as an image)"
            )
        if self.project:
            self._place(pid, [m])
        if ident not in self._index:
            self._index[ident] = len(self.order)
            self.order.append(ident)
        return self._index[ident]

    def _open(self, pid: int, m: Mapping, kind: str, sysv: SysvShm | None) -> bool:
        """Open the object; False for a shared file mapping that is not on tmpfs."""
        ident = ident_of(m)
        f = shmobj.open_mapped(pid, m.start, m.end, ident[:2])
        if kind == "file" and not shmobj.on_shmem(f.fd):
            shmobj.close(f)
            self.not_objects.add(ident)
            return False
        try:
            npages = (f.size + PAGE_SIZE - 1) // PAGE_SIZE
            table = mmap.mmap(-1, max(npages, 1) * 8)
            prior = self.prior.get(ident)
            space = self._continue(prior, f, table) if prior is not None else -1
            if space < 0:
                space = self._new_space(pid)
        except BaseException:
            shmobj.close(f)
            raise
        self.objects[ident] = _Object(kind, space, f, table, sysv, name=m.name)
        return True

    def _new_space(self, pid: int) -> int:
        if self._next_space > MAX_SPACE:
            raise UnsupportedProcess(
                f"more than {MAX_SPACE - SHM_SPACE0 + 1} shared memory objects", pid=pid
            )
        space, self._next_space = self._next_space, self._next_space + 1
        return space

    @staticmethod
    def _continue(prior: dict, f: shmobj.ObjectFile, table: mmap.mmap) -> int:
        """Load the parent snapshot's digests of this object; its key space, or -1
        when they do not fit (then everything is stored again, in a new space)."""
        runs = [(int(a), int(n)) for a, n in prior.get("present") or ()]
        digest = prior.get("digest") or b""
        if int(prior.get("size", -1)) != f.size or len(digest) != 8 * sum(n for _, n in runs):
            return -1
        pos = 0
        for off, n in runs:
            first = off // PAGE_SIZE
            if off % PAGE_SIZE or (first + n) * 8 > len(table):
                return -1
            table[first * 8 : (first + n) * 8] = digest[pos : pos + 8 * n]
            pos += 8 * n
        return int(prior["space"])

    # -- copying ------------------------------------------------------------------------

    def copy(self, layer, only: Iterable[Ident] | None = None) -> int:
        """Store every page whose content differs from the image's copy; returns how
        many. `only`: the objects to copy (default: all open ones)."""
        done = 0
        for ident in list(only) if only is not None else list(self.objects):
            obj = self.objects[ident]
            obj.extents = shmobj.data_extents(obj.file.fd, obj.file.size)
            base = self.bases[ident] if self.project else slot_base(obj.space)
            for first, n in _pieces(obj.extents):
                buf = shmobj.read_pages(obj.file.fd, first, n)
                changed = native.diff_pages(buf, n, obj.table, first)
                if not changed:
                    continue
                runs = [(base + (first + i) * PAGE_SIZE, k) for i, k in changed]
                if len(changed) == 1 and changed[0] == (0, n):
                    data = buf
                else:
                    mv = memoryview(buf)
                    data = b"".join(mv[i * PAGE_SIZE : (i + k) * PAGE_SIZE] for i, k in changed)
                layer.add_runs(runs, data)
                done += sum(k for _, k in changed)
        return done

    def final(self, layer) -> tuple[list[ShmObject], int]:
        """The freeze: copy what changed in the objects the capture referred to, and
        their records (Vma.shm indexes them). Returns (records, pages stored).
        project: the records' present runs are addresses (see project_onto)."""
        pages = self.copy(layer, self.order)
        records = []
        for ident in self.order:
            obj = self.objects[ident]
            assert obj.extents is not None
            digest = b"".join(obj.table[a * 8 : (a + n) * 8] for a, n in obj.extents)
            f = obj.file
            rec = ShmObject(
                kind=obj.kind, space=obj.space, size=obj.file.size, dev=ident[0], ino=ident[1],
                present=[[a * PAGE_SIZE, n] for a, n in obj.extents], digest=digest,
                sysv=obj.sysv, name=obj.name if obj.kind == "file" else "",
                owner=[f.mode, f.uid, f.gid] if obj.kind == "file" else [],
            )  # fmt: skip
            records.append(rec)
        return records, pages


def project_onto(procs, records: list[ShmObject]) -> None:
    """project mode: each object's pages become its one VMA's own present pages (they
    were keyed by address), and the VMA a plain shared mapping again."""
    for p in procs:
        for v in p.vmas:
            if v.shm >= 0:
                v.present = [[v.start + a, n] for a, n in records[v.shm].present]
                v.shm = -1


def shm_kind(m: Mapping) -> str:
    """shmem / sysv / file / other, for a shared mapping, without classify()'s checks."""
    if m.deleted and SYSV_NAME.fullmatch(m.name):
        return "sysv"
    if not m.name or (m.name == "/dev/zero" and m.deleted):
        return "shmem"
    if m.name.startswith("/") and not m.deleted:
        return "file"
    return "other"


def _pieces(extents: list[tuple[int, int]]):
    for first, n in extents:
        while n:
            k = min(n, BATCH_PAGES)
            yield first, k
            first += k
            n -= k
