"""Accept queues emptied before the freeze (issue 14).

A connection waiting in a listener's accept queue cannot be dumped: it has no fd
in the process, and a restored listener cannot be given it back (CRIU drops such
connections, --tcp-skip-in-flight). A server under light load almost always has
one: the capture found one in 3 of 4 dumps of nginx and 17 of 20 under
`pgbench -C`. A live server accepts within milliseconds, so the dump lets it:

1. hold new connection attempts to the tree's TCP listeners: a rule per listening
   address in the run's network lock table (kernel/netlock.py `hold_syn`) drops a
   SYN without ACK, so a client connecting now retransmits its SYN (1 s, 3 s, 7 s…)
   instead of landing in a queue;
2. while the target runs, poll sock_diag until every accept queue of the tree is
   empty and no handshake is half done (request sockets), for DRAIN_DEADLINE;
3. freeze, and look again: a connection whose handshake finished between the last
   look and the freeze (its SYN passed just before the rule; without nft, any) may
   be queued. Then thaw, wait, freeze again, FREEZE_TRIES times in all (without
   the SYN hold, UNHELD_FREEZE_TRIES: every freeze races new connections).

A queue still full at the deadline (the process does not accept), or after the
last try, is refused in one line naming the process, the fd and the address, and
the target runs on untouched; the rules go with the table (the orchestrator's
failure path). Where the rules stay after a good dump is the orchestrator's
decision (api/dumping.py: until the restore when this host restores).

Unix stream listeners get steps 2 and 3 for the connections of processes outside
the tree (a pending connection from a member is dumped in its queue); there is no
way to hold a unix connect, so one made while the process is frozen is still
refused by the capture.

Without nft (or when nft may not be used: no CAP_NET_ADMIN) only steps 2 and 3
run, and `unheld` counts the TCP listeners whose clients could not be held.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..errors import AccessDenied, CkptError, NoSuchProcess, UnsupportedProcess
from ..kernel import netlock, procfs, sockdiag
from .sockets import FAMILIES, SocketCapture, _addr, _name, _socket_fds
from .tree import descendants

DRAIN_DEADLINE = 2.0  # s for a running server to accept what waits (it takes milliseconds)
FREEZE_TRIES = 4  # freezes in all before a connection queued at the freeze is refused
UNHELD_FREEZE_TRIES = 10  # the same when some SYNs could not be held (no nft): more race
POLL = 0.002  # s between looks at the queues

_TCP_STATES = (1 << sockdiag.TCP_LISTEN) | (1 << sockdiag.TCP_SYN_RECV)
_UNIX_SHOW = sockdiag.UDIAG_SHOW_NAME | sockdiag.UDIAG_SHOW_ICONS

F = TypeVar("F")


@dataclass(frozen=True)
class Listener:
    """A listening socket of the tree: who holds it (the first holder found)."""

    pid: int
    fd: int
    ino: int
    family: int  # AF_INET, AF_INET6 or AF_UNIX
    local: tuple | bytes | None  # (address, port), or the unix name


@dataclass
class Waiting:
    """A listener with connections waiting to be accepted."""

    listener: Listener
    count: int  # connections in the accept queue (unix: from outside the tree)
    handshakes: int = 0  # TCP handshakes half done (they land in the queue next)


class AcceptQueues:
    """The tree's listeners, their accept queues, and the SYN holds of one run."""

    def __init__(self, root: int, tree: bool, sockets: SocketCapture):
        self.root, self.tree, self.sockets = root, tree, sockets
        self.listeners: dict[int, Listener] = {}  # by inode
        self.ours: set[int] = set()  # socket inodes the tree holds
        self.unheld: set[tuple] = set()  # TCP addresses whose SYNs could not be held
        self.freezes = 0  # freezes made (1 = no retry was needed)

    # -- the run

    def freeze(
        self,
        freeze: Callable[[], F],
        members: Callable[[F], list[int]],
        thaw: Callable[[F], None],
    ) -> tuple[F, float]:
        """freeze() once no accept queue of the tree holds a connection; returns what
        it returned and the monotonic time that freeze started. members: the PIDs
        frozen; thaw: undo a freeze (a connection was queued at it)."""
        while True:
            self._scan(self._live())
            self._drain()
            t = time.monotonic()
            frozen = freeze()
            self.freezes += 1
            try:
                self._scan(members(frozen))
                busy = [w for w in self._look() if w.count]
            except BaseException:
                thaw(frozen)
                raise
            if not busy:
                return frozen, t
            thaw(frozen)
            if self.freezes >= (UNHELD_FREEZE_TRIES if self.unheld else FREEZE_TRIES):
                raise self._refusal(busy[0], f"at each of {self.freezes} freezes")

    # -- listeners

    def _live(self) -> list[int]:
        return [self.root, *descendants(self.root)] if self.tree else [self.root]

    def _scan(self, pids: list[int]) -> None:
        """Find the listening sockets of `pids`; hold the SYNs of new TCP ones."""
        where: dict[int, tuple[int, int]] = {}
        for pid in pids:
            try:
                fds = _socket_fds(pid)
            except (NoSuchProcess, AccessDenied):
                continue  # a member that exited meanwhile (a zombie shows no fds)
            for ino, fd in fds.items():
                where.setdefault(ino, (pid, fd))
        self.ours = set(where)
        for fam in (socket.AF_INET, socket.AF_INET6) if where else ():
            for d in sockdiag.tcp_sockets(fam, 1 << sockdiag.TCP_LISTEN):
                if d.ino in where and d.ino not in self.listeners:
                    pid, fd = where[d.ino]
                    self.listeners[d.ino] = Listener(pid, fd, d.ino, fam, d.local)
                    self._hold(d.local)
        if where:
            for ino, d in sockdiag.unix_sockets(_UNIX_SHOW, 1 << sockdiag.TCP_LISTEN).items():
                if ino in where and ino not in self.listeners and d.type != socket.SOCK_DGRAM:
                    pid, fd = where[ino]
                    self.listeners[ino] = Listener(pid, fd, ino, socket.AF_UNIX, d.name)

    def _hold(self, local: tuple) -> None:
        if not netlock.available():
            self.unheld.add(local)
            return
        if self.sockets.lock is None:
            self.sockets.lock = netlock.NetLock()
        try:
            self.sockets.lock.hold_syn(local)
            self.sockets.let_marked_in()  # (a closed accepted socket is made through it)
        except CkptError:  # nft may not be used here (no CAP_NET_ADMIN): the retries only
            self.unheld.add(local)

    # -- queues

    def _look(self) -> list[Waiting]:
        """Every listener's waiting connections, now."""
        out: list[Waiting] = []
        tcp = {i: ln for i, ln in self.listeners.items() if ln.family != socket.AF_UNIX}
        for fam in {ln.family for ln in tcp.values()}:
            diag = sockdiag.tcp_sockets(fam, _TCP_STATES)
            found = {d.ino: d for d in diag if d.state == sockdiag.TCP_LISTEN}
            half = [d.local for d in diag if d.state == sockdiag.TCP_SYN_RECV]
            for ino, ln in tcp.items():
                if ln.family != fam or ino not in found:
                    continue  # closed meanwhile: nothing to wait for
                shakes = sum(1 for a in half if _same_port(ln.local, a))
                out.append(Waiting(ln, found[ino].rqueue, shakes))
        for ino, ln in self.listeners.items():
            if ln.family != socket.AF_UNIX:
                continue
            d = sockdiag.unix_socket(ino, _UNIX_SHOW)
            if d is not None:
                out.append(Waiting(ln, sum(1 for c in d.icons if c not in self.ours)))
        return out

    def _drain(self) -> None:
        """Wait while the target runs until no queue holds a connection and no TCP
        handshake is half done; at the deadline, a queue still full is refused (a
        handshake that never finishes is not waited for longer)."""
        end = time.monotonic() + DRAIN_DEADLINE
        while True:
            waiting = [w for w in self._look() if w.count or w.handshakes]
            if not waiting:
                return
            if time.monotonic() >= end:
                full = [w for w in waiting if w.count]
                if full:
                    raise self._refusal(full[0], f"for {DRAIN_DEADLINE:g} s")
                return
            time.sleep(POLL)

    def _refusal(self, w: Waiting, when: str) -> UnsupportedProcess:
        ln = w.listener
        try:
            comm = procfs.read_bytes(ln.pid, "comm").decode(errors="replace").strip()
        except (OSError, CkptError):
            comm = "?"
        if ln.family == socket.AF_UNIX:
            what = f"a listening unix socket on {_name(ln.local)}"
            whose, held = " from outside the process tree", ""
        else:
            what = f"a listening TCP/{FAMILIES[ln.family]} socket on {_addr(ln.local)}"
            whose = ""
            held = " (no nft: new connections could not be held)" if self.unheld else ""
        return UnsupportedProcess(
            f"process {ln.pid} ({comm}): fd {ln.fd} is {what} with {w.count} connection(s)"
            f"{whose} waiting to be accepted {when}{held}: not supported (a connection in an "
            "accept queue cannot be rebuilt; dump again when the process accepts)",
            pid=self.root,
        )


def _same_port(listening: tuple, local: tuple) -> bool:
    """Is a half-done handshake to `local` one for this listener (same port, and the
    listener's address or any)?"""
    if listening[1] != local[1]:
        return False
    addr = listening[0]
    return addr in ("0.0.0.0", "::") or addr == local[0] or addr == f"::ffff:{local[0]}"
