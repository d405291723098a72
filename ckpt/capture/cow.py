"""Copy-on-write sharing between a tree member and its parent (docs/ARCHITECTURE.md
"Process attributes", copy-on-write).

After fork, parent and child map the same physical pages in their private memory
until one of them writes: a forking server (postgres, nginx, redis during BGSAVE)
holds most of its memory once. /proc/PID/pagemap shows the page frame of each page
(to CAP_SYS_ADMIN): a page of the child's private anonymous VMA that maps the frame
its parent maps at the same address, in a VMA with the same range, is still shared.
Such runs are recorded on the child's VMA (`Vma.cow`, `Vma.cow_from`); the restore
forks the child from its restored parent once the parent's pages are in, keeps the
inherited VMA, and writes only the pages that are not shared (restore/tree.py).

The image still holds every page of the child (an older ckpt restores the tree with
two copies, as before, and the same content).
"""

from __future__ import annotations

import os
from array import array

from ..kernel import abi, native, procfs
from ..kernel.native import PAGE_SIZE
from ..model import ProcessImage, Vma

KINDS = ("anon", "heap", "stack")
# VmFlags that say nothing about the mapping itself (tracking, KSM, THP hints)
_IGNORED = {"sd", "uw", "um", "mg", "hg", "nh"}


def link_cow(procs: list[ProcessImage]) -> None:
    """Record, on each member's VMAs, the runs of pages it shares with its parent.
    The processes are still frozen. Without visible page frames (no CAP_SYS_ADMIN)
    nothing is shared at restore, as before."""
    if len(procs) < 2 or native.zero_pfn() == 0:
        return
    slot = {p.pid: i for i, p in enumerate(procs)}
    for p in procs[1:]:
        j = slot.get(p.ppid)
        if j is None:
            continue
        parent = procs[j]
        theirs = {(v.start, v.end): v for v in parent.vmas}
        pairs = [(v, theirs.get((v.start, v.end))) for v in p.vmas]
        pairs = [(v, u) for v, u in pairs if u is not None and _inherited(v, u)]
        if not pairs:
            continue
        fds = [os.open(procfs.path(x, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
               for x in (p.pid, parent.pid)]  # fmt: skip
        try:
            for v, _u in pairs:
                runs = _shared(fds[0], fds[1], v)
                if runs:
                    v.cow_from, v.cow = j, runs
        finally:
            for fd in fds:
                os.close(fd)


def _inherited(v: Vma, u: Vma) -> bool:
    """Could v (the child's) be u (the parent's) inherited across fork, unchanged?"""
    return (
        v.kind in KINDS and u.kind == v.kind and not v.shared and not u.shared
        and v.prot == u.prot and v.shm < 0 and u.shm < 0
        and "dc" not in u.vmflags and "wf" not in u.vmflags  # not inherited / wiped
        and set(v.vmflags) - _IGNORED == set(u.vmflags) - _IGNORED
    )  # fmt: skip


def _shared(child_fd: int, parent_fd: int, v: Vma) -> list[list[int]]:
    """Runs of v's present pages whose page frame is the parent's at the same address."""
    out: list[list[int]] = []
    for start, npages in v.present:
        off = start // PAGE_SIZE * 8
        mine, theirs = array("Q"), array("Q")
        mine.frombytes(os.pread(child_fd, npages * 8, off))
        theirs.frombytes(os.pread(parent_fd, npages * 8, off))
        for i in range(min(len(mine), len(theirs))):
            a, b = mine[i], theirs[i]
            pfn = a & abi.PM_PFN_MASK
            if a & b & abi.PM_PRESENT and pfn and pfn == b & abi.PM_PFN_MASK:
                addr = start + i * PAGE_SIZE
                if out and out[-1][0] + out[-1][1] * PAGE_SIZE == addr:
                    out[-1][1] += 1
                else:
                    out.append([addr, 1])
    return out
