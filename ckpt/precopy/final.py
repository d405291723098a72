"""The final round: the frozen process's state (capture/process.py) and the pages
written since the last pre-copy round (all of them without pre-copy), in one layer.

The present map of each VMA (which pages the image holds) comes from the rounds'
map when the tracker reports zapped pages exactly (uffd-wp on private anonymous
memory), else from pagemap, read now that nothing can change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import faults
from ..capture.pages import PageCopier
from ..capture.process import capture_process
from ..capture.shm import SharedMemory
from ..capture.sockets import SocketCapture
from ..capture.vmas import needs_pages
from ..kernel import features, native, procfs
from ..kernel.memory import present_runs
from ..kernel.procfs import Mapping
from ..kernel.ptrace import Tracee
from ..model import ProcessImage
from ..present import PresentMap
from ..track.base import Tracker
from .collect import collect, exact_kind


@dataclass
class FinalRound:
    proc: ProcessImage
    pages: int  # pages copied in this round
    bytes_stored: int


def final_round(
    tracee: Tracee,
    trk: Tracker,
    writer,
    *,
    sockets: SocketCapture,
    shm: SharedMemory,
    skip_fds: frozenset[int] | set[int] = frozenset(),
    whole: bool = False,
    prior_maps: list | None = None,
    present: PresentMap | None = None,
    base: int = 0,
    tree: frozenset[int] = frozenset(),
    tcp_established: bool = False,
    shell_job: bool = False,
) -> FinalRound:
    """whole: copy every page in this round (full snapshot). present: the rounds'
    present map; with a tracker that reports zapped pages it is updated by this
    round and used instead of re-reading pagemap. base: the process's page-key space."""
    proc, maps = capture_process(
        tracee, sockets=sockets, shm=shm, skip_fds=skip_fds, prior_maps=prior_maps, tree=tree,
        tcp_established=tcp_established, shell_job=shell_job,
    )  # fmt: skip
    pages, stored = _last_pages(proc, maps, trk, writer, whole=whole, present=present, base=base)
    return FinalRound(proc, pages, stored)


def _last_pages(
    proc: ProcessImage,
    maps: list[Mapping],
    trk: Tracker,
    writer,
    *,
    whole: bool,
    present: PresentMap | None,
    base: int,
) -> tuple[int, int]:
    """Copy the round's pages into a new layer and fill each VMA's present runs.
    Returns (pages copied, bytes stored)."""
    pid = proc.pid
    pm_fd = procfs.open_file(pid, "pagemap", os.O_RDONLY)
    copier = PageCopier(pid, base)
    try:
        zpfn = native.zero_pfn()
        use_scan = features.probe().pagemap_scan
        exact = present is not None and trk.exact_present
        # the runs of the mappings collect() reads whole: the same pages (the process is
        # frozen, and the copy only reads pages that hold data), not scanned again below
        scanned: dict[tuple[int, int, bool], list[tuple[int, int]]] = {}
        runs, _ = collect(
            pid, trk, pm_fd, zpfn, whole=whole, mappings=maps, present=present if exact else None,
            scanned=scanned,
        )  # fmt: skip
        layer = writer.begin_layer()
        pages = copier.copy(runs, layer, on_half=lambda: faults.point("read-pages"))
        for v in proc.vmas:
            save, include_file = needs_pages(v)
            if not save:
                continue
            if exact and exact_kind(v):
                runs = present.within(v.start, v.end)
            elif (v.start, v.end, include_file) in scanned:
                runs = scanned[(v.start, v.end, include_file)]
            else:
                runs = present_runs(pm_fd, v.start, v.end, include_file=include_file,
                                    zero_pfn=zpfn, use_scan=use_scan)  # fmt: skip
            v.present = [[a, n] for a, n in runs]
        lstats = layer.close()
    finally:
        os.close(pm_fd)
        copier.close()
    return pages, getattr(lstats, "bytes_stored", 0)
