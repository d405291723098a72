"""A real program from Debian's packages (issue 5 acceptance): redis-server.

redis-server 7.0 (Debian's package; .ci/run installs it) runs on a free loopback
port, multi-threaded (bio threads, jemalloc's background thread), with epoll, a
pipe, an eventfd, a TCP listener and its clients' TCP connections. The test fills
it with 200k keys through `redis-cli --pipe`, and while two writers keep writing
(redis-benchmark in the background, and a synchronous RESP client here that
remembers which of its `SET w:i` were acknowledged) dumps it with
`ckpt dump --iterative --tcp-established` (ckpt kills the original), restores it
and checks, through redis-cli and RESP:

- every fill key and every acknowledged writer key is there with its value;
- a connection opened before the dump and quiet from the dump until the restore
  still works (same client id, new SET/GET on the same socket);
- new connections are served, the writer gets further acknowledgements;
- the restored server shuts down cleanly (SHUTDOWN NOSAVE, exit status 0).

A request sent between the dump and the restore is not lost: the network lock
(docs/ARCHITECTURE.md, "Sockets") drops it instead of letting the dying socket
acknowledge it or the kernel reset the connection, and TCP resends it to the
restored server. A third connection sends one on purpose after the dump; it must
be answered. The writer still copes with a stalled or broken connection
(reconnect, same SET again): an acknowledged write must never be lost.
Nothing asserts on time; every wait polls against a generous deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading

import pytest
from helpers import DEADLINE, Ident, Workload, proc_status, read_bytes, read_link, wait_until

N_FILL = 200_000
WRITER_TIMEOUT = 3.0  # seconds without a reply before the writer gives a connection up
REDIS_TOOLS = ("redis-server", "redis-cli", "redis-benchmark")


# ---------------------------------------------------------------- RESP


def fill_value(i: int) -> bytes:
    """The value of fill key k:i (8 to 96 bytes, different for every key)."""
    return f"{(i * 2654435761) % (1 << 32):08x}".encode() * (1 + i % 12)


def writer_value(i: int) -> bytes:
    return b"v:%d" % i


def encode(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespError(Exception):
    pass


class Resp:
    """A minimal synchronous RESP2 client on one TCP connection."""

    def __init__(self, port: int, timeout: float = DEADLINE):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[: n + 2]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise AssertionError(f"unexpected RESP line {line!r}")

    def call(self, *args):
        self.sock.sendall(encode(*args))
        r = self.reply()
        if isinstance(r, RespError):
            raise r
        return r


class Writer(threading.Thread):
    """SET w:0, w:1, ... one at a time; `acked` = how many were acknowledged.

    Every SET w:i with i < acked got +OK. A connection that stalls for
    WRITER_TIMEOUT or breaks is given up (kept open, so that it can be probed
    later) and the same SET is sent again on a new connection (idempotent).
    """

    def __init__(self, port: int):
        super().__init__(name="redis-writer", daemon=True)
        self.port = port
        self.acked = 0
        self.conns: list[Resp] = []  # every connection, in order; the last one is in use
        self.acks_per_conn: list[int] = []
        self.events: list[str] = []  # stalls, breaks, refused connects (for the report)
        self.failure: str | None = None  # a reply that is not +OK: the test fails
        self.stop = threading.Event()

    def run(self) -> None:
        conn: Resp | None = None
        refused = 0
        while not self.stop.is_set():
            if conn is None:
                try:
                    conn = Resp(self.port, timeout=WRITER_TIMEOUT)
                except OSError as e:
                    refused += 1
                    if refused == 1:
                        self.events.append(f"connect: {e!r}")
                    self.stop.wait(0.02)
                    continue
                if refused > 1:
                    self.events.append(f"connect refused/failed {refused} times in a row")
                refused = 0
                self.conns.append(conn)
                self.acks_per_conn.append(0)
            i = self.acked
            try:
                r = conn.call("SET", f"w:{i}", writer_value(i))
            except RespError as e:
                self.failure = f"SET w:{i} on connection {len(self.conns) - 1}: {e}"
                return
            except (OSError, ConnectionError) as e:  # socket.timeout is an OSError
                self.events.append(f"connection {len(self.conns) - 1}: {e!r} at w:{i}")
                conn = None
                continue
            if r != b"OK":
                self.failure = f"SET w:{i}: unexpected reply {r!r}"
                return
            self.acked = i + 1
            self.acks_per_conn[-1] += 1

    def halt(self) -> None:
        self.stop.set()
        self.join(DEADLINE)
        assert not self.is_alive(), "the writer thread did not stop"

    def close_all(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


# ---------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def redis_tools() -> dict[str, str]:
    """Debian's redis binaries. Missing is a failure, not a skip: .ci/run installs them."""
    found = {name: shutil.which(name) for name in REDIS_TOOLS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: this test needs Debian's redis "
            "(apt-get install redis-server redis-tools; .ci/run installs them)",
            pytrace=False,
        )
    return found  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(e2e, name: str, argv: list[str], cwd=None) -> Workload:
    """Popen argv in its own session, cwd inside the test directory, registered
    with e2e (killed and reaped by its cleanup even when the test fails)."""
    if cwd is None:
        cwd = e2e.path(name)
        cwd.mkdir()
    log = cwd.with_suffix(".log")
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    w = Workload(name, popen, log, cwd)
    e2e.workloads.append(w)
    return w


def cli(tools, port: int, *args: str, stdin: bytes | None = None, timeout=DEADLINE) -> str:
    """Run redis-cli against the server; its stdout (it must exit 0)."""
    res = subprocess.run(
        [tools["redis-cli"], "-h", "127.0.0.1", "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, (
        f"redis-cli {' '.join(args)} exited {res.returncode}:\n{out}{res.stderr.decode()}"
    )
    return out


def info(tools, port: int) -> dict[str, str]:
    out = {}
    for line in cli(tools, port, "INFO").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def answers_ping(port: int) -> bool:
    try:
        c = Resp(port, timeout=2)
    except OSError:
        return False
    try:
        return c.call("PING") == b"PONG"
    except (OSError, ConnectionError, RespError):
        return False
    finally:
        c.close()


def client_names(port: int) -> list[str]:
    """The `name=` of every client connected to the server, but the one asking."""
    c = Resp(port)
    try:
        listing = c.call("CLIENT", "LIST").decode()
        me = c.call("CLIENT", "ID")
    finally:
        c.close()
    names = []
    for line in listing.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if int(fields["id"]) != me:
            names.append(fields.get("name", ""))
    return names


def check_keys(port: int, keys: list[bytes], expected: list[bytes], what: str) -> None:
    """MGET every key (pipelined, 1000 per MGET) and compare with `expected`."""
    c = Resp(port)
    try:
        batches = [keys[i : i + 1000] for i in range(0, len(keys), 1000)]
        c.sock.sendall(b"".join(encode("MGET", *b) for b in batches))
        got: list = []
        for b in batches:
            r = c.reply()
            assert isinstance(r, list) and len(r) == len(b), f"MGET answered {r!r:.200}"
            got.extend(r)
    finally:
        c.close()
    bad = [(k, g, v) for k, g, v in zip(keys, got, expected, strict=True) if g != v]
    assert not bad, f"{len(bad)} of {len(keys)} {what} keys wrong, e.g. {bad[:5]}"


# ---------------------------------------------------------------- the test


def test_redis_dump_iterative_while_writing(e2e, redis_tools):
    tools = redis_tools
    port = free_port()
    cwd = e2e.path("redis")
    cwd.mkdir()
    server = start(
        e2e,
        "redis",
        [
            tools["redis-server"],
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(cwd),
            "--logfile", str(cwd / "redis.log"),
        ],
        cwd=cwd,
    )  # fmt: skip
    pid = server.pid
    wait_until(lambda: answers_ping(port) or server.popen.poll() is not None, DEADLINE,
               "redis-server to answer PING")  # fmt: skip
    assert server.popen.poll() is None, (
        f"redis-server exited {server.popen.returncode}:\n"
        f"{read_bytes(str(cwd / 'redis.log'))!r}\n{server.tail()}"
    )
    server.ident = Ident(
        read_bytes(f"/proc/{pid}/cmdline") or b"",
        read_link(f"/proc/{pid}/exe") or "",
        read_link(f"/proc/{pid}/cwd") or "",
    )

    # -- fill through redis-cli --pipe
    payload = b"".join(encode("SET", f"k:{i}", fill_value(i)) for i in range(N_FILL))
    out = cli(tools, port, "--pipe", stdin=payload)
    assert "errors: 0" in out and f"replies: {N_FILL}" in out, out
    assert cli(tools, port, "DBSIZE").strip() == str(N_FILL)

    writer = Writer(port)
    idle = window = bench = None
    try:
        # -- a connection quiet from the dump to the restore, and one that is not
        idle = Resp(port)
        window = Resp(port)
        idle.call("CLIENT", "SETNAME", "idle")
        window.call("CLIENT", "SETNAME", "window")
        idle_id = idle.call("CLIENT", "ID")
        assert idle.call("SET", "idle:before", "1") == b"OK"

        # -- writers: redis-benchmark (its own keys) and ours
        bench = start(
            e2e,
            "bench",
            [
                tools["redis-benchmark"],
                "-h", "127.0.0.1", "-p", str(port),
                "-c", "4", "-P", "4", "-d", "64",
                "-t", "set", "-r", "100000", "-n", "1000000000", "-q",
            ],
        )  # fmt: skip
        writer.start()
        # every client connected and accepted (a connection still waiting in the
        # listener's queue, or one closing, cannot be dumped)
        wait_until(lambda: writer.acked >= 1000 or writer.failure, DEADLINE, "writer acks")
        assert writer.failure is None, writer.failure

        def settled() -> bool:
            assert bench.popen.poll() is None, f"redis-benchmark exited:\n{bench.tail()}"
            names = client_names(port)
            # idle, window, ours and redis-benchmark's 4
            return len(names) == 7 and names.count("") == 5

        wait_until(settled, DEADLINE, "redis-benchmark's 4 clients, ours, idle and window")
        threads_before = len(os.listdir(f"/proc/{pid}/task"))
        fds_before = "\n".join(
            f"  {fd} -> {read_link(f'/proc/{pid}/fd/{fd}')}"
            for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int)
        )
        run_id = info(tools, port)["run_id"]

        # -- dump while both write
        image = e2e.path("img")
        stats = e2e.path("stats.json")
        acked_at_dump_start = writer.acked
        res = e2e.dump(pid, image, "--iterative", "--tcp-established", "--stats-json", str(stats))
        acked_at_dump_end = writer.acked
        assert res.returncode == 0, f"{res}\nfds of redis-server before the dump:\n{fds_before}"
        rc = server.reap()
        assert rc == -signal.SIGKILL, f"after the dump redis-server exited {rc}, not SIGKILL"
        acked_before_restore = writer.acked
        # a request sent between the dump and the restore: the network lock drops it
        # (no reset), so TCP resends it to the restored server, which answers
        window.sock.sendall(encode("SET", "window:1", "x"))

        # -- restore
        res = e2e.ckpt("restore", "-D", str(image), "--detach")
        assert res.returncode == 0, str(res)
        e2e.adopt(pid)
        assert res.stdout.split()[0] == str(pid), f"restored at another pid:\n{res}"
        wait_until(lambda: (proc_status(pid) or {}).get("TracerPid") == "0", DEADLINE,
                   "the restored redis-server to run untraced")  # fmt: skip
        assert server.ident.matches(pid)
        wait_until(lambda: answers_ping(port), DEADLINE, "the restored redis-server to answer PING")
        assert len(os.listdir(f"/proc/{pid}/task")) == threads_before

        # -- the server keeps serving: the quiet connection, a new one, the writer
        assert idle.call("CLIENT", "ID") == idle_id, "the quiet connection is another client"
        assert idle.call("GET", "idle:before") == b"1"
        assert idle.call("SET", "idle:after", "2") == b"OK"
        assert cli(tools, port, "SET", "new:conn", "hello").strip() == "OK"
        assert cli(tools, port, "GET", "new:conn").strip() == "hello"
        assert info(tools, port)["run_id"] == run_id, "not the same server process"
        window.sock.settimeout(DEADLINE)
        answer = window.reply()
        assert answer == b"OK", f"the request sent between dump and restore got {answer!r}"
        window_outcome = f"answered {answer!r}"
        window_key = cli(tools, port, "GET", "window:1").strip()
        assert window_key == "x"

        acked_after_restore = writer.acked
        wait_until(
            lambda: writer.acked >= acked_after_restore + 1000 or writer.failure,
            DEADLINE,
            f"the writer to get 1000 more acks after the restore (events: {writer.events})",
        )
        assert writer.failure is None, writer.failure
        writer.halt()

        # -- nothing acknowledged was lost
        keys = [f"k:{i}".encode() for i in range(N_FILL)]
        check_keys(port, keys, [fill_value(i) for i in range(N_FILL)], "fill")
        n = writer.acked
        check_keys(port, [b"w:%d" % i for i in range(n)], [writer_value(i) for i in range(n)],
                   "acknowledged writer")  # fmt: skip
        assert int(cli(tools, port, "DBSIZE")) >= N_FILL + n + 3

        # the writer's first connection: did it survive? (reported, not asserted:
        # it carried the request sent between the capture and the restore)
        first = writer.conns[0]
        first_alive = len(writer.conns) == 1
        if not first_alive:
            try:
                first.sock.settimeout(2)
                first.sock.sendall(encode("PING"))
                while first.reply() != b"PONG":
                    pass
                first_alive = True
            except (OSError, ConnectionError, AssertionError):
                pass
        bench_rc = bench.popen.poll()
        st = json.loads(stats.read_text())
        print(
            f"\nredis {pid}: {len(st['rounds'])} pre-copy rounds ({st['stop_reason']}), "
            f"freeze {st['final']['freeze_ms']:.1f} ms, total {st['total_seconds']:.2f} s; "
            f"writer acks {acked_at_dump_start} at dump start, {acked_at_dump_end} at its end, "
            f"{acked_before_restore} before the restore, {n} in all, per connection "
            f"{writer.acks_per_conn}; its first connection "
            f"{'survived' if first_alive else 'was lost'}; events {writer.events}; "
            f"redis-benchmark {'still running' if bench_rc is None else f'exited {bench_rc}'}; "
            f"request sent between dump and restore: {window_outcome}, GET -> {window_key!r}"
        )

        # -- and it shuts down cleanly
        with contextlib.suppress(OSError):
            bench.popen.kill()
        bench.popen.wait(DEADLINE)
        idle.sock.sendall(encode("SHUTDOWN", "NOSAVE"))
        status = e2e.reap_adopted(pid)
        assert status in (0, None), f"the restored redis-server exited {status} on SHUTDOWN"
    finally:
        writer.stop.set()
        if writer.is_alive():
            writer.join(DEADLINE)
        writer.close_all()
        for c in (idle, window):
            if c is not None:
                c.close()


# ---------------------------------------------------------------- during a BGSAVE

N_SAVE = 20_000  # keys; with SAVE_DELAY_US per key the child saves for a few seconds
SAVE_DELAY_US = 100  # CONFIG SET rdb-key-save-delay: the BGSAVE child sleeps per key
SAVE_OK = b"Background saving terminated with success"  # the parent's log, once it reaped


def start_redis(e2e, tools, name: str, port: int, cwd, *extra: str) -> Workload:
    """redis-server on 127.0.0.1:port in cwd (its --dir), answering PING."""
    w = start(
        e2e,
        name,
        [
            tools["redis-server"], "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(cwd),
            "--logfile", str(cwd / f"{name}.log"), *extra,
        ],
        cwd=cwd,
    )  # fmt: skip
    wait_until(lambda: answers_ping(port) or w.popen.poll() is not None, DEADLINE,
               f"{name} to answer PING")  # fmt: skip
    assert w.popen.poll() is None, (
        f"{name} exited {w.popen.returncode}:\n{read_bytes(str(cwd / f'{name}.log'))!r}"
    )
    return w


def reap_orphan(pid: int) -> None:
    """A killed tree member is re-parented to the tests' subreaper: reap it (its PID must
    be free for the restore)."""
    wait_until(lambda: _reaped(pid), DEADLINE, f"tree member {pid} to go")


def _reaped(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return not os.path.exists(f"/proc/{pid}")


def save_child(pid: int) -> int | None:
    """The BGSAVE child of redis-server pid, if it runs."""
    try:
        kids = read_bytes(f"/proc/{pid}/task/{pid}/children") or b""
    except OSError:
        return None
    found = [int(k) for k in kids.split()]
    return found[0] if found else None


def persistence(tools, port: int) -> dict[str, str]:
    return {k: v for k, v in info(tools, port).items() if k.startswith(("rdb_", "aof_rewrite"))}


def check_rdb(e2e, tools, rdb, what: str, extra: dict[bytes, bytes]) -> None:
    """The RDB is complete (redis-check-rdb) and a second redis-server loads every key
    with its value from it: the fill's and `extra`."""
    res = subprocess.run([shutil.which("redis-check-rdb") or tools["redis-server"], str(rdb)],
                         capture_output=True, timeout=DEADLINE, check=False)  # fmt: skip
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0 and "RDB looks OK" in out, f"{what}: redis-check-rdb:\n{out}"
    assert f"{N_SAVE + len(extra)} keys read" in out, f"{what}: redis-check-rdb:\n{out}"
    d = e2e.path(f"load-{what}")
    d.mkdir()
    shutil.copyfile(rdb, d / "dump.rdb")
    port = free_port()
    loader = start_redis(e2e, tools, f"loader-{what}", port, d, "--dbfilename", "dump.rdb")
    assert cli(tools, port, "DBSIZE").strip() == str(N_SAVE + len(extra)), f"{what}: keys"
    keys = [f"k:{i}".encode() for i in range(N_SAVE)] + list(extra)
    values = [fill_value(i) for i in range(N_SAVE)] + list(extra.values())
    check_keys(port, keys, values, f"{what} RDB")
    cli(tools, port, "SHUTDOWN", "NOSAVE")
    assert loader.popen.wait(DEADLINE) == 0


@pytest.mark.parametrize("mode", ["dump", "iterative", "snapshot", "snapshot-killed"])
def test_redis_during_bgsave(e2e, redis_tools, mode):
    """Dump (or snapshot) redis-server while its BGSAVE child writes temp-CHILD.rdb, and
    restore: the child comes back at its PID and finishes the save, the parent reaps it
    and reports success (rdb_last_bgsave_status:ok), the RDB is complete and holds every
    key, and the restored server's data and quiet client connection are intact.

    The child's epoll is its parent's (inherited): it closed the listener its parent
    registered and its temp file took that fd number (docs/ARCHITECTURE.md "An epoll
    shared across a tree"). The temp file is written at the child's offset: the image
    keeps its content ("Files being written"). dump/iterative: ckpt kills the tree, the
    file stays as dumped. snapshot: the original runs on, finishes the save and renames
    the file away, the restore makes it again (and the restored child then writes an
    RDB byte for byte the original's). snapshot-killed: the original is killed in the
    middle of its save, the file has grown, the restore puts it back as it was."""
    tools = redis_tools
    port = free_port()
    cwd = e2e.path("redis")
    cwd.mkdir()
    server = start_redis(e2e, tools, "redis", port, cwd)
    pid = server.pid
    server.ident = Ident(
        read_bytes(f"/proc/{pid}/cmdline") or b"",
        read_link(f"/proc/{pid}/exe") or "",
        read_link(f"/proc/{pid}/cwd") or "",
    )
    payload = b"".join(encode("SET", f"k:{i}", fill_value(i)) for i in range(N_SAVE))
    out = cli(tools, port, "--pipe", stdin=payload)
    assert "errors: 0" in out and f"replies: {N_SAVE}" in out, out
    cli(tools, port, "CONFIG", "SET", "rdb-key-save-delay", str(SAVE_DELAY_US))
    quiet = None
    if not mode.startswith("snapshot"):  # (the original, left running, would close it)
        quiet = Resp(port)
        quiet_id = quiet.call("CLIENT", "ID")
        assert quiet.call("SET", "quiet:before", "1") == b"OK"
    try:
        assert "started" in cli(tools, port, "BGSAVE")
        wait_until(lambda: save_child(pid) is not None, DEADLINE, "the BGSAVE child")
        child = save_child(pid)
        temp = cwd / f"temp-{child}.rdb"
        wait_until(lambda: temp.exists() and temp.stat().st_size > 0, DEADLINE,
                   f"{temp.name} to be written")  # fmt: skip
        assert persistence(tools, port)["rdb_bgsave_in_progress"] == "1"

        if mode in ("dump", "iterative"):
            image = e2e.path("img")
            extra = ["--iterative"] if mode == "iterative" else []
            res = e2e.dump(pid, image, "--tcp-established", *extra)
            assert res.returncode == 0, str(res)
            assert "1 descendants" in res.stderr, res.stderr
            assert server.reap() == -signal.SIGKILL
            reap_orphan(child)
            assert temp.exists() and not (cwd / "dump.rdb").exists(), "the save ended first"
            restore = ["-D", str(image)]
            said = None
        else:
            store = e2e.path("store")
            res = e2e.ckpt("snapshot", str(pid), "--store", str(store), "--tcp-established")
            assert res.returncode == 0, str(res)
            assert f"descendant {child}" in res.stderr, res.stderr
            assert save_child(pid) == child, "the save ended before the snapshot was taken"
            reference = None
            if mode == "snapshot":  # the original finishes its save and renames the file
                wait_until(lambda: persistence(tools, port)["rdb_bgsave_in_progress"] == "0",
                           DEADLINE, "the original's save")  # fmt: skip
                assert persistence(tools, port)["rdb_last_bgsave_status"] == "ok"
                assert not temp.exists()
                reference = e2e.path("original.rdb")
                os.replace(cwd / "dump.rdb", reference)
                cli(tools, port, "SHUTDOWN", "NOSAVE")
                assert server.reap() == 0
                said = "made again with its content as at the dump"
            else:  # killed in the middle of the save: the file has grown since
                size = temp.stat().st_size
                wait_until(lambda: temp.stat().st_size > size, DEADLINE, "the save to go on")
                os.kill(child, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
                assert server.reap() == -signal.SIGKILL
                reap_orphan(child)
                said = "its content as at the dump is put back"
            restore = ["--store", str(store)]

        log = cwd / "redis.log"
        done_before = (read_bytes(str(log)) or b"").count(SAVE_OK)
        res = e2e.ckpt("restore", *restore, "--detach")
        assert res.returncode == 0, str(res)
        assert said is None or said in res.stderr, res.stderr
        e2e.adopt(pid)
        e2e.adopt(child)
        wait_until(lambda: (proc_status(pid) or {}).get("TracerPid") == "0", DEADLINE,
                   "the restored redis-server to run untraced")  # fmt: skip
        assert server.ident.matches(pid)
        st = proc_status(child)
        assert st is not None and int(st["PPid"]) == pid, f"the save child: {st}"
        wait_until(lambda: answers_ping(port), DEADLINE, "the restored redis-server to answer")

        # the restored child finishes the save, its parent reaps it and says it succeeded
        wait_until(lambda: persistence(tools, port)["rdb_bgsave_in_progress"] == "0",
                   DEADLINE, "the restored save to finish")  # fmt: skip
        p = persistence(tools, port)
        assert p["rdb_last_bgsave_status"] == "ok", p
        assert (p["rdb_saves"], p["rdb_changes_since_last_save"]) == ("1", "0"), p
        wait_until(lambda: _reaped_by_parent(child), DEADLINE, "the parent to reap the child")
        assert (read_bytes(str(log)) or b"").count(SAVE_OK) == done_before + 1
        assert not temp.exists()
        rdb = cwd / "dump.rdb"
        check_rdb(e2e, tools, rdb, mode, {b"quiet:before": b"1"} if quiet else {})
        if mode == "snapshot":
            assert rdb.read_bytes() == reference.read_bytes(), "not the original's RDB"

        # the server's data, its quiet client, and new writes
        keys = [f"k:{i}".encode() for i in range(N_SAVE)]
        check_keys(port, keys, [fill_value(i) for i in range(N_SAVE)], "restored server")
        if quiet is not None:
            assert quiet.call("CLIENT", "ID") == quiet_id, "the quiet connection is another"
            assert quiet.call("GET", "quiet:before") == b"1"
        assert cli(tools, port, "SET", "after", "restore").strip() == "OK"
        assert cli(tools, port, "GET", "after").strip() == "restore"
        cli(tools, port, "SHUTDOWN", "NOSAVE")
        status = e2e.reap_adopted(pid)
        assert status in (0, None), f"the restored redis-server exited {status} on SHUTDOWN"
    finally:
        if quiet is not None:
            quiet.close()


def _reaped_by_parent(pid: int) -> bool:
    """Gone: its (restored) parent waited for it (it is not our child: we must not)."""
    return not os.path.exists(f"/proc/{pid}")
