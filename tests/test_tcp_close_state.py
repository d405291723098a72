"""TCP state a process observes beyond its data (issue 14, "restored, but wrong"):
sockets in state CLOSE after a connection, shutdown(SHUT_RD), and the MSS of rebuilt
connections.

The workload (tests/workloads/tcpstate.c) records at setup what each socket shows
without being changed (names, state, poll mask, SIOCINQ, TCP_MAXSEG, tcpi_snd_mss,
buffer sizes) and compares it after the restore, then probes each socket the way a
program finds out (recv, SO_ERROR, connect, listen, send, bind of its port by another
socket and by itself). What cannot be made again exactly is refused at the dump with
one line, before the process loses anything.
"""

from __future__ import annotations

import signal
import socket

import pytest
from helpers import DEADLINE, assert_error, dump_restore_verify, proc_alive
from test_tcp_closing import Drop

from ckpt.image import ImageReader


def sockets_of(image) -> list[dict]:
    with ImageReader(str(image)) as r:
        state = r.state
    return [f["socket"] for f in state.get("fds", ()) if f.get("kind") == "socket"]


def test_closed_sockets_restored(e2e):
    """Sockets in state CLOSE after a connection (reset with the error unread, with
    unread data, after the peer's FIN; bound explicitly; a refused non-blocking
    connect; both FINs exchanged; disconnected since; accepted on a server's port,
    which connect() never gives): each shows the same names,
    state, poll mask, unread bytes, MSS and buffers, gives the same recv results and
    errors, holds its port or not as before, and connects again where it could."""
    w = e2e.spawn("tcpstate", "closed")
    image = e2e.path("img")
    dump_restore_verify(e2e, w, image=image)
    closed = [s["closed"] for s in sockets_of(image) if s.get("state") == "closed"]
    assert len(closed) == 8, closed
    assert sorted(c.get("error", 0) for c in closed) == [0, 0, 32, 104, 104, 104, 104, 111]
    assert [c.get("port_held", False) for c in closed].count(True) == 1  # #3's
    assert [c.get("disconnected", False) for c in closed].count(True) == 1  # #7


def test_shut_rd_restored(e2e):
    """shutdown(SHUT_RD) on a connection (recv gives 0 at once, data sent afterwards
    still arrives), on one shut for writing too (FIN_WAIT2: data arriving resets the
    connection), and on sockets without a connection (ENOTCONN, bits set)."""
    w = e2e.spawn("tcpstate", "shut")
    dump_restore_verify(e2e, w)


def test_loopback_mss_restored(e2e):
    """A restored loopback connection sends with the original's MSS (TCP_MAXSEG and
    tcpi_snd_mss read the same on both ends), not the 536-byte default's 524."""
    w = e2e.spawn("tcpstate", "mss")
    assert int(w.ready["mss1"]) > 1000 and int(w.ready["mss2"]) > 1000, w.ready
    dump_restore_verify(e2e, w)


def test_outside_connection_mss_restored(e2e):
    """The same for a connection whose peer is outside (--tcp-established): the ACK that
    has the kernel compute the MSS again gets through the dump's network lock."""
    lst = socket.socket()
    # a fixed buffer: the window this peer offers stops growing once the data is read (an
    # autotuned one goes on growing, and the restored socket, hearing of it, computes
    # its MSS again for the larger window as the original would have on its next ACK)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    conn = None
    try:
        w = e2e.spawn("tcpstate", "ext", str(lst.getsockname()[1]))
        lst.settimeout(DEADLINE)
        conn, _ = lst.accept()
        conn.settimeout(DEADLINE)
        got = 0
        while got < 16 << 16:
            got += len(conn.recv((16 << 16) - got))
        w.wait_for("READY", w.pid)
        image = e2e.path("img")
        e2e.dump_ok(w, image, "--tcp-established")
        bg = e2e.ckpt_bg("restore", "-D", str(image))
        e2e.wait_restored(w.pid, w.ident, bg)
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        assert conn.recv(1) == b"x"
        assert conn.recv(16) == b"after"
        assert bg.wait().returncode == 0
    finally:
        if conn is not None:
            conn.close()
        lst.close()


def test_pending_error_refused_when_left_running(e2e):
    """A dump that leaves the process running cannot read a closed socket's pending
    error without taking it (SO_ERROR is the only way the kernel shows it): refused
    with one line before anything is read, and the process still finds its error."""
    w = e2e.spawn("tcpstate", "closed")
    res = e2e.dump(w.pid, e2e.path("img"), "--leave-running")
    assert_error(res, 5, "fd ", "state CLOSE", "has not read yet", "leaves the process running")
    assert proc_alive(w.pid)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


def test_timed_out_connection_refused(e2e):
    """A connection that timed out (ETIMEDOUT pending: only the real peer's network
    gives it) is refused with one line, told from a reset by what the timeout left
    (TCP_INFO: it was retransmitting) before the error is read: the process runs on
    and still finds ETIMEDOUT."""
    drop = Drop()
    try:
        w = e2e.spawn("tcpstate", "timeout")
        drop.add(int(w.ready["cport"]), int(w.ready["sport"]))
        w.popen.send_signal(signal.SIGUSR1)
        w.wait_for("TIMEDOUT", w.pid)
        res = e2e.dump(w.pid, e2e.path("img"))
        assert_error(res, 5, "fd ", "state CLOSE", "timeout", "not supported")
        assert proc_alive(w.pid)
        v = e2e.verify(w, w.pid, signal.SIGUSR2)
        assert v.ok, v.line
    finally:
        drop.remove()


@pytest.mark.parametrize(
    ("closed", "needs"),
    [({"handshake": True, "error": 110}, "ETIMEDOUT"), ({"handshake": False, "error": 104}, "ECONNRESET"),
     ({"handshake": True, "error": 104, "fin": True}, "FIN")],
)  # fmt: skip
def test_closed_errors_ckpt_cannot_give(closed, needs):
    """Which pending errors kernel/tcp_closed.py can make again: a reset's (ECONNRESET,
    EPIPE after the peer's FIN), a refused connect's, none; not a timeout's."""
    from ckpt.kernel import tcp_closed

    why = tcp_closed.unsupported(closed["handshake"], closed["error"], closed.get("fin", False),
                                 False)  # fmt: skip
    assert why and needs in why
    assert tcp_closed.unsupported(True, 32, True, False) is None
    assert tcp_closed.unsupported(False, 111, False, False) is None
    assert tcp_closed.unsupported(True, 111, False, True) is None  # disconnected: any way


def test_state_version_of_closed_and_shut_sockets():
    """A closed TCP socket or a TCP shutdown state makes the state major 6 (a 5.x reader
    would bind the socket to its old port, or drop the bits without a word)."""
    from ckpt.model import state_version

    def st(**sock):
        s = {"ino": 5, "family": 2, "type": 1, "protocol": 6, "state": "bound", **sock}
        fd = {"fd": 3, "kind": "socket", "path": "socket:[5]", "flags": 2, "cloexec": False,
              "pos": 0, "socket": s}  # fmt: skip
        return {"pid": 10, "fds": [fd]}

    assert state_version(st())[0] < 6
    assert state_version(st(state="closed", closed={"handshake": True})) == (6, 0)
    assert state_version(st(shutdown=1)) == (6, 0)
