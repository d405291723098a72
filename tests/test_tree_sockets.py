"""Sockets between the processes of a dumped tree (issue 5: socketpairs inside the tree,
a client/server pair over a unix socket and over TCP on loopback with data in flight).

The workload (tests/workloads/netpair.c) is a server process and its client child
streaming numbered records both ways over one socket, reading slowly so that both
directions are full at the dump. Restored, both ends read the other's stream to its
end and check every record (in order, none lost, none twice, message boundaries
kept); the parent prints one VERIFY line for both. The prefork mode is a parent
whose two workers accept on its (shared) TCP and unix listeners.
"""

from __future__ import annotations

import signal
import socket

import pytest
from helpers import DEADLINE, assert_error, proc_alive, proc_status, wait_until
from test_tree import reap_orphans

from ckpt.capture.sockets import _consistent
from ckpt.image import ImageReader
from ckpt.model import ProcessImage, TcpConn


def load(image) -> ProcessImage:
    with ImageReader(image) as r:
        return ProcessImage.from_dict(r.state)


def queued(sock) -> int:
    if sock.tcp is not None:
        return len(sock.tcp.inq) + len(sock.tcp.outq)
    return sum(len(m.data) for m in sock.queue)


def check_handed_over(image) -> None:
    """The child's socket went to the parent's image (fd -1, to be taken by slot 1),
    the child's own record is a socket_end, and both directions had data in flight."""
    root = load(image)
    child = root.tree[0]
    handed = [f for f in root.fds if f.kind == "socket" and f.fd == -1]
    assert handed and all(f.peer_slot == 1 for f in handed), root.fds
    ends = [f for f in child.fds if f.kind == "socket_end"]
    assert {f.fd for f in ends} == {f.peer_fd for f in handed}, child.fds
    assert all(f.peer_slot == 0 for f in ends)
    conn = next(f.socket for f in handed if f.socket.state in ("connected", "established"))
    peer = next(f.socket for f in root.fds if f.socket and f.socket.ino == conn.peer_ino)
    assert queued(conn) > 0 and queued(peer) > 0, "no data in flight at the dump"


def restore_tree(e2e, w, kids: list[int], *extra: str, check=None):
    """Dump w and its children, reap them, restore in the background; returns ckpt."""
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    if check is not None:
        check(image)
        shown = e2e.ckpt("show", str(image), "--json")
        assert shown.returncode == 0, str(shown)
    reap_orphans(kids)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    for pid in kids:
        e2e.adopt(pid)
        wait_until(lambda pid=pid: (proc_status(pid) or {}).get("TracerPid") == "0", DEADLINE,
                   f"member {pid} to run")  # fmt: skip
    assert int(proc_status(kids[0])["PPid"]) == w.pid
    return bg


def pair_round_trip(e2e, mode: str, *extra: str):
    w = e2e.spawn("netpair", mode)
    child = int(w.ready["child"])
    bg = restore_tree(e2e, w, [child], *extra, check=check_handed_over)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    # both streams went on past the records that were in flight at the dump
    assert int(v.fields["records"]) >= 5000 and int(v.fields["child_records"]) >= 5000, v.line
    assert bg.wait(DEADLINE).returncode == 0


@pytest.mark.parametrize("mode", ["stream", "seqpacket", "dgram"])
def test_socketpair_between_parent_and_child(e2e, mode):
    """A unix socketpair, one end in the parent, the other in the child."""
    pair_round_trip(e2e, mode)


def test_unix_listener_and_client_child(e2e):
    """The child connected to the parent's listener on a path (accepted there), plus a
    second connection still waiting in the listener's queue, accepted after restore."""
    pair_round_trip(e2e, "unix")


def test_unix_listener_in_child_client_parent(e2e):
    """The child listens and accepts, the parent is the client: the parent (first in
    the tree) rebuilds the child's listener and accepted end and hands them over."""
    pair_round_trip(e2e, "unixrev")


def test_tcp_loopback_between_parent_and_child(e2e):
    """Both ends of a loopback TCP connection in two members: TCP_REPAIR, no flag."""
    pair_round_trip(e2e, "tcp")


def test_tcp_capture_bound_is_snd_nxt():
    """The two ends of a loopback connection read while the kernel still sent for the
    frozen root (numbers of a capture that hung its restore): the root's read counts
    its whole send queue as unsent, the child's has received 28672 bytes of it. The
    dump must read again: restored so, neither end ever moves (capture/sockets.py)."""
    una, queued = 138552473, 2358240

    def conn(snd_seq: int, rcv_seq: int, outq: int, unsent: int) -> TcpConn:
        return TcpConn(snd_seq=snd_seq, rcv_seq=rcv_seq, outq=bytes(outq), unsent=unsent,
                       inq=b"", mss=65495, options=7, snd_wscale=10, rcv_wscale=10,
                       timestamp=0, window=[0] * 5)  # fmt: skip

    root = conn(una + queued, 2573000320, queued, queued)
    child = conn(2575174272, una + 28672, 2173952, 2173952)
    assert not _consistent(root, child)
    root_later = conn(una + queued, 2573000320, queued, queued - 28672)  # read again
    assert _consistent(root_later, child)


def test_tcp_pair_iterative(e2e):
    pair_round_trip(e2e, "tcp", "--iterative", "--max-rounds", "3")


def test_socketpair_iterative(e2e):
    pair_round_trip(e2e, "stream", "--iterative", "--max-rounds", "3")


def ask(connect, timeout: float = DEADLINE) -> str:
    """One request to the prefork server; its one-line answer."""
    with connect() as c:
        c.settimeout(timeout)
        c.sendall(b"hello\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = c.recv(64)
            assert chunk, f"connection closed after {buf!r}"
            buf += chunk
    return buf.decode().strip()


def test_prefork_server_serves_after_restore(e2e):
    """A parent's TCP and unix listeners shared by two workers (one open file
    description in three processes): after restore the workers accept again."""
    w = e2e.spawn("netpair", "prefork")
    workers = [int(w.ready["w1"]), int(w.ready["w2"])]
    port = int(w.ready["port"])
    path = str(w.cwd / "pre.sock")

    def tcp():
        return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)

    def unix():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        s.connect(path)
        return s

    assert ask(tcp).split()[0] in {f"pid={p}" for p in workers}
    bg = restore_tree(e2e, w, workers)
    assert int(proc_status(workers[1])["PPid"]) == w.pid
    answers = [ask(tcp) for _ in range(8)] + [ask(unix) for _ in range(8)]
    for a in answers:
        assert a.split()[0] in {f"pid={p}" for p in workers}, answers
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert int(v.fields["served"]) >= 17, (v.line, answers)
    assert bg.wait(DEADLINE).returncode == 0


def test_socketpair_peer_outside_dump_refused(e2e):
    """--no-tree: the child holding the other end is outside; refused by name, the
    whole tree runs on untouched."""
    w = e2e.spawn("netpair", "stream")
    child = int(w.ready["child"])
    res = e2e.dump(w.pid, e2e.path("img"), "--no-tree")
    assert_error(res, 5, "fd", "unix stream", "outside the process")
    for pid in (w.pid, child):
        assert proc_alive(pid)
        wait_until(lambda pid=pid: (proc_status(pid) or {}).get("TracerPid") == "0", DEADLINE,
                   f"{pid} to run untraced")  # fmt: skip
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


def test_tcp_peer_outside_dump_refused(e2e):
    """--no-tree: a loopback TCP connection to the child is an external peer."""
    w = e2e.spawn("netpair", "tcp")
    res = e2e.dump(w.pid, e2e.path("img"), "--no-tree")
    assert_error(res, 5, "fd", "127.0.0.1", "outside the process", "--tcp-established")
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
