"""End to end: sockets with data in flight survive dump + restore (issue 5, sockets).

The workload (tests/workloads/sockets.c) queues pattern bytes on every
connection before READY and, restored, reads each stream back byte by byte
(every byte exactly once, in order, nothing more), checks datagram boundaries
and senders, names, options and flags, makes one more round trip on every
connection and accepts new ones, then prints VERIFY OK or VERIFY FAIL.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import struct
import subprocess

from helpers import (
    DEADLINE,
    assert_error,
    assert_no_process,
    dump_restore_verify,
    proc_alive,
    proc_status,
    wait_until,
)

SIOCOUTQ = 0x5411


def pat(k: int, start: int, n: int) -> bytes:
    return bytes((i * 31 + k * 7 + (i >> 8)) & 0xFF for i in range(start, start + n))


def recv_exactly(s: socket.socket, n: int) -> bytes:
    s.settimeout(DEADLINE)
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def all_acked(s: socket.socket) -> bool:
    raw = fcntl.ioctl(s.fileno(), SIOCOUTQ, b"\0" * 4)
    return struct.unpack("i", raw)[0] == 0


def test_unix_sockets_restored(e2e):
    """Socketpairs of every type, path and abstract listeners with accepted and
    waiting connections, dgram servers: every queued byte and message comes back."""
    w = e2e.spawn("sockets", "unix")
    dump_restore_verify(e2e, w)


def test_unix_sockets_restored_after_iterative_dump(e2e):
    """The pre-copy dump shares the capture code: same result."""
    w = e2e.spawn("sockets", "unix")
    image = e2e.path("img")
    e2e.dump_ok(w, image, "--iterative")
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_tcp_loopback_and_listener_restored(e2e):
    """Both ends of IPv4 and IPv6 loopback connections (megabytes in flight one way),
    the listeners accept new connections, a bound UDP socket still receives."""
    w = e2e.spawn("sockets", "tcp")
    assert int(w.ready["queued"]) > 1 << 20, "the workload could not fill a send queue"
    port = int(w.ready["port"])
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    talk_and_verify(e2e, w, port)
    assert bg.wait().returncode == 0


def talk_and_verify(e2e, w, port: int) -> None:
    """A new connection to the workload's listener (it waits in the queue until the
    workload checks itself on SIGUSR2, then gets an answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as c:
        c.sendall(b"hello")
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        assert recv_exactly(c, 5) == b"world"


def test_tcp_options_kept_on_the_live_process(e2e):
    """Reading a connection in TCP_REPAIR mode clears its SO_REUSEADDR when repair is
    switched off: a --leave-running dump must give it back (else a server restarted
    while such connections linger cannot bind its port)."""
    w = e2e.spawn("sockets", "tcp")
    port = int(w.ready["port"])
    res = e2e.dump(w.pid, e2e.path("img"), "--leave-running")
    assert res.returncode == 0, str(res)
    wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", 30, "untraced")
    talk_and_verify(e2e, w, port)


def test_refused_before_any_round(e2e):
    """An outside TCP peer without --tcp-established is refused at the start of an
    iterative dump and of a snapshot, before any pre-copy round (the stats written on
    failure show none), naming the process; the process runs on untraced."""
    w = e2e.spawn("sockets", "ext")
    port = int(w.ready["port"])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
        w.wait_for("ACCEPTED", w.pid)
        stats = e2e.path("stats.json")
        res = e2e.dump(w.pid, e2e.path("img"), "--iterative", "--stats-json", str(stats))
        assert_error(res, 5, f"process {w.pid} (", "fd", f"127.0.0.1:{port}", "--tcp-established")
        doc = json.loads(stats.read_text())
        assert doc["outcome"] == "failed" and doc["exit_code"] == 5, doc
        assert doc["rounds"] == [], "refused after pre-copy rounds"
        res = e2e.ckpt("snapshot", str(w.pid), "--store", str(e2e.path("store")))
        assert_error(res, 5, f"process {w.pid} (", "--tcp-established")
        wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", 30, "untraced")
        assert "[userfaultfd]" not in "".join(
            os.readlink(f"/proc/{w.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{w.pid}/fd")
        ), "tracking was armed before the refusal"
        assert proc_alive(w.pid)


def test_tcp_external_peer_needs_flag(e2e):
    """A connection to a peer outside the process (this test): refused without
    --tcp-established (the process runs on), then dumped with it; every byte sent
    before the dump and after the restore arrives, in both directions."""
    w = e2e.spawn("sockets", "ext")
    port = int(w.ready["port"])
    c = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        w.wait_for("ACCEPTED", w.pid)
        before = 40000
        c.sendall(pat(0, 0, before))
        wait_until(lambda: all_acked(c), DEADLINE, "the workload's kernel to ack our bytes")
        local = f"127.0.0.1:{c.getsockname()[1]}"

        res = e2e.dump(w.pid, e2e.path("img"))
        assert_error(res, 5, "fd", f"127.0.0.1:{port}", local, "--tcp-established")
        assert proc_alive(w.pid), "a refused dump must leave the process running"

        image = e2e.path("img")
        e2e.dump_ok(w, image, "--tcp-established")
        bg = e2e.ckpt_bg("restore", "-D", str(image))
        e2e.wait_restored(w.pid, w.ident, bg)
        after = 25000
        c.sendall(pat(0, before, after))
        (w.cwd / "total").write_text(str(before + after))
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        assert v.fields["received"] == str(before + after)
        assert recv_exactly(c, 30000) == pat(1, 0, 30000), "bytes sent before the dump differ"
        assert recv_exactly(c, 3) == b"bye"
        assert bg.wait().returncode == 0
    finally:
        c.close()


def test_unix_peer_outside_refused(e2e):
    """A unix stream connected to a socket of another process: refused before the
    target is harmed, naming the fd, the type and the peer; the process runs on."""
    path = e2e.base / "outside.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lst:
        lst.bind(str(path))
        lst.listen(1)
        w = e2e.spawn("sockets", "connect", str(path))
        peer, _ = lst.accept()
        res = e2e.dump(w.pid, e2e.path("img"))
        assert_error(res, 5, f"fd {w.ready['fd']}", "unix stream", "outside the process")
        assert proc_alive(w.pid)
        v = e2e.verify(w, w.pid)
        assert v.ok, v.line
        peer.close()


def restore_while_peer_sends(e2e, w, c, image, before: int, window: int, after: int) -> None:
    """The outside peer sends while nobody owns the connection, the restore runs, it
    sends more: every byte arrives once, in order, and the workload answers."""
    c.sendall(pat(0, before, window))  # nobody owns the connection now
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    c.sendall(pat(0, before + window, after))
    (w.cwd / "total").write_text(str(before + window + after))
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert v.fields["received"] == str(before + window + after)
    assert recv_exactly(c, 30000) == pat(1, 0, 30000)
    assert recv_exactly(c, 3) == b"bye"
    assert bg.wait().returncode == 0


def test_tcp_external_peer_sending_between_dump_and_restore(e2e):
    """The network lock: the peer keeps sending after the dump, before the restore.
    Its segments are dropped (not reset, not swallowed by the dead socket), so TCP
    resends them to the restored socket and every byte arrives once, in order."""
    w = e2e.spawn("sockets", "ext")
    port = int(w.ready["port"])
    c = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    image = e2e.path("img")
    try:
        w.wait_for("ACCEPTED", w.pid)
        before, window, after = 30000, 20000, 15000
        c.sendall(pat(0, 0, before))
        wait_until(lambda: all_acked(c), DEADLINE, "the workload's kernel to ack our bytes")
        res = e2e.dump_ok(w, image, "--tcp-established")
        lock = re.search(r"nftables table inet (ckpt_lock_\w+)", res.stderr)
        assert lock, res.stderr
        restore_while_peer_sends(e2e, w, c, image, before, window, after)
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        # only this dump's table: other tests' may come and go meanwhile
        assert lock.group(1) not in tables.stdout, "the restore must remove the lock"
    finally:
        c.close()
        _drop_lock_of(image)


def _tcp_sockets_on_port(port: int) -> list[str]:
    """States (hex, /proc/net/tcp) of the sockets whose local port is `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    out.append(fields[3])
    return out


def test_tcp_failed_restore_leaves_no_connection_behind(e2e):
    """A restore that fails once the TCP connection is rebuilt and out of repair mode
    (CKPT_FAULT=restore-files) kills what it built without a FIN: nothing is left on the
    server's port (a FIN dropped by the network lock would leave the socket in
    FIN-WAIT-1 for minutes, and the retry fail: "Cannot assign requested address"). The
    retried restore gets the connection back, with the bytes the peer sent meanwhile.
    Nothing is sent before the dump: a close with unread data sends a RST, which
    leaves nothing behind, and is not what this is about."""
    w = e2e.spawn("sockets", "ext")
    port = int(w.ready["port"])
    c = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    image = e2e.path("img")
    try:
        w.wait_for("ACCEPTED", w.pid)
        before, window, after = 0, 20000, 15000
        e2e.dump_ok(w, image, "--tcp-established")
        res = e2e.ckpt("restore", "-D", str(image), env=e2e.env(CKPT_FAULT="restore-files"))
        assert_error(res, 11, "CKPT_FAULT=restore-files")
        assert_no_process(w.pid)
        assert _tcp_sockets_on_port(port) == [], "the failed restore left a socket behind"
        restore_while_peer_sends(e2e, w, c, image, before, window, after)
    finally:
        c.close()
        _drop_lock_of(image)


def _drop_lock_of(image) -> None:
    """If the test failed before the restore, delete the lock its dump recorded."""
    from ckpt.image import ImageReader

    try:
        with ImageReader(str(image)) as r:
            name = r.state.get("net_lock")
    except Exception:
        return
    if name:
        subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)
