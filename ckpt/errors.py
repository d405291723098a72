"""Every user-facing failure is one of these; each has its own exit code.

The CLI prints `ckpt: error: <message>` and exits with `exit_code`; nothing
else reaches the user (no tracebacks). Exceptions keep their constructor
arguments so they pickle (they cross thread and process boundaries).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CkptError(Exception):
    """Base class. `step` names the operation step that failed, when known."""

    exit_code = 1

    def __init__(self, message: str, *, pid: int | None = None, step: str | None = None):
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.step = step

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.pid, self.step))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls, message, pid, step):
    return cls(message, pid=pid, step=step)


class UsageError(CkptError):
    """Bad arguments that click itself could not catch."""

    exit_code = 2


class NoSuchProcess(CkptError):
    exit_code = 3


class AccessDenied(CkptError):
    exit_code = 4


class UnsupportedProcess(CkptError):
    """The target has something ckpt cannot checkpoint (the message says what)."""

    exit_code = 5


class ImageCorrupt(CkptError):
    """Empty, truncated or bit-flipped image, or a checksum mismatch."""

    exit_code = 6


class ImageVersionError(CkptError):
    exit_code = 7


class ImageNotFound(CkptError):
    exit_code = 8


class PidInUse(CkptError):
    exit_code = 9


class FileChanged(CkptError):
    """A file the image refers to changed or vanished since the dump."""

    exit_code = 10


class RestoreError(CkptError):
    exit_code = 11


class DumpError(CkptError):
    """The dump could not finish (e.g. the target exited); the target is left as it was."""

    exit_code = 12


class KernelUnsupported(CkptError):
    """The running kernel lacks a feature the operation needs."""

    exit_code = 13


class StoreBusy(CkptError):
    exit_code = 14


class ImageExists(CkptError):
    exit_code = 15


class NoTerminal(CkptError):
    """`ckpt restore --shell-job` without a controlling terminal on stdin/stdout/stderr."""

    exit_code = 16


class ImageUntrusted(CkptError):
    """An image (or the place one is written) that another user could have written or
    could change: owned by someone else, or writable by group or others."""

    exit_code = 17


class NoSpace(CkptError):
    """The file system an image is written to is full (or the user's quota is)."""

    exit_code = 18


class KernelError(CkptError):
    """A kernel operation on a process failed: raised by ckpt/kernel/ only.

    The kernel layer does not know which operation it serves, so it never raises
    DumpError or RestoreError: the operation's layer turns a KernelError into its own
    error at its boundary (`as_error`), and the exit code says which operation failed.
    One that reaches the CLI untranslated is a missing translation: exit 1."""


class TraceeGone(KernelError):
    """The traced process (or one of its threads) died or exited while ckpt worked on it."""


@contextmanager
def as_error(cls: type[CkptError]) -> Iterator[None]:
    """Turn a KernelError raised inside into `cls` (DumpError in a dump, RestoreError in
    a restore), keeping its message, pid and step; anything else passes unchanged."""
    try:
        yield
    except KernelError as exc:
        raise cls(exc.message, pid=exc.pid, step=exc.step) from exc
