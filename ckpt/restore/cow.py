"""Copy-on-write sharing with the parent, back (capture/cow.py).

A tree member is forked from its restored parent once the parent's pages are in
(restore/tree.py); a VMA whose pages it shared with the parent at the dump
(`Vma.cow`) is kept as inherited: the parent's pages it does not share are dropped
(MADV_DONTNEED: anonymous memory then reads zero), and only its own pages are
written. The pages it shares stay one physical copy for both, as before the dump.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ImageCorrupt
from ..kernel import abi, syscalls
from ..model import ProcessImage, Vma
from ..present import _runs, _spans, subtract

if TYPE_CHECKING:
    from .rebuild import Rebuilder


def check(p: ProcessImage, parent_slot: int, parent: ProcessImage) -> None:
    """A member's copy-on-write VMAs must name its parent and one of the parent's
    private VMAs with the same range (restore maps nothing else there)."""
    theirs = {(v.start, v.end) for v in parent.vmas if not v.shared}
    for v in p.vmas:
        if v.cow_from < 0:
            continue
        if v.cow_from != parent_slot or (v.start, v.end) not in theirs:
            raise ImageCorrupt(
                f"process {p.pid}: mapping {v.start:#x} is said to be shared with slot "
                f"{v.cow_from}, which is not its parent's same mapping"
            )


def inherited(proc: ProcessImage) -> list[tuple[int, int]]:
    """The VMAs a member keeps from its parent (prepare_memory leaves them mapped)."""
    return [(v.start, v.end) for v in proc.vmas if v.cow_from >= 0]


def keep(rb: Rebuilder, v: Vma) -> None:
    """The inherited VMA instead of a new one: drop every page it does not share."""
    for a, b in subtract([(v.start, v.end)], _spans(v.cow)):
        syscalls.madvise(rb.inj, a, b - a, abi.MADV_DONTNEED)


def to_write(v: Vma) -> list[tuple[int, int]]:
    """v's present runs without those it shares with the parent (already there)."""
    if v.cow_from < 0:
        return [(a, n) for a, n in v.present]
    return _runs(subtract(_spans(v.present), _spans(v.cow)))
