"""One round's page list: which pages of which VMAs to copy, from the tracker's
report (written since the last round) or, for what it does not track, pagemap."""

from __future__ import annotations

from ..capture.vmas import classify, needs_pages
from ..errors import UnsupportedProcess
from ..kernel import features, procfs
from ..kernel.memory import pagemap_filter, present_runs
from ..present import PresentMap
from ..track.base import Tracker


def collect(
    pid: int,
    tracker: Tracker,
    pm_fd: int,
    zero_pfn: int,
    *,
    whole: bool = False,
    mappings: list | None = None,
    present: PresentMap | None = None,
    scanned: dict[tuple[int, int, bool], list[tuple[int, int]]] | None = None,
) -> tuple[list[tuple[int, int]], int]:
    """One round's page list: written pages of tracked VMAs, all pages of the rest.

    whole: copy every page anyway (a full snapshot over tracking that was armed
    before), still re-arming what is tracked so the next round starts clean.
    Returns (runs holding data to copy, pages reported written). `present` is
    kept up to date (see present.py) when the tracker reports zapped pages.
    scanned: filled with the runs of each mapping read whole from pagemap, keyed
    (start, end, include_file): a frozen process's final round takes its VMAs'
    present runs from there instead of scanning each VMA again (two VMAs a thread).
    """
    to_copy: list[tuple[int, int]] = []
    written = 0
    for m in mappings if mappings is not None else procfs.smaps(pid):
        try:
            v = classify(pid, m)
        except UnsupportedProcess:
            continue  # refused by the final capture, with the message
        if v is None:
            continue
        save, include_file = needs_pages(v)
        if not save:
            continue
        runs = None
        if tracker.is_tracked(m):
            runs = tracker.collect(m)
            if whole:
                runs = None
            if runs is not None:
                written += sum(n for _, n in runs)
                reported = runs
                if not tracker.returns_present:
                    runs = pagemap_filter(pm_fd, runs, include_file=include_file, zero_pfn=zero_pfn)
                if present is not None and tracker.exact_present and exact_kind(v):
                    present.update(reported, runs)
        else:
            tracker.track(m)
        if runs is None:  # untracked, new, moved or re-created: copy whole
            runs = present_runs(pm_fd, m.start, m.end, include_file=include_file,
                                zero_pfn=zero_pfn, use_scan=features.probe().pagemap_scan)  # fmt: skip
            written += sum(n for _, n in runs)  # what it holds, not its (reserved) size
            if scanned is not None:
                scanned[(m.start, m.end, include_file)] = runs
            if present is not None:
                present.replace(m.start, m.end, runs)
        to_copy.extend(runs)
    tracker.after_collect()
    return to_copy, written


def exact_kind(v) -> bool:
    """VMAs whose zapped pages uffd-wp reports as written: private anonymous ones.

    Zapping file-backed memory (private file mappings, shmem) leaves a uffd-wp
    marker instead (the page can come back from the page cache), so those are
    re-read at the freeze.
    """
    return v.kind in ("anon", "heap", "stack") and not v.shared
