"""TCP connections in closing states survive dump + restore (issue 14).

FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, CLOSING and LAST_ACK (kernel/tcp_repair.py: the
sequences without the FINs, rebuilt ESTABLISHED, the FINs played again). The
transient states are held by the test: an nftables table of its own drops one
direction of a connection (our FIN or our acknowledgement never arrives), and is
removed only after the restore, when the test has checked that every connection is
back in its state. Then both ends read what the other sent to its end (EOF where
there was one), write where they still may, and close: a reset anywhere fails.

The workload is tests/workloads/tcpclose.c: "pairs" (both ends of four loopback
connections in one process), "tree" (the same, the connecting ends in a child),
"ext" (five connections whose peer is this test: --tcp-established).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest
from helpers import DEADLINE, proc_status, wait_until
from test_sockets import pat
from test_tree import reap_orphans

from ckpt import model
from ckpt.image import ImageReader
from ckpt.schema import SchemaError, build

STATES = {1: "ESTABLISHED", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE",
          8: "CLOSE_WAIT", 9: "LAST_ACK", 11: "CLOSING"}  # fmt: skip


def tcp_states() -> dict[tuple[int, int], str]:
    """(local port, remote port) → state, for the TCP sockets on 127.0.0.1."""
    out = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":"), fields[2].split(":")
            if local[0] != "0100007F":
                continue
            key = (int(local[1], 16), int(remote[1], 16))
            out[key] = STATES.get(int(fields[3], 16), fields[3])
    return out


def wait_states(expected: dict[tuple[int, int], str], what: str) -> None:
    def ok() -> bool:
        now = tcp_states()
        return all(now.get(k) == v for k, v in expected.items())

    try:
        wait_until(ok, 10, what)
    except AssertionError:
        now = tcp_states()
        raise AssertionError(
            f"{what}: " + ", ".join(f"{k}: {now.get(k)} (want {v})" for k, v in expected.items())
        ) from None


class Drop:
    """An nftables table of the test's own: drops the segments from one port to another
    (output hook: the sender's kernel keeps them queued, as if the peer never got them)."""

    def __init__(self) -> None:
        self.name = f"ckpttest_{os.getpid()}_{os.urandom(3).hex()}"
        self._nft(
            f"table inet {self.name} {{\n"
            "  chain output { type filter hook output priority 0; policy accept; }\n}\n"
        )
        self.live = True

    def _nft(self, script: str) -> None:
        r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    def add(self, sport: int, dport: int) -> None:
        self._nft(
            f"add rule inet {self.name} output ip saddr 127.0.0.1 ip daddr 127.0.0.1 "
            f"tcp sport {sport} tcp dport {dport} drop\n"
        )

    def remove(self) -> None:
        if self.live:
            self.live = False
            self._nft(f"delete table inet {self.name}\n")


@pytest.fixture
def drop():
    d = Drop()
    try:
        yield d
    finally:
        d.remove()


def image_states(image) -> list[int]:
    with ImageReader(str(image)) as r:
        state = r.state
    procs = [state, *state.get("tree", ())]
    return sorted(
        f["socket"]["tcp"]["state"]
        for p in procs
        for f in p.get("fds", ())
        if f.get("kind") == "socket" and (f.get("socket") or {}).get("tcp")
    )


def read_to_end(s: socket.socket) -> bytes:
    """Everything until EOF (a reset raises ConnectionResetError: the test fails)."""
    s.settimeout(DEADLINE)
    out = bytearray()
    while chunk := s.recv(65536):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("mode", ["pairs", "tree"])
def test_closing_loopback_pairs(e2e, drop, mode):
    """Both ends in the dump: FIN_WAIT2/CLOSE_WAIT with data queued both ways,
    FIN_WAIT1 with its FIN behind unsent data, FIN_WAIT1/LAST_ACK and CLOSING/FIN_WAIT1
    (one direction dropped by the test). Each end is back in its state after the
    restore, with the FINs where they were; once the test lets the segments through,
    every byte and every EOF arrives and the connections close without a reset."""
    w = e2e.spawn("tcpclose", mode)
    port = int(w.ready["port"])
    _, f = w.wait_for("CONNECTED", w.pid)
    p3, p4 = int(f["p3"]), int(f["p4"])
    drop.add(port, p3)  # s3 -> c3: c3's FIN is never acknowledged, s3's FIN never arrives
    drop.add(p4, port)  # c4 -> s4: c4's FIN never arrives, s4's FIN is never acknowledged
    os.kill(w.pid, signal.SIGUSR1)
    _, f = w.wait_for("CLOSED", w.pid)
    child = int(f["child"])
    # the ends of c1 and c2: the connections to `port` other than c3's and c4's
    c12 = sorted(
        lp for lp, rp in tcp_states() if rp == port and lp not in (p3, p4) and (port, lp) in
        tcp_states()
    )  # fmt: skip
    assert len(c12) == 2, tcp_states()
    expected = {(p3, port): "FIN_WAIT1", (port, p3): "LAST_ACK",
                (p4, port): "CLOSING", (port, p4): "FIN_WAIT1"}  # fmt: skip
    by_state = {tcp_states()[(lp, port)]: lp for lp in c12}
    assert set(by_state) == {"FIN_WAIT2", "FIN_WAIT1"}, by_state
    p1, p2 = by_state["FIN_WAIT2"], by_state["FIN_WAIT1"]
    expected |= {(p1, port): "FIN_WAIT2", (port, p1): "CLOSE_WAIT",
                 (p2, port): "FIN_WAIT1", (port, p2): "ESTABLISHED"}  # fmt: skip
    wait_states(expected, "the states before the dump")

    image = e2e.path("img")
    e2e.dump_ok(w, image)
    assert image_states(image) == [1, 4, 4, 4, 5, 8, 9, 11]
    if mode == "tree":
        reap_orphans([child])
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    if mode == "tree":
        e2e.adopt(child)
        wait_until(lambda: (proc_status(child) or {}).get("TracerPid") == "0", DEADLINE,
                   "the child to run")  # fmt: skip
    wait_states(expected, "the states after the restore")

    drop.remove()
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait(DEADLINE).returncode == 0


def test_closing_outside_peer(e2e, drop):
    """The peer is this test (--tcp-established): CLOSE_WAIT, FIN_WAIT2, FIN_WAIT1,
    LAST_ACK and CLOSING. The restore sends the peer's FIN (and its acknowledgement of
    ours in FIN_WAIT2) again in its name through the network lock; our sockets never
    see a reset, read what the workload sent and its EOF, and it reads ours."""
    w = e2e.spawn("tcpclose", "ext")
    port = int(w.ready["port"])
    conns = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(5)]
    try:
        c = dict(enumerate(conns, 1))
        cp = {i: s.getsockname()[1] for i, s in c.items()}
        w.wait_for("ACCEPTED", w.pid)
        c[1].sendall(pat(41, 0, 4000))
        c[1].shutdown(socket.SHUT_WR)
        c[4].sendall(pat(44, 0, 700))
        c[4].shutdown(socket.SHUT_WR)
        for i in (3, 4, 5):  # the workload's segments to us are dropped
            drop.add(port, cp[i])
        os.kill(w.pid, signal.SIGUSR1)
        w.wait_for("SHUT", w.pid)
        c[5].sendall(pat(45, 0, 900))
        c[5].shutdown(socket.SHUT_WR)
        expected = {(port, cp[1]): "CLOSE_WAIT", (port, cp[2]): "FIN_WAIT2",
                    (port, cp[3]): "FIN_WAIT1", (port, cp[4]): "LAST_ACK",
                    (port, cp[5]): "CLOSING"}  # fmt: skip
        wait_states(expected, "the states before the dump")

        image = e2e.path("img")
        e2e.dump_ok(w, image, "--tcp-established")
        assert image_states(image) == [4, 5, 8, 9, 11]
        bg = e2e.ckpt_bg("restore", "-D", str(image))
        e2e.wait_restored(w.pid, w.ident, bg)
        wait_states(expected, "the states after the restore")

        drop.remove()
        # FIN_WAIT2 and FIN_WAIT1: what the workload sent, its EOF; then ours, and EOF
        assert read_to_end(c[2]) == pat(32, 0, 6000)
        c[2].sendall(pat(42, 0, 2222))
        c[2].shutdown(socket.SHUT_WR)
        assert read_to_end(c[3]) == pat(33, 0, 3500)
        c[3].sendall(pat(43, 0, 3333))
        c[3].shutdown(socket.SHUT_WR)
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        assert read_to_end(c[1]) == pat(51, 0, 2)  # CLOSE_WAIT could still write
        assert read_to_end(c[4]) == pat(34, 0, 800)
        assert read_to_end(c[5]) == pat(35, 0, 1100)
        for i, s in c.items():
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == 0, f"connection #{i}: {os.strerror(err)}"
        assert bg.wait(DEADLINE).returncode == 0
    finally:
        for s in conns:
            s.close()


def _conn_state(state: int) -> dict:
    tcp = {"snd_seq": 1, "rcv_seq": 1, "outq": b"", "unsent": 0, "inq": b"", "mss": 1460,
           "options": 0, "snd_wscale": 0, "rcv_wscale": 0, "timestamp": 0,
           "window": [0, 0, 0, 0, 0], "state": state}  # fmt: skip
    sock = {"ino": 5, "family": 2, "type": 1, "protocol": 6, "state": "established",
            "local": ["127.0.0.1", 1], "remote": ["127.0.0.1", 2], "tcp": tcp}  # fmt: skip
    return {"fd": 3, "kind": "socket", "path": "socket:[5]", "flags": 2, "cloexec": False,
            "pos": 0, "socket": sock}  # fmt: skip


def test_closing_state_is_format_6():
    """A 5.x reader would rebuild a closing connection ESTABLISHED without its FINs:
    such an fd makes the state file 6.0; an established one does not."""
    assert model.fd_needs_v6(_conn_state(8))
    assert not model.fd_needs_v6(_conn_state(1))
    assert not model.fd_needs_v6({"fd": 3, "kind": "socket", "socket": {"tcp": None}})


def test_schema_takes_only_the_states_ckpt_rebuilds():
    for st in (1, 4, 5, 8, 9, 11):
        assert build(model.TcpConn, _conn_state(st)["socket"]["tcp"]).state == st
    for st in (2, 6, 7, 10, 12):  # SYN_SENT, TIME_WAIT, CLOSE, LISTEN, NEW_SYN_RECV
        with pytest.raises(SchemaError, match="TCP state"):
            build(model.TcpConn, _conn_state(st)["socket"]["tcp"])
