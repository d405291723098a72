"""The store lock: one flock on S/lock, exclusive for writers, shared for readers.

Why flock: Linux drops it when the holder dies (SIGKILL included), so a
killed snapshot or gc never leaves a stale lock behind; the next holder then
finds its leftovers (tmp/, journal.json) and cleans up. The exclusive holder
writes "pid op" into the file so a blocked caller can say who holds the store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from ..errors import StoreBusy

POLL = 0.05


class StoreLock:
    """One lock acquisition on a store's lock file (not re-entrant; Store nests for you)."""

    def __init__(self, path: str, store_name: str):
        self.path = path
        self.store_name = store_name
        self._fd: int | None = None
        self.shared = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0, *, shared: bool = False, op: str = "") -> None:
        """Take the lock, polling up to `wait` seconds; StoreBusy after that."""
        if self._fd is not None:
            raise RuntimeError("store lock already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._take(fd, shared, wait, op)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.shared = shared
        if not shared:
            self._write_holder(op)

    def _take(self, fd: int, shared: bool, wait: float, op: str) -> None:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fd, mode)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreBusy(self._busy_message(fd, wait, op))
            time.sleep(min(POLL, left))

    def convert(self, shared: bool, wait: float = 0.0, op: str = "") -> None:
        """Switch between shared and exclusive (not atomic: flock drops the old lock first)."""
        assert self._fd is not None
        self._take(self._fd, shared, wait, op)
        self.shared = shared
        if shared:
            os.ftruncate(self._fd, 0)  # no longer the exclusive holder
        else:
            self._write_holder(op)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.shared:
                os.ftruncate(fd, 0)  # nobody holds it exclusively any more
        finally:
            os.close(fd)  # closing the last fd of the open file drops the flock

    def _write_holder(self, op: str) -> None:
        assert self._fd is not None
        data = f"{os.getpid()} {op or 'ckpt'}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _busy_message(self, fd: int, wait: float, op: str) -> str:
        try:
            text = os.pread(fd, 256, 0).decode(errors="replace").split()
        except OSError:
            text = []
        who = "another ckpt is reading it (verify, restore or list)"
        if len(text) >= 2 and text[0].isdigit() and _alive(int(text[0])):
            who = f"{text[1]} is running (pid {text[0]})"
        waited = f" after waiting {wait:g} s" if wait > 0 else ""
        return f"store {self.store_name} is busy{waited}: {who}; try again or pass --wait SECONDS"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
