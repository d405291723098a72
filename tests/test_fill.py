"""The restore's fill of anonymous memory with UFFDIO_COPY (restore/fill.py): pages
inside the registered VMAs are placed by the kernel in one step, the others (outside,
or present already) written with process_vm_writev, and the memory is the same."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from ckpt.kernel import uffd
from ckpt.kernel.memory import fill_pieces
from ckpt.model import Vma
from ckpt.restore.fill import fillable

PAGE = 4096


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def test_fill_pieces_places_what_it_can_and_writes_the_rest():
    """In ckpt's own memory: a registered range with one page present already, pieces
    that cross into and out of it; every byte lands, and only the missing registered
    pages count as placed."""
    try:
        fd = uffd.uffd_create(os.O_CLOEXEC | os.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY)
    except OSError as exc:
        pytest.skip(f"no userfaultfd for this process ({exc.strerror}): restore writes instead")
    dst = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = mmap.mmap(-1, 20 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src[:] = os.urandom(20 * PAGE)
    mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    base = _addr(dst)
    lo, hi = base + 8 * PAGE, base + 40 * PAGE
    try:
        uffd.uffd_api(fd, 0)
        dst[10 * PAGE] = 7  # present before the range is registered: UFFDIO_COPY says EEXIST
        uffd.register_missing(fd, lo, hi)
        try:
            pieces = [(base + 4 * PAGE, 12, 0), (base + 36 * PAGE, 8, 12)]
            placed = fill_pieces(fd, [lo, hi], os.getpid(), mem, src, pieces)
        finally:
            uffd.unregister(fd, lo, hi)  # pages 16-35 stay missing: read them only after
        assert placed == (16 - 8 - 1) + (40 - 36)
        assert dst[4 * PAGE : 16 * PAGE] == src[: 12 * PAGE]
        assert dst[36 * PAGE : 44 * PAGE] == src[12 * PAGE : 20 * PAGE]
        assert dst[16 * PAGE : 36 * PAGE] == bytes(20 * PAGE)
        assert dst[: 4 * PAGE] == bytes(4 * PAGE) and dst[44 * PAGE :] == bytes(20 * PAGE)
    finally:
        os.close(mem)
        os.close(fd)
        dst.close()
        src.close()


def test_fill_without_userfaultfd_writes_everything():
    """uffd -1 (none could be made in the new process): all of it written, none placed."""
    dst = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    src = os.urandom(8 * PAGE)
    mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fill_pieces(-1, [], os.getpid(), mem, src, [(_addr(dst), 8, 0)]) == 0
        assert dst[:] == src
    finally:
        os.close(mem)
        dst.close()


def _vma(kind="anon", shared=False, flags=(), present=((0x1000, 1),), shm=-1):
    return Vma(0x1000, 0x3000, 3, shared, kind, "", vmflags=list(flags),
               present=[list(p) for p in present], shm=shm)  # fmt: skip


@pytest.mark.parametrize(
    ("vma", "always", "want"),
    [
        (_vma(), False, True),
        (_vma("heap"), False, True),
        (_vma("stack", flags=["gd"]), False, True),
        (_vma(present=()), False, False),  # nothing to write
        (_vma("file"), False, False),  # a private file mapping: MISSING mode refuses it
        (_vma(shared=True), False, False),  # shared memory is filled by object (shm.py)
        (_vma("shmem", shm=0), False, False),
        (_vma(flags=["hg"]), False, False),  # MADV_HUGEPAGE: faults make huge pages
        (_vma(), True, False),  # THP "always": the same
        (_vma(flags=["nh"]), True, True),  # MADV_NOHUGEPAGE under "always"
        (_vma(flags=["dp"]), False, False),  # MAP_DROPPABLE
    ],
)
def test_which_vmas_are_filled(vma, always, want):
    assert fillable(vma, always) is want
