"""Named fault-injection points for tests (CRIU's fault-injection, in miniature).

`CKPT_FAULT=<name>` sets off the point of that name when ckpt reaches it: at a KILL
point ckpt SIGKILLs itself, so a test can prove what a killed ckpt leaves behind; at a
FAIL point the operation fails (RestoreError) and cleans up after itself; an ACT point
does something else a test needs (a delay, a dropped connection: transport/faults.py).

Point lists every point. point() and fail() take a Point or its name and raise
ValueError for a name that is not one (or one of the other kind), so a misspelt point
fails the first test that passes it rather than silently never firing.
"""

from __future__ import annotations

import os
import signal
from enum import Enum

KILL, FAIL, ACT = "kill", "fail", "act"


class Point(str, Enum):
    """Every fault point: its value is what CKPT_FAULT names, its kind what it does."""

    kind: str

    def __new__(cls, value: str, kind: str) -> Point:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.kind = kind
        return obj

    # -- dump and snapshot (KILL)
    SEIZED = "seized", KILL  # every thread of the target seized, nothing injected yet
    ARMED = "armed", KILL  # pre-copy: dirty tracking armed and ckpt detached, no round run
    ROUND = "round", KILL  # pre-copy: right after round 1 copied its pages
    INJECT_SETUP = "inject-setup", KILL  # the heal blob written and the mask set, before mmap
    INJECT = "inject", KILL  # mid-way through the injected sigaction reads
    INJECT_THREAD = "inject-thread", KILL  # inside one thread's own injection session
    READ_PAGES = "read-pages", KILL  # half of the final layer's pages copied
    WRITE_IMAGE = "write-image", KILL  # the state captured, the image not written yet
    COMMIT = "commit", KILL  # everything written, right before the image is published
    ARM_FAILS = "arm-fails", FAIL  # pre-copy: tracking armed in the target, then arming fails
    # -- store gc and compaction (KILL)
    GC_PLAN = "gc-plan", KILL  # the compaction planned, nothing built
    GC_BUILD = "gc-build", KILL  # the first compacted snapshot built in tmp/
    GC_BUILT = "gc-built", KILL  # every compacted snapshot built, no journal yet
    GC_JOURNAL = "gc-journal", KILL  # the journal written, nothing swapped
    GC_SWAP = "gc-swap", KILL  # the first old snapshot moved aside, its new one not in place
    GC_SWAPPED = "gc-swapped", KILL  # every new snapshot in place, nothing removed
    GC_REMOVE = "gc-remove", KILL  # the first snapshot to remove moved to tmp/
    GC_CLEANUP = "gc-cleanup", KILL  # the journal deleted, tmp/ not yet emptied
    # -- restore (FAIL)
    RESTORE_FILES = "restore-files", FAIL  # every process has its fds and attributes
    # -- migration (transport/faults.py)
    RECEIVE_MIDSTREAM = "receive-midstream", KILL  # the receiver, as layer 1 begins
    RECEIVE_RESTORE = "receive-restore", FAIL  # the receiver's restore, instead of running
    RECEIVE_SLOW_RESTORE = "receive-slow-restore", ACT  # the receiver waits 5 s first
    RECEIVE_STAGE = "receive-stage", FAIL  # the staged restore, applying layer 2's layout
    MIGRATE_CUT_FINAL = "migrate-cut-final", ACT  # the source drops the link after FROZEN


def known(name: str, kind: str | None = None) -> Point:
    """The Point called name (of that kind, when given); ValueError for anything else."""
    try:
        p = Point(name)
    except ValueError:
        raise ValueError(f"{name!r} is not a fault point (ckpt/faults.py lists them)") from None
    if kind is not None and p.kind != kind:
        raise ValueError(f"fault point {p.value!r} is a {p.kind} point, not a {kind} one")
    return p


def active(name: str, kind: str | None = None) -> bool:
    """Whether CKPT_FAULT names this (known) point."""
    return os.environ.get("CKPT_FAULT") == known(name, kind).value


def point(name: str) -> None:
    """SIGKILL ckpt here when CKPT_FAULT names this KILL point."""
    if active(name, KILL):
        os.kill(os.getpid(), signal.SIGKILL)


def fail(name: str, error: type[Exception] | None = None) -> None:
    """Raise `error` (RestoreError by default) here when CKPT_FAULT names this FAIL point."""
    if active(name, FAIL):
        from .errors import RestoreError

        what = "failed" if error is not None else "restore failed"
        raise (error or RestoreError)(f"{what}: injected fault (CKPT_FAULT={known(name).value})")
