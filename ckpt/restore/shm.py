"""Shared memory objects at restore: made once, mapped by every VMA of the tree that
mapped them, and filled once from the image, by offset (capture/shm.py).

The first VMA (in tree order) of an object makes it: MAP_SHARED|MAP_ANONYMOUS of the
object's whole size (a VMA covering only part of it maps the object made at a
temporary place), or the SysV segment attached again. Every later VMA maps that
object through /proc/<first>/map_files with its own offset, so all of them share one
object, as they did. The content goes in from ckpt's side through an fd on the object,
so pages that no VMA maps right now come back too.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

from ..errors import ImageCorrupt, RestoreError
from ..kernel import native, shmobj
from ..kernel.native import PAGE_SIZE
from ..model import MAX_SPACE, SHM_SPACE0, ProcessImage, ShmObject, slot_base

_ZERO = bytes(1 << 20)


@dataclass(frozen=True)
class Owner:
    """Where an object made by this restore is mapped (PID and VMA), and whether it is
    new (reads zero where the image has nothing) or an existing SysV segment."""

    pid: int
    start: int
    end: int
    fresh: bool


@dataclass
class SharedObjects:
    """The tree's objects (the root's `shm` list) and who made each so far."""

    objects: list[ShmObject] = field(default_factory=list)
    owners: dict[int, Owner] = field(default_factory=dict)

    def get(self, index: int) -> ShmObject:
        if not 0 <= index < len(self.objects):
            raise RestoreError(f"the image has no shared memory object {index}")
        return self.objects[index]

    def fill(self, reader) -> int:
        """Write every object's pages from the image; returns pages written."""
        done = 0
        for i, obj in enumerate(self.objects):
            owner = self.owners.get(i)
            if owner is None:
                raise RestoreError(f"shared memory object {i} was never mapped")
            base = slot_base(obj.space)
            plan = reader.plan([(base + a, n) for a, n in obj.present])
            try:
                f = shmobj.open_mapped(owner.pid, owner.start, owner.end, None, write=True)
            except OSError as exc:
                raise RestoreError(
                    f"cannot open shared memory object {i} to fill it: {exc.strerror or exc}"
                ) from exc
            try:
                if not owner.fresh:  # an existing segment or file: exactly the image's
                    _punch_outside(f.fd, obj)
                for key, data in reader.iter_data(plan):
                    shmobj.write_pages(f.fd, key - base, data)
                if not owner.fresh:
                    for key, n in plan.zero:
                        for off in range(0, n * PAGE_SIZE, len(_ZERO)):
                            size = min(len(_ZERO), n * PAGE_SIZE - off)
                            shmobj.write_pages(f.fd, key - base + off, _ZERO[:size])
            finally:
                shmobj.close(f)
            done += sum(n for _, n in obj.present)
        return done


def _punch_outside(fd: int, obj: ShmObject) -> None:
    """Pages the object did not hold at the dump read as zero again (runs, not pages)."""
    pos = 0
    for a, n in [*obj.present, [-(-obj.size // PAGE_SIZE) * PAGE_SIZE, 0]]:
        if a > pos:
            shmobj.punch(fd, pos, a - pos)
        pos = a + n * PAGE_SIZE


def check_not_in_use(root: ProcessImage) -> None:
    """An existing object the restore fills (a SysV segment that is still there, a tmpfs
    file) must not be in use by a live process with other content: it would be
    overwritten under it (e.g. the original, still running next to a --new-pid
    restore). A user whose object holds exactly the image's content (a migration's
    frozen source on the same host) loses nothing."""
    for i, o in enumerate(root.shm):
        if o.kind == "shmem":
            continue  # made new by the restore
        for pid, start, end in shmobj.mappers(o.dev, o.ino, sysv=o.kind == "sysv"):
            if not _holds_image_content(o, pid, start, end):
                what = o.name or (f"SysV segment {o.sysv.shmid}" if o.sysv else f"object {i}")
                raise RestoreError(
                    f"shared memory {what} is in use by process {pid} and its content "
                    "differs from the image's: restoring would overwrite it (stop that "
                    "process first)"
                )


def _holds_image_content(obj: ShmObject, pid: int, start: int, end: int) -> bool:
    """The live object has data exactly where the image does, with the same digests."""
    try:
        f = shmobj.open_mapped(pid, start, end, (obj.dev, obj.ino))
    except OSError:
        return True  # gone meanwhile: nobody left to disturb
    table = None
    try:
        if f.size != obj.size or not obj.digest:
            return False
        runs = [(a // PAGE_SIZE, n) for a, n in obj.present]
        if shmobj.data_extents(f.fd, f.size) != runs:
            return False
        table = mmap.mmap(-1, max(1, sum(n for _, n in runs)) * 8)
        table[: len(obj.digest)] = obj.digest
        pos = 0
        for first, n in runs:
            for k in range(0, n, 2048):
                cnt = min(2048, n - k)
                buf = shmobj.read_pages(f.fd, first + k, cnt)
                if native.diff_pages(buf, cnt, table, pos + k):
                    return False
            pos += n
        return True
    finally:
        shmobj.close(f)
        if table is not None:
            table.close()


def check_objects(root: ProcessImage) -> None:
    """Every field of the objects and of the VMAs that refer to them, before anything
    is built: a corrupt image must not half-restore."""
    objs = root.shm
    spaces = set()
    for i, o in enumerate(objs):
        where = f"shared memory object {i}"
        if o.kind not in ("shmem", "sysv", "file") or (o.kind == "sysv") != (o.sysv is not None):
            raise ImageCorrupt(f"{where}: bad kind {o.kind!r}")
        if not SHM_SPACE0 <= o.space <= MAX_SPACE or o.space in spaces:
            raise ImageCorrupt(f"{where}: bad page-key space {o.space}")
        spaces.add(o.space)
        if not 0 < o.size < 1 << 47:
            raise ImageCorrupt(f"{where}: bad size {o.size}")
        limit = -(-o.size // PAGE_SIZE) * PAGE_SIZE  # a SysV segment's size is in bytes
        total = 0
        end = 0
        for run in o.present:
            if len(run) != 2:
                raise ImageCorrupt(f"{where}: malformed page run {run!r}")
            a, n = run
            if a % PAGE_SIZE or n <= 0 or a < end or a + n * PAGE_SIZE > limit:
                raise ImageCorrupt(f"{where}: page run {a:#x}+{n} outside the object")
            end = a + n * PAGE_SIZE
            total += n
        if len(o.digest) not in (0, 8 * total):
            raise ImageCorrupt(f"{where}: digest does not match its pages")
    for slot, p in enumerate([root, *root.tree]):
        for v in p.vmas:
            if v.shm < 0:
                continue
            if v.shm >= len(objs) or objs[v.shm].kind != v.kind:
                raise ImageCorrupt(
                    f"process slot {slot}: mapping {v.start:#x} refers to shared memory "
                    f"object {v.shm}, which the image does not have"
                )
            if (
                v.offset % PAGE_SIZE
                or v.offset + v.size > -(-objs[v.shm].size // PAGE_SIZE) * PAGE_SIZE
            ):
                raise ImageCorrupt(
                    f"process slot {slot}: mapping {v.start:#x} lies outside its object"
                )
