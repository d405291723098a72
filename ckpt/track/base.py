"""The tracker protocol the pre-copy loop talks to.

A round asks, per VMA that holds data: is it tracked? If so, which pages were
written since the last round (and re-arm them, atomically if the backend can)?
If not, start tracking it and copy it whole. This one question covers new,
moved, resized and re-created VMAs (DESIGN.md invariant 3).
"""

from __future__ import annotations

from ..kernel.procfs import Mapping
from ..kernel.remote import Injector


class Tracker:
    name = "base"
    #: the target must be frozen across collect() + after_collect() (soft-dirty)
    needs_freeze = False
    #: collect() results are already filtered to pages that hold data
    returns_present = False
    #: every change of presence (new data, zapped page) is reported as written, so
    #: the present map can be updated from collect() instead of re-read (present.py)
    exact_present = False

    def __init__(self, pid: int):
        self.pid = pid

    def arm(self, inj: Injector) -> None:
        """Set up tracking inside the target (frozen, injection open)."""

    def is_tracked(self, m: Mapping) -> bool:
        return False

    def track(self, m: Mapping) -> None:
        """Start tracking a VMA (its pages are then copied whole this round)."""

    def collect(self, m: Mapping) -> list[tuple[int, int]] | None:
        """Pages of a tracked VMA written since the last round, re-armed. None: copy whole."""
        return None

    def after_collect(self) -> None:
        """Called once per round after every collect() (soft-dirty clears here)."""

    def disarm(self) -> None:
        """Stop tracking and leave nothing behind in the target."""

    def cleanup_on_error(self) -> None:
        self.disarm()
