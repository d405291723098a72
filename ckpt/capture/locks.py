"""File locks a process holds through its fds: flock, POSIX (fcntl F_SETLK), OFD locks
and leases, from the `lock:` lines of /proc/PID/fdinfo/N (restored by restore/locks.py).

Who owns a lock decides which record carries it, so that each is taken back once:

- flock, OFD locks and leases belong to the open file description: fdinfo shows them
  on every fd of it, in every process. They go on the description's one real record
  (never on a "dup"; capture/tree.py drops them from a "peer", whose description an
  earlier member of the tree restores and the later ones take with pidfd_getfd).
- POSIX locks belong to the process (not inherited over fork; released when it closes
  ANY fd of the file); fdinfo shows them on the fds of the description they were
  taken through. They go on that description's first fd in the process, "peer" or not.

What cannot be brought back exactly is refused here (exit 5, one line naming the
process and the fd): a lock on an fd whose restore makes a new object (pipe, socket,
eventfd…) or gives another file (a terminal, an fd leading outside the dump); flock
and OFD locks on a memfd (a memfd description shared across fork comes back as one
per process, each of which would take the lock); a lease on anything but a regular
file reopened by path, or one being broken.
"""

from __future__ import annotations

from ..errors import UnsupportedProcess
from ..kernel import procfs
from ..model import Fd, FileLock

# the fd kinds whose restore opens the same file again, with the same open file
# description for every fd that shared it: a lock can be taken on it as it was
DESCRIPTION_KINDS = frozenset({"file", "dir", "chr", "fifo"})
POSIX_KINDS = DESCRIPTION_KINDS | {"memfd"}  # a memfd: the process's lock on the object
LEASE_KINDS = frozenset({"file"})

KINDS = {"FLOCK": "flock", "POSIX": "posix", "OFDLCK": "ofd", "LEASE": "lease"}
NAMES = {"flock": "a flock", "posix": "a POSIX lock", "ofd": "an OFD lock", "lease": "a lease"}


def has_locks(raw: bytes) -> bool:
    """Does this fdinfo list a lock? (cheap: most fds hold none)"""
    return b"\nlock:" in raw


def attach(recs: list[Fd], held: dict[int, bytes], pid: int) -> None:
    """Give each fd record the locks its fdinfo (`held`: fd → fdinfo, for the fds whose
    fdinfo lists locks) shows, once per owner; refuse what cannot be taken back."""
    for rec in recs:
        raw = held.get(rec.fd)
        if raw is None or rec.kind == "dup":  # a dup: its description's first fd has them
            continue
        try:
            lines = procfs.parse_fd_locks(raw)
        except procfs.ProcParseError as exc:
            raise UnsupportedProcess(f"fd {rec.fd} ({rec.path}): {exc}", pid=pid) from None
        rec.locks = [_lock(rec, ln, pid) for ln in lines]


def _lock(rec: Fd, ln: procfs.FdLock, pid: int) -> FileLock:
    kind = KINDS.get(ln.kind)
    where = f"fd {rec.fd} ({rec.path})"
    if kind is None or ln.type not in ("READ", "WRITE"):
        raise UnsupportedProcess(
            f"{where} holds a {ln.kind} {ln.type} lock ckpt cannot take back", pid=pid
        )
    what = f"{NAMES[kind]} ({ln.type.lower()})"
    if kind == "lease" and ln.state != "ACTIVE":
        raise UnsupportedProcess(
            f"{where} holds a lease that is being broken ({ln.state}): dump again once "
            "the process has given it up",
            pid=pid,
        )
    allowed = {"posix": POSIX_KINDS, "lease": LEASE_KINDS}.get(kind, DESCRIPTION_KINDS)
    if rec.kind not in allowed:
        raise UnsupportedProcess(
            f"{where} is a {rec.kind} holding {what}: not restored on a {rec.kind}",
            pid=pid,
        )
    if kind in ("flock", "lease"):
        return FileLock(kind=kind, write=ln.type == "WRITE")
    return FileLock(kind=kind, write=ln.type == "WRITE", start=ln.start, end=ln.end)


def keep_on_peer(locks: list[FileLock]) -> list[FileLock]:
    """The locks a record keeps when it becomes a "peer" (the same open file description
    as an earlier tree member's fd): the process's own POSIX locks; the description's
    flock, OFD locks and lease come back with it, from that member."""
    return [lk for lk in locks if lk.kind == "posix"]
