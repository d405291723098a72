"""End to end: listening sockets with connections arriving during the dump (issue 14).

A connection waiting in an accept queue cannot be dumped. ckpt holds new TCP
connections (nftables: a SYN to the listener is dropped, the client resends it),
waits while the server runs until its accept queues are empty, freezes, and
retries if one slipped in (capture/backlog.py). The workload (workloads/backlog.c)
is a lazy server: it waits a few milliseconds before each accept, so under load
its queue is rarely empty; clients here connect in a loop during the dumps.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from helpers import DEADLINE, assert_error, proc_alive, proc_status, wait_until

CLIENTS = 4
CYCLES = 5


@dataclass
class Clients:
    """Threads connecting to the server in a loop: connect, "ping", read "pong", close."""

    port: int
    done: list[tuple[float, float, float]] = field(default_factory=list)  # start, connected, end
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, n: int = CLIENTS) -> Clients:
        for _ in range(n):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as c:
                    t1 = time.monotonic()
                    c.sendall(b"ping\n")
                    got = b""
                    while chunk := c.recv(64):
                        got += chunk
                if got != b"pong\n":
                    raise ValueError(f"answer {got!r}")
                self.done.append((t0, t1, time.monotonic()))
            except (OSError, ValueError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def count(self) -> int:
        return len(self.done)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(DEADLINE)
            assert not t.is_alive(), "a client is stuck"


def our_tables(ckpt_pid: int) -> list[str]:
    """The network lock tables a ckpt process made (named after its PID)."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return re.findall(rf"\b(ckpt_lock_{ckpt_pid}_\w+)", out)


def untraced(pid: int) -> None:
    wait_until(lambda: (proc_status(pid) or {}).get("TracerPid") == "0", 30, "untraced")


def test_dumps_under_connection_load(e2e):
    """CYCLES dumps (plain and --iterative) and restores of a lazy server while CLIENTS
    clients connect in a loop: every dump succeeds, no client sees a refusal or a reset, and connections
    begun while the server was gone are answered by the restored one (their SYN was
    held and resent)."""
    w = e2e.spawn("backlog", "tcp", "5")
    pid, port = w.pid, int(w.ready["port"])
    cl = Clients(port).start()
    try:
        wait_until(lambda: cl.count() > 20, DEADLINE, "the clients to be served")
        gaps = []
        for cycle in range(CYCLES):
            image = e2e.path("img")
            extra = ["--iterative"] if cycle % 2 else []  # the pre-copy freeze path too
            bg = e2e.ckpt_bg("dump", str(pid), "-D", str(image), "--tcp-established", *extra)
            res = bg.wait()
            assert res.returncode == 0, f"dump {cycle + 1} of {CYCLES}: {res}"
            assert f"nftables table inet ckpt_lock_{bg.pid}_" in res.stderr, res.stderr
            assert "listening address" in res.stderr, res.stderr
            if cycle == 0:
                assert w.reap() < 0
            else:
                e2e.reap_adopted(pid)
            gone = time.monotonic()
            time.sleep(0.3)  # clients connect while nobody listens: held, not refused
            restoring = time.monotonic()
            res = e2e.ckpt("restore", "-D", str(image), "--detach")
            assert res.returncode == 0, str(res)
            e2e.adopt(pid)
            untraced(pid)
            assert our_tables(bg.pid) == [], "the restore must delete the dump's table"
            gaps.append((gone, restoring))
            n = cl.count()
            wait_until(lambda n=n: cl.count() > n + 10, DEADLINE, "the restored server to serve")
        cl.finish()  # before the server verifies and exits
        v = e2e.verify(w, pid)
        assert v.ok, v.line
    finally:
        cl.finish()
    assert cl.errors == [], f"clients saw errors: {cl.errors[:5]} ({len(cl.errors)})"
    # held: begun before a restore, connected after it began (their SYN waited)
    held = [d for d in cl.done for _, restoring in gaps if d[0] < restoring <= d[1]]
    assert held, "no connection was held across a dump"
    early = [d for d in cl.done for gone, restoring in gaps if gone <= d[1] < restoring]
    assert not early, "a connection was made while nothing listened"
    print(f"\n{len(cl.done)} connections, {len(held)} held across a dump")


def test_never_accepting_listener_refused(e2e):
    """A listener whose process never accepts: the dump waits a couple of seconds,
    refuses in one line naming the process, the fd and the address, and leaves the
    process running untraced, with no table of its SYN rules left."""
    w = e2e.spawn("backlog", "never-tcp")
    port = int(w.ready["port"])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
        bg = e2e.ckpt_bg("dump", str(w.pid), "-D", str(e2e.path("img")))
        res = bg.wait()
        assert_error(
            res, 5, f"process {w.pid} (backlog", f"fd {w.ready['fd']}",
            f"127.0.0.1:{port}", "1 connection(s) waiting to be accepted",
        )  # fmt: skip
        assert proc_alive(w.pid)
        untraced(w.pid)
        assert our_tables(bg.pid) == [], "the refused dump left its SYN rules"
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line


def test_leave_running_removes_the_rules(e2e):
    """--leave-running under load: the dump succeeds, the server serves on, the SYN
    rules are gone at the end and no client saw an error."""
    w = e2e.spawn("backlog", "tcp", "5")
    cl = Clients(int(w.ready["port"])).start()
    try:
        wait_until(lambda: cl.count() > 20, DEADLINE, "the clients to be served")
        for _ in range(2):
            bg = e2e.ckpt_bg(
                "dump", str(w.pid), "-D", str(e2e.path("img")), "--leave-running",
                "--tcp-established",
            )  # fmt: skip
            res = bg.wait()
            assert res.returncode == 0, str(res)
            assert "nftables" not in res.stderr, res.stderr
            assert our_tables(bg.pid) == []
            untraced(w.pid)
            n = cl.count()
            wait_until(lambda n=n: cl.count() > n + 10, DEADLINE, "the server to serve on")
        cl.finish()  # before the server verifies and exits
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
    finally:
        cl.finish()
    assert cl.errors == [], cl.errors[:5]


def test_snapshot_under_load(e2e):
    """A snapshot of the lazy server under load succeeds and its rules are gone."""
    w = e2e.spawn("backlog", "tcp", "5")
    cl = Clients(int(w.ready["port"])).start()
    try:
        wait_until(lambda: cl.count() > 20, DEADLINE, "the clients to be served")
        bg = e2e.ckpt_bg(
            "snapshot", str(w.pid), "--store", str(e2e.path("store")), "--tcp-established"
        )
        res = bg.wait()
        assert res.returncode == 0, str(res)
        assert our_tables(bg.pid) == []
        untraced(w.pid)
        n = cl.count()
        wait_until(lambda: cl.count() > n + 10, DEADLINE, "the server to serve on")
    finally:
        cl.finish()
    assert cl.errors == [], cl.errors[:5]


def test_unix_listener_drained(e2e):
    """A unix listener with a connection from outside waiting: the dump waits until
    the (lazy) server accepts it instead of refusing; a server that never accepts is
    refused in one line."""
    w = e2e.spawn("backlog", "unix", "300")
    path = str(w.cwd / "srv.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(b"ping\n")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert v.fields["served"] == "0"  # the client had gone: no answer could be given
    assert bg.wait().returncode == 0

    n = e2e.spawn("backlog", "never-unix")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(n.cwd / "srv.sock"))
        res = e2e.dump(n.pid, e2e.path("img"))
        assert_error(res, 5, f"process {n.pid} (backlog", f"fd {n.ready['fd']}", "srv.sock",
                     "from outside the process tree waiting to be accepted")  # fmt: skip
        untraced(n.pid)
    v = e2e.verify(n, n.pid)
    assert v.ok, v.line


def test_without_nft_says_so(e2e):
    """No nft on the PATH: the dump still drains the queues (it succeeds here, nobody
    connects), says in one line that new connections could not be held, keeps no
    table."""
    w = e2e.spawn("backlog", "tcp", "0")
    env = e2e.env(PATH="/usr/bin:/bin")
    assert subprocess.run(["sh", "-c", "command -v nft"], env=env).returncode != 0
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, env=env)
    assert res.returncode == 0, str(res)
    w.reap()
    notes = [ln for ln in res.stderr.splitlines() if "could not be held" in ln]
    assert len(notes) == 1 and "no `nft`" in notes[0], res.stderr
    assert "nftables table" not in res.stderr
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    with socket.create_connection(("127.0.0.1", int(w.ready["port"])), timeout=DEADLINE) as c:
        c.sendall(b"ping\n")
        assert c.recv(16) == b"pong\n"
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0
