"""Async uffd-wp tracking: PAGEMAP_SCAN gets written pages and re-protects them atomically.

The userfaultfd is created inside the target (a uffd belongs to its creator's
mm) by an injected syscall, copied out with pidfd_getfd, and immediately
closed in the target: from then on only ckpt holds it, so when ckpt closes it
(or dies) the kernel unregisters every VMA and clears every wp bit — the
target is left with no extra fd and no write-fault overhead.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..kernel import procfs, syscalls
from ..kernel.procfs import Mapping
from ..kernel.remote import Injector
from ..kernel.uffd import TRACKING_UFFD_FLAGS, ScanError, WpAsyncContext
from .base import Tracker


@dataclass
class Handle:
    """Where persistent tracking lives in the target, to find it again next time."""

    pid: int
    starttime: int
    fd: int
    ino: int


class UffdWpTracker(Tracker):
    """uffd-wp tracker; `persistent` leaves the uffd in the target (snapshots).

    With persistent tracking the write-protect state lives in the target's page
    tables for as long as the target holds the uffd, so the next `ckpt
    snapshot` can pick it up (reattach) and copy only what was written since.
    """

    name = "uffd-wp"
    exact_present = True

    def __init__(self, pid: int, *, persistent: bool = False):
        super().__init__(pid)
        self.persistent = persistent
        self.ctx: WpAsyncContext | None = None
        self.target_fd = -1
        self.untrackable: set[tuple[int, int]] = set()

    def arm(self, inj: Injector) -> None:
        # Handshake only after the target's own fd is closed: if ckpt dies in
        # between, what is left in the target is an uninitialised uffd that the
        # next ckpt run recognises and closes (capture.state.close_leftover_uffds).
        fd = syscalls.userfaultfd(inj, TRACKING_UFFD_FLAGS)
        try:
            ctx = WpAsyncContext.adopt(self.pid, fd, handshake=False)
        except BaseException:
            syscalls.close(inj, fd)
            raise
        if self.persistent:
            self.target_fd = fd
        else:
            syscalls.close(inj, fd)
        try:
            ctx.handshake()
        except BaseException:
            ctx.close()
            if self.persistent:
                syscalls.close(inj, fd)
            raise
        self.ctx = ctx

    def handle(self, starttime: int) -> Handle:
        assert self.ctx is not None and self.target_fd >= 0
        return Handle(self.pid, starttime, self.target_fd, os.fstat(self.ctx.uffd).st_ino)

    def reattach(self, h: Handle) -> str | None:
        """Take the target's tracking uffd again; None on success, else why not."""
        link = procfs.fd_path(self.pid, h.fd)
        try:
            if os.readlink(link) != "anon_inode:[userfaultfd]" or os.stat(link).st_ino != h.ino:
                return f"the process no longer holds ckpt's tracking fd {h.fd}"
        except OSError:
            return f"the process no longer holds ckpt's tracking fd {h.fd} (closed, or exec'd)"
        try:
            ctx = WpAsyncContext.adopt(self.pid, h.fd, handshake=False)
        except OSError as exc:
            return f"cannot take the tracking fd: {exc.strerror}"
        if os.fstat(ctx.uffd).st_ino != h.ino:
            ctx.close()
            return "the tracking fd changed"
        self.ctx = ctx
        self.target_fd = h.fd
        return None

    def is_tracked(self, m: Mapping) -> bool:
        """Tracked by OUR uffd. `uw` alone is not enough: another ckpt (a snapshot
        store, another dump) may own the registration, and scanning with
        WP_MATCHING would re-arm ITS tracking and hide writes from it. Registering
        again with our context is a no-op if the VMA is ours and EBUSY if not."""
        if "uw" not in m.vmflags:
            return False
        assert self.ctx is not None
        try:
            self.ctx.register(m.start, m.end)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EINVAL, errno.ENOMEM, errno.EPERM):
                return False  # foreign (or gone): copied whole, never scanned
            raise
        return True

    def track(self, m: Mapping) -> None:
        assert self.ctx is not None
        try:
            self.ctx.register(m.start, m.end)
            self.ctx.protect_all(m.start, m.end)
            if "uw" not in m.vmflags:
                m.vmflags.append("uw")  # so a reuse of these flags knows it is tracked
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EBUSY, errno.ENOMEM):
                raise
            # Not registrable (special mapping, read-only shared file, or it just
            # vanished): it stays untracked and is copied whole every round.
            self.untrackable.add((m.start, m.end))

    def collect(self, m: Mapping) -> list[tuple[int, int]] | None:
        assert self.ctx is not None
        try:
            return list(self.ctx.collect(m.start, m.end, rearm=True))
        except ScanError:
            # The VMA changed under us (replaced by an unregistered one): the pages
            # reported before the failure were re-protected, so they cannot be used
            # alone; copy the VMA whole instead, which covers them.
            return None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOMEM, errno.EINVAL):
                return None
            raise

    def disarm(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
