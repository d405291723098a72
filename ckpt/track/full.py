"""No tracking: every round copies every page that holds data (correct, just slower)."""

from __future__ import annotations

from .base import Tracker


class FullTracker(Tracker):
    name = "full"
