"""Refuse at the start what the final capture would refuse, before any pre-copy round.

An unsupported fd or mapping (an outside TCP peer without --tcp-established, a
terminal without --shell-job, a hugetlbfs mapping…) is otherwise found only at the
freeze, after seconds of rounds — or, for a migration, after the whole memory
crossed the network. The check reads each process of the tree as the final capture
will, while it runs (sockets are inspected but not put in repair mode, nothing is
injected), so it costs milliseconds. What only a frozen process shows (a queue that
changes meanwhile) is still checked again at the freeze.
"""

from __future__ import annotations

from ..capture.fds import capture_fds
from ..capture.sockets import SocketCapture
from ..capture.tree import check_member, descendants, fd_tables
from ..capture.vmas import classify
from ..errors import NoSuchProcess
from ..kernel import procfs


def preflight(
    pid: int, *, tree: bool = True, tcp_established: bool = False, shell_job: bool = False,
    consume_errors: bool = False,
) -> None:  # fmt: skip
    """Raise the final capture's refusal for `pid` (and, with `tree`, every live
    descendant) now; return quietly when nothing would be refused. consume_errors: the
    dump kills the process (capture/sockets.py SocketCapture)."""
    members = [p for p in descendants(pid) if not check_member(p, pid)] if tree else []
    everyone = frozenset([pid, *members])
    try:  # fd tables shared (clone(CLONE_FILES)) in a way the restore cannot fork again
        fd_tables([pid, *members])  # (first: the fds such a process shares look outside)
    except NoSuchProcess:
        pass  # a member that exited meanwhile: the freeze looks again
    for p in [pid, *members]:
        sockets = SocketCapture(consume_errors=consume_errors)
        try:
            capture_fds(p, sockets=sockets, tcp_established=tcp_established,
                        tree=everyone - {p}, shell_job=shell_job, check_only=True)  # fmt: skip
            for m in procfs.smaps(p):
                classify(p, m)
        except NoSuchProcess:
            if p == pid:
                raise
            continue  # a descendant that exited meanwhile is not part of the dump
        finally:
            sockets.close()
    if tree:  # groups and sessions the restore could not make again
        from .sessions import preflight_sessions  # (api/sessions.py)

        preflight_sessions(pid, members, shell_job=shell_job)
