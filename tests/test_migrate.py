"""Live migration between two simulated hosts (ckpt/transport, docs/MIGRATION.md).

Two network namespaces joined by a veth pair stand for the two hosts. The
receiver runs in the destination namespace AND in a PID namespace of its own
(`unshare --pid --fork`), so the process keeps its PID there while the source's
copy still exists here; `ckpt migrate` runs in the source namespace. The
workload (tests/workloads/writer.c) keeps writing pages while it is migrated
and, on SIGUSR2, checks every byte of its memory against its own model.

Every outcome is checked from both ends: the exit code and single error line of
each side, and where the process is afterwards (it must verify, wherever it
is). Every test deletes its namespaces and kills what it started, even when it
fails. Waits poll against generous deadlines; nothing asserts on time.

Needs iproute2 (`ip`) and util-linux (`unshare`); without them the namespace
tests are skipped, the protocol unit tests still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import CKPT, DEADLINE, POLL, Result, assert_error, proc_status, read_link

from ckpt.transport import protocol
from ckpt.transport.auth import client_handshake, server_handshake
from ckpt.transport.channel import Channel
from ckpt.transport.errors import AuthFailed, ProtocolError
from ckpt.transport.ratelimit import TokenBucket
from ckpt.transport.throttle import Throttle

PORT = 7411
HAVE_NS = shutil.which("ip") is not None and shutil.which("unshare") is not None
needs_ns = pytest.mark.skipif(
    not HAVE_NS, reason="needs iproute2 (`ip`) and unshare to simulate two hosts"
)


MIG = CKPT


# ---------------------------------------------------------------- the two hosts


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@dataclass
class Hosts:
    """Source and destination namespaces, a veth pair between them."""

    src: str
    dst: str
    src_dev: str
    dst_dev: str
    src_ip: str
    dst_ip: str

    @property
    def to(self) -> str:
        return f"{self.dst_ip}:{PORT}"

    def cut_cmd(self) -> str:
        """A shell command (run in the source namespace) that takes the link down."""
        return f"ip link set {self.src_dev} down"


@pytest.fixture
def hosts():
    tag = secrets.token_hex(3)
    h = Hosts(
        src=f"ckmig-s-{tag}", dst=f"ckmig-d-{tag}", src_dev=f"cms{tag}", dst_dev=f"cmd{tag}",
        src_ip=f"10.213.{int(tag[:2], 16)}.1", dst_ip=f"10.213.{int(tag[:2], 16)}.2",
    )  # fmt: skip
    try:
        _ip("netns", "add", h.src)
        _ip("netns", "add", h.dst)
        _ip("link", "add", h.src_dev, "type", "veth", "peer", "name", h.dst_dev)
        _ip("link", "set", h.src_dev, "netns", h.src)
        _ip("link", "set", h.dst_dev, "netns", h.dst)
        for ns, dev, ip in ((h.src, h.src_dev, h.src_ip), (h.dst, h.dst_dev, h.dst_ip)):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in (h.src, h.dst):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", h.src_dev, check=False)  # only if it never moved


@pytest.fixture
def token(tmp_path) -> Path:
    return _token_file(tmp_path / "token")


def _token_file(path: Path) -> Path:
    path.write_text(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- processes


class Cmd:
    """A background command with stdout/stderr in files; always killed and reaped."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], name: str):
        self.argv = argv
        self.out = cwd / f"{name}.out"
        self.err = cwd / f"{name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e, cwd=cwd, env=env
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def result(self) -> Result:
        rc = self.popen.returncode
        return Result(self.argv, rc if rc is not None else -999, self.stdout(), self.stderr())

    def wait(self, timeout: float = DEADLINE) -> Result:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.result()}") from None
        return self.result()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


class Receiver(Cmd):
    """`ckpt receive` in the destination netns, as init of its own PID namespace."""

    def __init__(self, e2e, hosts: Hosts, token: Path, *extra: str, env=None):
        argv = [
            "ip", "netns", "exec", hosts.dst, "unshare", "--pid", "--fork", "--kill-child",
            "--mount-proc", *MIG, "receive", "--listen", hosts.to, "--token-file", str(token),
            *extra,
        ]  # fmt: skip
        super().__init__(argv, e2e.base, env or e2e.env(), "receiver")
        end = time.monotonic() + DEADLINE
        while "listening on" not in self.stderr():
            if self.popen.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"the receiver did not start:\n{self.result()}")
            time.sleep(POLL)

    def init_pid(self) -> int:
        """Global PID of the receiver itself (the unshare'd child, init of the namespace)."""
        kids = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        assert len(kids) == 1, kids
        return int(kids[0])

    def reported_pid(self, timeout: float = DEADLINE) -> int:
        end = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.stdout().splitlines() if ln.strip().isdigit()]
            if lines:
                return int(lines[0])
            if self.popen.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"the receiver reported no PID:\n{self.result()}")
            time.sleep(POLL)

    def global_pid(self, ns_pid: int) -> int:
        """The PID (in our namespace) of the receiver's namespace's process `ns_pid`."""
        ns = read_link(f"/proc/{self.init_pid()}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or read_link(f"/proc/{entry}/ns/pid") != ns:
                continue
            st = proc_status(int(entry))
            if st and int(st["NSpid"].split()[-1]) == ns_pid:
                return int(entry)
        raise AssertionError(f"no process {ns_pid} in the receiver's PID namespace")


def migrate(
    e2e, hosts: Hosts, token: Path, pid: int, *extra: str, env=None, to: str | None = None
) -> tuple[Result, dict]:
    """`ckpt migrate` in the source namespace, to the receiver (or `to`, e.g. a relay)."""
    stats = e2e.path("stats.json")
    argv = [
        "ip", "netns", "exec", hosts.src, *MIG, "migrate", str(pid), "--to", to or hosts.to,
        "--token-file", str(token), "--stats-json", str(stats), *extra,
    ]  # fmt: skip
    cmd = Cmd(argv, e2e.base, env or e2e.env(), f"migrate-{pid}")
    try:
        res = cmd.wait(180)
    finally:
        cmd.kill()
    data = json.loads(stats.read_text()) if stats.exists() else {}
    return res, data


def verify_at(w, global_pid: int, ns_pid: int, timeout: float = DEADLINE) -> str:
    """SIGUSR2 the copy (re-sent every 2 s); its VERIFY line (it prints its own ns PID)."""
    end = time.monotonic() + timeout
    kick = 0.0
    while True:
        found = w.find("VERIFY", ns_pid)
        if found:
            words, fields = found[-1]
            return " ".join(words) + " " + " ".join(f"{k}={v}" for k, v in fields.items())
        now = time.monotonic()
        if now >= kick:
            try:
                os.kill(global_pid, signal.SIGUSR2)
            except ProcessLookupError:
                time.sleep(0.3)
                if not w.find("VERIFY", ns_pid):
                    raise AssertionError(
                        f"pid {global_pid} is gone unverified:\n{w.tail()}"
                    ) from None
            kick = now + 2.0
        if now > end:
            raise AssertionError(f"pid {global_pid} did not verify:\n{w.tail()}")
        time.sleep(POLL)


def assert_source_kept(w, what: str) -> None:
    """The source's copy still runs (not stopped, not traced) and its memory verifies."""
    assert w.popen.poll() is None, f"the source process died ({what})"
    end = time.monotonic() + 30
    while True:
        st = proc_status(w.pid)
        if st and st["TracerPid"] == "0" and st["State"][:1] in "RSD":
            break
        if time.monotonic() > end:
            raise AssertionError(f"the source process is not running free ({what}): {st}")
        time.sleep(POLL)
    line = verify_at(w, w.pid, w.pid)
    assert line.startswith("VERIFY OK"), f"the source copy is damaged ({what}): {line}"
    assert w.reap() == 0


# ---------------------------------------------------------------- migrations


@needs_ns
def test_writer_migrates_and_verifies_at_destination(e2e, hosts, token):
    w = e2e.spawn("writer", "mib=32", "rate=3000", "report=0")
    keep = e2e.path("kept")
    rcv = Receiver(e2e, hosts, token, "--keep-images", str(keep))
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert res.returncode == 0, str(res)
        assert "Traceback" not in res.stderr
        assert w.reap() == -signal.SIGKILL, "the source copy must be gone after the handover"

        ns_pid = rcv.reported_pid()
        assert ns_pid == w.pid, "the process keeps its PID in the destination's namespace"
        assert res.stdout.split()[-1] == str(ns_pid)
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), line
        done = rcv.wait()
        assert done.returncode == 0, f"the receiver exits with the process's status\n{done}"
        assert "received process" in done.stderr and "downtime" in done.stderr
    finally:
        rcv.kill()

    assert stats["outcome"] == "migrated" and stats["remote_pid"] == w.pid
    assert stats["rounds"] and stats["rounds"][0]["bytes_wire"] > 0
    assert stats["bytes_wire"] >= sum(r["bytes_wire"] for r in stats["rounds"])
    d = stats["downtime"]
    assert stats["downtime_ms"] == pytest.approx(
        d["source_freeze_to_marker_ms"] + d["destination_ms"]
    )
    assert d["destination_ms"] >= d["destination_restore_ms"] > 0
    assert stats["handover_confirmed"]
    show = subprocess.run([*CKPT, "show", str(keep), "--json"], capture_output=True, text=True)
    assert show.returncode == 0, f"--keep-images left no usable image:\n{show.stderr}"
    assert json.loads(show.stdout)["process"]["pid"] == w.pid
    # the kept image (chunks stored as they came over the wire) restores and verifies
    got = subprocess.run(
        [*CKPT, "restore", "-D", str(keep), "--new-pid", "--detach"],
        capture_output=True, text=True, env=e2e.env(), timeout=120,
    )  # fmt: skip
    assert got.returncode == 0, f"the kept image does not restore:\n{got.stderr}"
    pid = int(got.stdout.split()[0])
    try:
        line = verify_at(w, pid, pid)
        assert line.startswith("VERIFY OK"), f"the kept image restored damaged: {line}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


MUTATION_STEPS = 4  # tests/workloads/writer.c steps=1: steps 1-4 change the layout


@needs_ns
def test_staged_restore_follows_mutations_between_rounds(e2e, hosts, token):
    """The destination builds the process while the rounds arrive (staged restore).
    Between rounds the writer frees and remaps memory: MADV_DONTNEED of written
    pages, munmap + mmap at the same address, mremap to a new address, PROT_NONE
    with data and back, a new mapping, private file COW pages dropped again, shared
    anonymous memory MADV_REMOVE'd, and a ballast whose present half shrinks each
    step. Pages the staged process received in earlier rounds must not survive
    where the process dropped them: the migrated copy checks every byte of its
    memory against its own model (stale data fails it)."""
    from precopy_helpers import Hook, steps_done

    w = e2e.spawn("writer", "mib=4", "rate=300", "steps=1", "ballast=16", "report=0")
    hook = Hook(e2e, w, steps=True)
    rcv = Receiver(e2e, hosts, token)
    env = e2e.env(**hook.env())
    try:
        res, stats = migrate(
            e2e, hosts, token, w.pid, "--max-rounds", str(MUTATION_STEPS + 1),
            "--target-downtime-ms", "1", "--throttle", "off", env=env,
        )  # fmt: skip
        assert res.returncode == 0, f"{res}\n{hook}"
        assert w.reap() == -signal.SIGKILL
        done = steps_done(w, w.pid)
        assert done >= MUTATION_STEPS, f"only {done} mutation steps ran between rounds\n{hook}"
        stepped = hook.stepped()
        for n in range(1, MUTATION_STEPS + 1):
            assert stepped.get(n) == n - 1, f"step {n} not after round {n - 1}: {stepped}"
        ns_pid = rcv.reported_pid()
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), f"{line}\n{hook}"
        assert f"steps={done}" in line, f"migrated after another step than {done}: {line}"
        got = rcv.wait()
        assert got.returncode == 0, str(got)
        assert "staged restore" in got.stderr, f"the receiver did not stage:\n{got.stderr}"
    finally:
        rcv.kill()
    d = stats["downtime"]
    assert d["staged"], f"the destination restored from an image, not staged: {d}"
    parts = d["destination_parts"]
    # pages received in earlier rounds and dropped since (ballast, dn, re…) were zapped
    assert parts["zapped_spans"] > 0, f"no stale pages were dropped: {parts}"
    assert len(stats["rounds"]) == MUTATION_STEPS + 1, stats["rounds"]


@needs_ns
def test_slow_link_converges_by_throttling(e2e, hosts, token):
    """The writer dirties its whole region faster than 1.5 MiB/s carries it: without a
    throttle the written set never shrinks; with it, pre-copy converges."""
    w = e2e.spawn("writer", "mib=8", "rate=8000", "report=0")
    rcv = Receiver(e2e, hosts, token)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid, "--max-bandwidth", "1.5")
        assert res.returncode == 0, str(res)
        assert w.reap() == -signal.SIGKILL
        ns_pid = rcv.reported_pid()
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), line
        rcv.wait()
    finally:
        rcv.kill()
    rounds = stats["rounds"]
    assert any(r["throttle"] > 0 for r in rounds), f"never throttled:\n{res.stderr}"
    assert stats["throttle"]["max_level"] > 0
    assert stats["stop_reason"] == "converged" and stats["converged"], res.stderr
    assert rounds[-1]["throttle_next"] == 0, "the throttle must be lifted before the freeze"
    assert "throttle" in res.stderr and "MiB/s" in res.stderr


@needs_ns
def test_wrong_token_is_refused_and_source_untouched(e2e, hosts, token, tmp_path):
    """The source is refused (20) and untouched; the receiver logs the refusal, keeps
    listening for the right source, and gives up (20) only at --accept-timeout."""
    w = e2e.spawn("writer", "mib=8", "rate=1000", "report=0")
    rcv = Receiver(e2e, hosts, token, "--accept-timeout", "10")
    try:
        res, stats = migrate(e2e, hosts, _token_file(tmp_path / "other"), w.pid)
        assert_error(res, 20, "authentication", "not touched")
        assert rcv.popen.poll() is None, f"the receiver must keep listening\n{rcv.result()}"
        got = rcv.wait()
        assert_error(got, 20, "no source authenticated", "failed authentication", "nothing was")
        refusals = [ln for ln in got.stderr.splitlines() if ln.startswith("refused ")]
        assert len(refusals) == 1 and f"{hosts.src_ip}:" in refusals[0], got.stderr
        assert "failed authentication" in refusals[0]
    finally:
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["exit_code"] == 20
    assert not stats["rounds"]
    assert_source_kept(w, "wrong token")


@needs_ns
def test_migrate_and_receive_json(e2e, hosts, token, tmp_path):
    """--json (docs/CLI.md): migrate prints its --stats-json document, receive its result
    once the process runs there (which then verifies), each as the only thing on
    stdout; a refused migration prints the stats with outcome "failed" and its error."""
    w = e2e.spawn("writer", "mib=8", "rate=1000", "report=0")
    rcv = Receiver(e2e, hosts, token, "--json")
    try:
        res, stats = migrate(e2e, hosts, token, w.pid, "--json")
        assert res.returncode == 0, str(res)
        doc = json.loads(res.stdout)
        assert doc == stats, "--json prints the --stats-json document"
        assert doc["outcome"] == "migrated" and doc["remote_pid"] == w.pid
        assert doc["source_pid"] == w.pid and doc["rounds"] and doc["bytes_wire"] > 0
        assert doc["error"] is None and doc["exit_code"] == 0
        assert "migrated process" not in res.stderr, "--json replaces the summary line"
        assert w.reap() == -signal.SIGKILL

        end = time.monotonic() + DEADLINE
        while True:
            try:
                got = json.loads(rcv.stdout())
                break
            except ValueError:
                assert rcv.popen.poll() is None and time.monotonic() < end, rcv.result()
                time.sleep(POLL)
        assert got["pid"] == w.pid and got["source_pid"] == w.pid and got["detached"] is False
        assert got["layers"] == len(doc["rounds"]) + 1 and got["bytes_received"] > 0
        assert got["confirmed"] is True and got["image"] is None
        assert got["downtime_ms"] == pytest.approx(got["source_frozen_ms"] + got["destination_ms"])
        line = verify_at(w, rcv.global_pid(got["pid"]), got["pid"])
        assert line.startswith("VERIFY OK"), line
        done = rcv.wait()
        assert done.returncode == 0, f"the receiver exits with the process's status\n{done}"
        assert json.loads(done.stdout) == got and "received process" not in done.stderr
    finally:
        rcv.kill()

    w = e2e.spawn("writer", "mib=8", "rate=1000", "report=0")
    rcv = Receiver(e2e, hosts, token, "--accept-timeout", "10")
    try:
        res, stats = migrate(e2e, hosts, _token_file(tmp_path / "other"), w.pid, "--json")
        assert_error(res, 20, "authentication")
        doc = json.loads(res.stdout)
        assert doc == stats and doc["outcome"] == "failed" and doc["exit_code"] == 20
        assert doc["error"] == res.stderr.splitlines()[-1].removeprefix("ckpt: error: ")
    finally:
        rcv.kill()
    assert_source_kept(w, "wrong token")


@needs_ns
def test_receiver_killed_midstream(e2e, hosts, token):
    w = e2e.spawn("writer", "mib=16", "rate=2000", "report=0")
    rcv = Receiver(e2e, hosts, token, env=e2e.env(CKPT_FAULT="receive-midstream"))
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert_error(res, 21, "connection", "keeps running here")
        got = rcv.wait()
        assert got.returncode != 0, str(got)
    finally:
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["remote_pid"] is None
    assert_source_kept(w, "receiver killed mid-stream")


@needs_ns
def test_destination_restore_fails(e2e, hosts, token):
    w = e2e.spawn("writer", "mib=16", "rate=2000", "report=0")
    rcv = Receiver(e2e, hosts, token, env=e2e.env(CKPT_FAULT="receive-restore"))
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert_error(res, 23, "could not restore", "injected fault", "keeps running here")
        got = rcv.wait()
        assert_error(got, 11, "injected fault", "source keeps running")
    finally:
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["exit_code"] == 23
    assert_source_kept(w, "destination restore failed")


@needs_ns
def test_staged_restore_fails_mid_precopy(e2e, hosts, token):
    """The destination's staged process cannot be built further (CKPT_FAULT=receive-stage
    when round 2's layout is applied): it is killed there, the source hears why
    during pre-copy, and its copy runs on unharmed."""
    w = e2e.spawn("writer", "mib=16", "rate=2000", "report=0")
    rcv = Receiver(e2e, hosts, token, env=e2e.env(CKPT_FAULT="receive-stage"))
    try:
        res, stats = migrate(
            e2e, hosts, token, w.pid, "--max-rounds", "5", "--target-downtime-ms", "1",
            "--throttle", "off",
        )  # fmt: skip
        assert_error(res, 23, "injected fault", "keeps running here")
        got = rcv.wait()
        assert_error(got, 11, "injected fault", "partly built copy was killed")
        assert not rcv.stdout().strip(), "the destination must not report a running copy"
    finally:
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["remote_pid"] is None
    assert len(stats["rounds"]) <= 3, "the failure must surface during pre-copy"
    assert_source_kept(w, "staged restore failed mid pre-copy")


@needs_ns
@pytest.mark.parametrize("how", ["link-down", "connection-dropped"])
def test_network_cut_in_final_round(e2e, hosts, token, how):
    """Right after the final round's first frame (FROZEN) the link goes down, or the
    source's connection drops: no side may end up without the process."""
    w = e2e.spawn("writer", "mib=16", "rate=2000", "report=0")
    rcv = Receiver(e2e, hosts, token, "--io-timeout", "3")
    env = e2e.env()
    if how == "link-down":
        env["CKPT_TEST_FROZEN_CMD"] = hosts.cut_cmd()
    else:
        env["CKPT_FAULT"] = "migrate-cut-final"
    try:
        res, stats = migrate(
            e2e, hosts, token, w.pid, "--io-timeout", "3", "--restore-timeout", "10", env=env
        )
        code = 24 if how == "link-down" else 21
        assert_error(res, code, "keeps running here")
        got = rcv.wait()
        assert_error(got, code, "final round", "nothing was restored")
    finally:
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["remote_pid"] is None
    assert len(stats["rounds"]) >= 1
    assert_source_kept(w, f"network cut in the final round ({how})")


# ---------------------------------------------------------------- protocol units


def _pair(token_a: bytes, token_b: bytes):
    """Run both handshakes over a socketpair; returns (client result, server result)."""
    a, b = socket.socketpair()
    ca, cb = Channel(a, "server", io_timeout=5), Channel(b, "client", io_timeout=5)
    out: dict = {}

    def server() -> None:
        try:
            out["server"] = server_handshake(cb, token_b)
        except Exception as exc:
            out["server"] = exc

    t = threading.Thread(target=server)
    t.start()
    try:
        out["client"] = client_handshake(ca, token_a)
    except Exception as exc:
        out["client"] = exc
    t.join(10)
    return ca, cb, out["client"], out["server"]


def test_handshake_accepts_same_token_and_tags_frames():
    tok = secrets.token_bytes(32)
    ca, cb, c, s = _pair(tok, tok)
    assert not isinstance(c, Exception) and not isinstance(s, Exception), (c, s)
    ca.send(protocol.LAYER_BEGIN, protocol.encode(protocol.LAYER_BEGIN, layer=0))
    f = cb.recv()
    assert f.type == protocol.LAYER_BEGIN and protocol.decode(f.type, f.payload) == {"layer": 0}
    # a flipped bit anywhere in a frame fails its tag
    raw = bytearray(b"\x10\x00\x00\x00\x01\x00" + bytes(16))
    ca.sock.sendall(bytes(raw))
    with pytest.raises(ProtocolError, match="failed authentication"):
        cb.recv()
    ca.close()
    cb.close()


def test_handshake_refuses_wrong_token_both_ways():
    ca, cb, c, s = _pair(secrets.token_bytes(32), secrets.token_bytes(32))
    assert isinstance(c, AuthFailed) and isinstance(s, AuthFailed), (c, s)
    assert "failed authentication" in str(s)
    ca.close()
    cb.close()


def test_oversized_and_malformed_frames_are_refused():
    a, b = socket.socketpair()
    cb = Channel(b, "peer", io_timeout=5)
    a.sendall(bytes([protocol.PING]) + (1 << 30).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="limit"):
        cb.recv()
    with pytest.raises(ProtocolError, match="missing or malformed"):
        protocol.decode(protocol.LAYER_BEGIN, protocol.encode(protocol.ABORT, reason="x"))
    frame = protocol.encode_chunk(0, [(0x1000, 1)], b"not zstd", 0, 4096)
    with pytest.raises(ProtocolError, match="checksum"):
        protocol.decode_chunk(b"".join(frame))
    bad_runs = protocol.encode_chunk(0, [(0x1000, 2)], b"x", 0, 4096)
    with pytest.raises(ProtocolError, match="runs cover"):
        protocol.decode_chunk(b"".join(bad_runs))
    a.close()
    cb.close()


def test_token_bucket_paces_to_the_rate():
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    tb = TokenBucket(1000.0, burst=100, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        tb.take(100)
    assert now[0] == pytest.approx(4.9, abs=0.01)  # 5000 bytes, 100 free


# ---------------------------------------------------------------- throttle


def _state(pid: int) -> str:
    st = proc_status(pid)
    return st["State"][:1] if st else "?"


def test_signal_throttle_stops_and_always_lifts(e2e):
    """The duty cycle stops the process; lift() and a dying owner both leave it running."""
    w = e2e.spawn("writer", "mib=1", "rate=0", "report=0")
    start = int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    thr = Throttle(w.pid, start, "signal", period=0.2)
    try:
        assert thr.set(0.9) == 0.9 and thr.backend == "signal"
        end = time.monotonic() + DEADLINE
        while _state(w.pid) != "T":
            assert time.monotonic() < end, "never stopped by the throttle"
            time.sleep(0.005)
        thr.lift()
        assert _state(w.pid) != "T"
    finally:
        thr.close()
    # an owner SIGKILLed while the process is stopped: the helper still lets it go
    script = (
        "import sys, time; from ckpt.transport.throttle import Throttle; "
        f"t = Throttle({w.pid}, {start}, 'signal', period=0.2); t.set(0.95); "
        "print('set', flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "set"
        end = time.monotonic() + DEADLINE
        while _state(w.pid) != "T":
            assert time.monotonic() < end, "never stopped by the throttle"
            time.sleep(0.005)
        owner.kill()
    finally:
        owner.kill()
        owner.wait()
    end = time.monotonic() + 10
    while _helper_alive(w.pid) or _state(w.pid) == "T":
        assert time.monotonic() < end, "a SIGKILLed owner left the process stopped"
        time.sleep(POLL)
    assert_source_kept(w, "throttle")


def _helper_alive(pid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"ckpt.kernel.throttle_helper" in cmd and str(pid).encode() in cmd:
                return True
    return False


def test_cgroup_throttle_writes_quota_and_undoes_it(e2e, tmp_path):
    """The cgroup v2 backend's file protocol, on a fake cgroup tree (this machine's cpu
    controller may be bound to cgroup v1): child made, process moved in, cpu.max set,
    and everything undone in reverse."""
    from ckpt.kernel.throttle_helper import CgroupBackend

    w = e2e.spawn("writer", "mib=1", "rate=0", "report=0")
    start = int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    rel = next(
        ln[3:].strip()
        for ln in Path(f"/proc/{w.pid}/cgroup").read_text().splitlines()
        if ln.startswith("0::")
    )
    home = tmp_path / rel.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    (home / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    (home / "cgroup.subtree_control").write_text("memory\n")
    (home / "cgroup.procs").write_text("")
    be = CgroupBackend(w.pid, start, 1.0, mount=str(tmp_path))
    child = home / f"ckpt-throttle-{w.pid}"
    assert (child / "cgroup.procs").read_text() == str(w.pid)
    assert (home / "cgroup.subtree_control").read_text() == "+cpu"
    be.set(0.75)
    assert (child / "cpu.max").read_text() == "250000 1000000"
    be.close()
    assert (child / "cpu.max").read_text() == "max 1000000"
    assert (home / "cgroup.subtree_control").read_text() == "-cpu"
    assert (home / "cgroup.procs").read_text() == str(w.pid)
    w.popen.kill()
    w.popen.wait()


def test_unsupported_process_is_refused_before_connecting(e2e, token):
    """An fd on a file whose name was deleted while another link remains would make the
    final capture fail: refuse before a byte is sent (port 1 on loopback has no
    receiver, so reaching the network would exit 25)."""
    cwd = e2e.path("unsupported")
    cwd.mkdir()
    gone = cwd / "deleted.log"
    with open(gone, "wb") as out:
        os.link(gone, cwd / "kept.log")
        gone.unlink()
        p = subprocess.Popen(
            ["sleep", "60"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL,
            cwd=cwd,
        )  # fmt: skip
    try:
        cmd = Cmd(
            [*MIG, "migrate", str(p.pid), "--to", "127.0.0.1:1", "--token-file", str(token)],
            e2e.base, e2e.env(), "migrate-unsupported",
        )  # fmt: skip
        res = cmd.wait()
        assert_error(res, 5, "deleted")
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_handshake_and_mismatch(tmp_path):
    from ckpt.transport import tls
    from ckpt.transport.errors import TlsError, TransportError

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=ckpt",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tok = secrets.token_bytes(32)

    def serve(opts_srv, out):
        srv = socket.create_server(("127.0.0.1", 0))
        out["port"] = srv.getsockname()[1]
        out["ready"].set()
        conn, _ = srv.accept()
        srv.close()
        try:
            ctx = tls.server_context(opts_srv)
            if ctx is not None:
                conn = tls.wrap_server(ctx, conn, "client")
            ch = Channel(conn, "client", io_timeout=5)
            server_handshake(ch, tok)
            out["frame"] = ch.recv()
            ch.close()
        except Exception as exc:
            out["error"] = exc
            conn.close()

    def run(opts_srv, opts_cli):
        out = {"ready": threading.Event()}
        t = threading.Thread(target=serve, args=(opts_srv, out))
        t.start()
        out["ready"].wait(10)
        sock = socket.create_connection(("127.0.0.1", out["port"]), timeout=5)
        try:
            ctx = tls.client_context(opts_cli)
            if ctx is not None:
                sock = tls.wrap_client(ctx, sock, "127.0.0.1", "server")
            ch = Channel(sock, "server", io_timeout=5)
            client_handshake(ch, tok)
            ch.send(protocol.DONE, protocol.encode(protocol.DONE))
            ch.close()
        except Exception as exc:
            out["client_error"] = exc
            sock.close()
        t.join(10)
        return out

    ok = run(tls.TlsOptions(str(cert), str(key)), tls.TlsOptions(ca=str(cert)))
    assert "error" not in ok and "client_error" not in ok, ok
    assert ok["frame"].type == protocol.DONE
    plain = run(tls.TlsOptions(str(cert), str(key)), tls.TlsOptions())
    assert isinstance(plain.get("error"), TlsError), plain
    assert isinstance(plain.get("client_error"), TransportError), plain


@needs_ns
def test_source_gives_up_waiting_and_destination_drops_its_copy(e2e, hosts, token):
    """The destination restores too slowly: the source stops waiting (--restore-timeout),
    keeps its copy and calls the handover off; the destination then kills the copy it
    restored instead of running a second one."""
    w = e2e.spawn("writer", "mib=8", "rate=1000", "report=0")
    rcv = Receiver(e2e, hosts, token, env=e2e.env(CKPT_FAULT="receive-slow-restore"))
    try:
        res, stats = migrate(e2e, hosts, token, w.pid, "--restore-timeout", "2")
        assert_error(res, 24, "did not report the process running", "keeps running here")
        got = rcv.wait()
        assert_error(got, 27, "called the handover off", "killed our copy")
        assert not rcv.stdout().strip(), "the destination must not report a running copy"
    finally:
        rcv.kill()
    assert stats["remote_pid"] is None
    assert_source_kept(w, "the source gave up waiting")


@needs_ns
def test_threads_migrate_staged(e2e, hosts, token):
    """A multi-threaded process through the staged path: every thread arrives with
    its TID, per-thread state and memory (tests/workloads/pthreads.c checks)."""
    w = e2e.spawn("pthreads", "2")
    rcv = Receiver(e2e, hosts, token)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert res.returncode == 0, str(res)
        assert stats["downtime"].get("staged"), "a single process must use the staged path"
        assert w.reap() == -signal.SIGKILL
        ns_pid = rcv.reported_pid()
        gpid = rcv.global_pid(ns_pid)
        assert len(os.listdir(f"/proc/{gpid}/task")) == 7
        line = verify_at(w, gpid, ns_pid)
        assert line.startswith("VERIFY OK"), line
        assert rcv.wait().returncode == 0
    finally:
        rcv.kill()


@needs_ns
def test_process_tree_migrates(e2e, hosts, token):
    """A parent with children, shared memory and a shared file: the tree goes as an
    image and is rebuilt at the destination with the same PIDs there."""
    from test_tree import members, reap_orphans

    w = e2e.spawn("tree")
    rcv = Receiver(e2e, hosts, token)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert res.returncode == 0, str(res)
        assert "descendants" in res.stderr
        assert not stats["downtime"].get("staged"), "a tree goes as an image"
        assert w.reap() == -signal.SIGKILL
        reap_orphans(members(w))
        ns_pid = rcv.reported_pid()
        assert ns_pid == w.pid
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK") and "offset=16" in line, line
        assert rcv.wait().returncode == 0
    finally:
        rcv.kill()


@needs_ns
def test_memfd_process_migrates_as_image(e2e, hosts, token):
    """A process mapping a memfd (its fd and a shared mapping of the same object):
    the staged restore cannot make memfds, so it goes as an image, and arrives whole."""
    w = e2e.spawn("fdkinds", "memfd")
    rcv = Receiver(e2e, hosts, token)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid)
        assert res.returncode == 0, str(res)
        assert "maps a memfd" in res.stderr
        assert not stats["downtime"].get("staged")
        assert w.reap() == -signal.SIGKILL
        ns_pid = rcv.reported_pid()
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), line
        assert rcv.wait().returncode == 0
    finally:
        rcv.kill()
