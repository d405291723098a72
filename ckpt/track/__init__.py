"""Dirty-tracking backends behind one small protocol (see base.Tracker)."""

from __future__ import annotations

from ..errors import KernelUnsupported
from .base import Tracker
from .full import FullTracker

NAMES = ("auto", "uffd-wp", "soft-dirty", "full")


def make_tracker(name: str, pid: int) -> Tracker:
    """Build the named backend; 'auto' takes the best one `ckpt check` finds working."""
    from ..kernel import features

    f = features.probe()
    if name == "auto":
        name = f.dirty_backend
    if name == "uffd-wp":
        if not (f.uffd_wp_async and f.uffd_wp_unpopulated and f.pagemap_scan):
            raise KernelUnsupported(
                "tracker uffd-wp needs userfaultfd WP_ASYNC + WP_UNPOPULATED and PAGEMAP_SCAN "
                "(Linux 6.7+); this kernel lacks them (see `ckpt check`)"
            )
        from .uffd_wp import UffdWpTracker

        return UffdWpTracker(pid)
    if name == "soft-dirty":
        if not f.soft_dirty:
            raise KernelUnsupported(
                "tracker soft-dirty needs CONFIG_MEM_SOFT_DIRTY, which this kernel lacks "
                "(see `ckpt check`)"
            )
        from .soft_dirty import SoftDirtyTracker

        return SoftDirtyTracker(pid)
    if name == "full":
        return FullTracker(pid)
    raise KernelUnsupported(f"unknown tracker {name!r} (choose from {', '.join(NAMES)})")


__all__ = ["NAMES", "Tracker", "make_tracker"]
