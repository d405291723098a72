"""Migration security (issue 11, parts 3 and 4): a receiver strangers cannot knock
over, a stream that is encrypted and authenticated by default, tokens that are
strong and private.

Receiver hardening is tested against a real `ckpt receive` on loopback (no
migration reaches it, so it needs no namespaces): oversized pre-auth frames,
a slow-drip peer, failed attempts. The rest runs real migrations between two
network namespaces (tests/test_migrate.py's fixtures): idle connections beside
a real source, and a TCP relay written here that records every byte both ways
(a packet capture) or flips one.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import DEADLINE, POLL, assert_error
from test_migrate import (  # noqa: F401 - hosts and token are fixtures
    MIG,
    Cmd,
    Receiver,
    _token_file,
    assert_source_kept,
    hosts,
    migrate,
    needs_ns,
    token,
    verify_at,
)

from ckpt.transport import protocol
from ckpt.transport.auth import client_handshake, estimate_bits, load_token, server_handshake
from ckpt.transport.channel import TAG_LEN, Channel
from ckpt.transport.errors import AuthFailed, ProtocolError, TokenRejected
from ckpt.transport.gate import FAIL_BURST, FAIL_EVERY

# ---------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopReceiver(Cmd):
    """`ckpt receive` on 127.0.0.1 (no namespaces: these tests never migrate into it)."""

    def __init__(self, e2e, token_file: Path, *extra: str):
        self.port = _free_port()
        argv = [
            *MIG, "receive", "--listen", f"127.0.0.1:{self.port}", "--token-file", str(token_file),
            *extra,
        ]  # fmt: skip
        super().__init__(argv, e2e.base, e2e.env(), f"receiver-{self.port}")
        end = time.monotonic() + DEADLINE
        while "listening on" not in self.stderr():
            if self.popen.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"the receiver did not start:\n{self.result()}")
            time.sleep(POLL)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def hwm_kib(self) -> int:
        """Peak resident memory of the receiver (VmHWM)."""
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def wait_line(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            lines = [ln for ln in self.stderr().splitlines() if re.search(pattern, ln)]
            if len(lines) >= count:
                return lines
            if time.monotonic() > end:
                raise AssertionError(f"no {count} lines matching {pattern!r}:\n{self.result()}")
            time.sleep(POLL)


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data
    except ConnectionResetError:
        return out


# ---------------------------------------------------------------- tokens


def _write_token(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "text",
    ["aaaaaaaaaaaaaaaa", "a" * 64, "password" * 6, "abcdefghijklmnopqrstuvwxyz0123456789",
     secrets.token_hex(16)],
)  # fmt: skip
def test_weak_tokens_are_refused(tmp_path, text):
    path = _write_token(tmp_path / "token", text + "\n")
    with pytest.raises(TokenRejected, match="too weak") as exc:
        load_token(str(path))
    assert exc.value.exit_code == 29
    assert "head -c 32 /dev/urandom | base64" in str(exc.value)


def test_random_tokens_are_accepted(tmp_path):
    import base64

    for text in (
        base64.b64encode(os.urandom(32)).decode(), secrets.token_urlsafe(32),
        secrets.token_hex(32),
    ):  # fmt: skip
        assert estimate_bits(text.encode()) >= 128
        assert load_token(str(_write_token(tmp_path / "t", text + "\n"))) == text.encode()


def test_token_file_must_be_ours_and_private(tmp_path):
    good = secrets.token_urlsafe(32)
    for mode, what in ((0o640, "group"), (0o604, "others"), (0o602, "others"), (0o620, "group")):
        path = _write_token(tmp_path / f"t{mode:o}", good, mode)
        with pytest.raises(TokenRejected, match=r"accessible by group or others.*chmod 600") as e:
            load_token(str(path))
        assert e.value.exit_code == 29, what
    path = _write_token(tmp_path / "theirs", good)
    os.chown(path, 65534, 65534)
    with pytest.raises(TokenRejected, match="owned by uid 65534, not by us"):
        load_token(str(path))


def test_cli_refuses_weak_token_and_bad_file_with_exit_29(e2e, tmp_path):
    weak = _write_token(tmp_path / "weak", "aaaaaaaaaaaaaaaa\n")
    shared = _write_token(tmp_path / "shared", secrets.token_urlsafe(32), 0o644)
    cases = [
        ([*MIG, "migrate", "1", "--to", "127.0.0.1:1", "--token-file", str(weak)], "too weak"),
        ([*MIG, "receive", "--listen", "127.0.0.1:1", "--token-file", str(weak),
          "--accept-timeout", "1"], "too weak"),
        ([*MIG, "migrate", "1", "--to", "127.0.0.1:1", "--token-file", str(shared)],
         "accessible by group or others"),
    ]  # fmt: skip
    for i, (argv, needle) in enumerate(cases):
        res = Cmd(argv, e2e.base, e2e.env(), f"token-{i}").wait(60)
        assert_error(res, 29, needle)


# ---------------------------------------------------------------- the frame layer


def _handshake_pair(cipher_c: str = protocol.CIPHER_AEAD, cipher_s: str = protocol.CIPHER_AEAD):
    tok = secrets.token_bytes(32)
    a, b = socket.socketpair()
    ca, cb = Channel(a, "server", io_timeout=5), Channel(b, "client", io_timeout=5)
    out: dict = {}

    def server() -> None:
        try:
            out["server"] = server_handshake(cb, tok, cipher_s)
        except Exception as exc:
            out["server"] = exc

    t = threading.Thread(target=server)
    t.start()
    try:
        out["client"] = client_handshake(ca, tok, cipher_c)
    except Exception as exc:
        out["client"] = exc
    t.join(10)
    return ca, cb, out["client"], out["server"]


def _raw_frame(ch: Channel) -> bytes:
    """One protected frame exactly as it crossed the wire (read past the channel)."""
    head = ch.sock.recv(5, socket.MSG_WAITALL)
    length = struct.unpack("!BI", head)[1]
    return head + ch.sock.recv(length + TAG_LEN, socket.MSG_WAITALL)


def test_frames_are_encrypted_and_replay_reorder_drop_detected():
    marker = secrets.token_bytes(32)
    payload = marker * 64
    ca, cb, c, s = _handshake_pair()
    assert not isinstance(c, Exception) and not isinstance(s, Exception), (c, s)
    assert ca.cipher == cb.cipher == protocol.CIPHER_AEAD
    frames = []
    for _ in range(3):
        ca.send(protocol.PAGES, payload)
        frames.append(_raw_frame(cb))
    assert all(marker not in f for f in frames), "the payload crossed the wire in the clear"
    assert frames[0][5:] != frames[1][5:], "the same payload must not encrypt the same twice"
    ca.sock.sendall(frames[0])  # in order: fine
    assert cb.recv().payload == payload
    ca.sock.sendall(frames[0])  # replayed
    with pytest.raises(ProtocolError, match="failed authentication"):
        cb.recv()
    ca.close()
    cb.close()

    for deliver in ([1], [2, 1]):  # frame 0 dropped; frames out of order
        ca, cb, _, _ = _handshake_pair()
        frames = []
        for _ in range(3):
            ca.send(protocol.PAGES, payload)
            frames.append(_raw_frame(cb))
        for i in deliver:
            ca.sock.sendall(frames[i])
        with pytest.raises(ProtocolError, match="failed authentication"):
            cb.recv()
        ca.close()
        cb.close()

    ca, cb, _, _ = _handshake_pair()  # a frame sent back the way it came
    ca.send(protocol.PING, protocol.encode(protocol.PING))
    frame = _raw_frame(cb)
    cb.sock.sendall(frame)
    with pytest.raises(ProtocolError, match="failed authentication"):
        ca.recv()
    ca.close()
    cb.close()


def test_cleartext_opt_out_still_authenticates():
    marker = secrets.token_bytes(32)
    ca, cb, _, _ = _handshake_pair(protocol.CIPHER_CLEAR, protocol.CIPHER_CLEAR)
    assert ca.cipher == cb.cipher == protocol.CIPHER_CLEAR
    ca.send(protocol.PAGES, marker)
    frame = bytearray(_raw_frame(cb))
    assert marker in frame
    frame[10] ^= 1
    ca.sock.sendall(bytes(frame))
    with pytest.raises(ProtocolError, match="failed authentication"):
        cb.recv()
    ca.close()
    cb.close()


def test_cipher_mismatch_is_refused_on_both_sides():
    ca, cb, c, s = _handshake_pair(protocol.CIPHER_CLEAR, protocol.CIPHER_AEAD)
    assert isinstance(s, ProtocolError) and "requires encryption" in str(s), s
    assert isinstance(c, ProtocolError) and "--insecure-cleartext" in str(c), c
    assert c.exit_code == 22
    ca.close()
    cb.close()


# ---------------------------------------------------------------- receiver hardening


def test_oversized_preauth_frame_is_refused_before_reading(e2e, token):  # noqa: F811
    """A header declaring a 256 MiB frame before authentication: refused from the
    header alone (no allocation: the receiver's peak RSS does not move), logged, and
    the receiver keeps listening."""
    rcv = LoopReceiver(e2e, token)
    try:
        before = rcv.hwm_kib()
        with rcv.connect() as s:
            s.sendall(protocol.PREAMBLE + struct.pack("!BI", protocol.STATE, (256 << 20) - 1))
            got = _read_until_closed(s, 10)
        assert got == protocol.PREAMBLE, got[:64]
        line = rcv.wait_line(r"^refused 127\.0\.0\.1:\d+: ")[0]
        assert "STATE frame of 268435455 bytes" in line and "limit 4096" in line, line
        grown = rcv.hwm_kib() - before
        assert grown < 32 << 10, f"the receiver grew by {grown} KiB for a refused frame"
        assert rcv.popen.poll() is None, "the receiver must keep listening"
        with rcv.connect() as s:  # and it still answers
            assert s.recv(8, socket.MSG_WAITALL) == protocol.PREAMBLE
    finally:
        rcv.kill()


def test_slow_drip_peer_is_cut_at_the_handshake_deadline(e2e, token):  # noqa: F811
    """One byte every 0.3 s never lets a read time out; the whole handshake's deadline
    (here 2 s) still closes the connection."""
    rcv = LoopReceiver(e2e, token, "--handshake-timeout", "2")
    s = rcv.connect()
    t0 = time.monotonic()
    stop = threading.Event()

    def drip() -> None:
        data = protocol.PREAMBLE + bytes(64)
        for i in range(len(data)):
            if stop.wait(0.3):
                return
            try:
                s.send(data[i : i + 1])
            except OSError:
                return

    t = threading.Thread(target=drip)
    t.start()
    try:
        got = _read_until_closed(s, 30)
        took = time.monotonic() - t0
        assert got == protocol.PREAMBLE
        assert 1.5 < took < 6, f"cut after {took:.1f} s, want about 2 s"
        line = rcv.wait_line(r"^refused 127\.0\.0\.1:\d+: ")[0]
        assert "did not complete the handshake within 2 s" in line, line
        assert rcv.popen.poll() is None
    finally:
        stop.set()
        t.join()
        s.close()
        rcv.kill()


def test_failure_limiter_bucket():
    from ckpt.transport.gate import FailureLimiter

    now = [0.0]
    lim = FailureLimiter(burst=3, every=2.0, clock=lambda: now[0])
    for _ in range(3):
        assert lim.wait("a") == 0
        lim.failed("a")
    assert lim.wait("a") == pytest.approx(2.0) and lim.wait("b") == 0, "per address"
    now[0] = 1.0
    assert lim.wait("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert lim.wait("a") == 0  # one more try
    lim.failed("a")
    assert lim.wait("a") == pytest.approx(2.0)
    now[0] = 100.0
    assert lim.wait("a") == 0  # refilled, but never beyond the burst
    for _ in range(3):
        lim.failed("a")
    assert lim.wait("a") > 0


def _attempt(rcv: LoopReceiver, tok: bytes) -> str:
    """One handshake from here; '' if it succeeded, else the error."""
    ch = Channel(rcv.connect(), "receiver", io_timeout=10)
    try:
        client_handshake(ch, tok)
        return ""
    except AuthFailed as exc:
        return str(exc)
    finally:
        ch.close()


def test_failed_attempts_are_rate_limited_and_logged(e2e, token):  # noqa: F811
    rcv = LoopReceiver(e2e, token)
    wrong = secrets.token_bytes(32)
    right = load_token(str(token))
    try:
        got = [_attempt(rcv, wrong) for _ in range(FAIL_BURST + 2)]
        for why in got[:FAIL_BURST]:
            assert "authentication failed" in why, got
        for why in got[FAIL_BURST:]:
            assert "rate limited" in why and "try again in" in why, got
        assert "rate limited" in _attempt(rcv, right), "the limit is per address"
        rcv.wait_line(r"^refused 127\.0\.0\.1:\d+: it failed authentication", FAIL_BURST)
        limited = rcv.wait_line(r"^refused 127\.0\.0\.1:\d+: too many failed attempts")
        assert len(limited) == 1, "a rate-limited address is logged once per few seconds"
        assert all(
            ln.startswith(("listening on", "refused 127.0.0.1:"))
            for ln in rcv.stderr().splitlines()
        ), rcv.stderr()
        time.sleep(FAIL_EVERY + 0.5)  # the budget refills: the right source gets in
        assert _attempt(rcv, right) == ""
        rcv.wait_line(r"^authenticated 127\.0\.0\.1:\d+ .*encrypted \(AES-256-GCM")
    finally:
        rcv.kill()


# ---------------------------------------------------------------- real migrations

PEERS = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
idle = socket.create_connection((host, port))
try:
    drip = socket.create_connection((host, port))
except OSError as exc:  # a receiver that stopped listening at the first connection
    print("drip", exc, file=sys.stderr)
    drip = None
print("connected", flush=True)
data = b"CKPTMIG\x02" + bytes([1]) + (4000).to_bytes(4, "big") + bytes(4000)  # a HELLO, slowly
for i in range(len(data) if drip else 0):
    try:
        drip.send(data[i : i + 1])
    except OSError:
        break
    time.sleep(0.5)
time.sleep(120)
"""


@needs_ns
def test_idle_and_slow_peers_do_not_stop_a_real_migration(e2e, hosts, token):  # noqa: F811
    """Two strangers connect first (one idle, one dripping a HELLO byte by byte) and stay
    connected: the real source still authenticates and migrates, and the strangers are
    closed (when it won, or at their handshake deadline if it took longer), each with
    one line naming them."""
    w = e2e.spawn("writer", "mib=8", "rate=1000", "report=0")
    rcv = Receiver(e2e, hosts, token)
    dst_ip, port = hosts.to.split(":")
    peers = subprocess.Popen(
        ["ip", "netns", "exec", hosts.src, sys.executable, "-c", PEERS, dst_ip, port],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peers.stdout.readline().strip() == "connected"
        res, _ = migrate(e2e, hosts, token, w.pid)
        assert res.returncode == 0, f"{res}\n{rcv.result()}"
        assert w.reap() == -signal.SIGKILL
        ns_pid = rcv.reported_pid()
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), line
        assert rcv.wait().returncode == 0
        err = rcv.stderr()
        cut = [ln for ln in err.splitlines() if ln.startswith(f"refused {hosts.src_ip}:")]
        assert len(cut) == 2, err
        why = ("another source authenticated first", "did not complete the handshake within")
        assert all(any(w in ln for w in why) for ln in cut), err
    finally:
        peers.kill()
        peers.wait()
        rcv.kill()


RELAY = r"""
import socket, sys, threading
lhost, lport, thost, tport, prefix, flip = sys.argv[1:7]
srv = socket.create_server((lhost, int(lport)))
print("up", flush=True)
a, _ = srv.accept()
srv.close()
b = socket.create_connection((thost, int(tport)))

def pump(src, dst, path, flip):
    seen = 0
    with open(path, "wb") as rec:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            if seen <= flip < seen + len(data):
                data = bytearray(data)
                data[flip - seen] ^= 0x01
                data = bytes(data)
            rec.write(data)
            seen += len(data)
            try:
                dst.sendall(data)
            except OSError:
                break
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

t = threading.Thread(target=pump, args=(b, a, prefix + ".s2c", -1))
t.start()
pump(a, b, prefix + ".c2s", int(flip))
t.join()
"""


class Relay:
    """A TCP relay in the source's namespace that records (or alters) every byte."""

    def __init__(self, e2e, net, flip: int = -1):
        self.port = 7412
        self.prefix = e2e.path("capture")
        dst_ip, port = net.to.split(":")
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", net.src, sys.executable, "-c", RELAY, "127.0.0.1",
             str(self.port), dst_ip, port, str(self.prefix), str(flip)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.popen.stdout.readline().strip() == "up"

    @property
    def to(self) -> str:
        return f"127.0.0.1:{self.port}"

    def captured(self, direction: str) -> bytes:
        self.popen.wait(30)
        return Path(f"{self.prefix}.{direction}").read_bytes()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


@needs_ns
@pytest.mark.parametrize("mode", ["default", "insecure-cleartext"])
def test_packet_capture_shows_no_memory_unless_opted_out(e2e, hosts, token, mode):  # noqa: F811
    """Every byte of a migration, both ways, recorded by a relay: the process's memory
    and its pipe's bytes must not be in it by default, and are with the opt-out (which
    both sides must ask for, and which warns)."""
    mem, pipe = secrets.token_bytes(32), secrets.token_bytes(24)
    w = e2e.spawn("secret", mem.hex(), pipe.hex(), "8")
    extra = ["--insecure-cleartext"] if mode != "default" else []
    rcv = Receiver(e2e, hosts, token, *extra)
    relay = Relay(e2e, hosts)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid, *extra, to=relay.to)
        assert res.returncode == 0, f"{res}\n{rcv.result()}"
        assert w.reap() == -signal.SIGKILL
        ns_pid = rcv.reported_pid()
        line = verify_at(w, rcv.global_pid(ns_pid), ns_pid)
        assert line.startswith("VERIFY OK"), line
        assert rcv.wait().returncode == 0
        c2s = relay.captured("c2s")
    finally:
        relay.kill()
        rcv.kill()
    assert len(c2s) > 8 << 20, "the migration did not go through the relay"
    assert len(c2s) >= stats["bytes_wire"]
    if mode == "default":
        assert mem not in c2s, "process memory readable in the capture"
        assert pipe not in c2s, "pipe bytes readable in the capture"
        assert "encrypted (AES-256-GCM" in res.stderr
        assert "warning" not in res.stderr.lower()
    else:
        assert mem in c2s and pipe in c2s, "the opt-out should send memory as it is"
        for out in (res.stderr, rcv.stderr()):
            warns = [ln for ln in out.splitlines() if "--insecure-cleartext" in ln]
            assert warns and warns[0].startswith("warning: --insecure-cleartext"), out


@needs_ns
def test_tampered_byte_is_detected_and_source_keeps_running(e2e, hosts, token):  # noqa: F811
    """One bit flipped by the relay in the middle of the page stream: the destination
    refuses the frame (22) and builds nothing; the source hears it and runs on."""
    w = e2e.spawn("secret", secrets.token_hex(32), secrets.token_hex(8), "8")
    rcv = Receiver(e2e, hosts, token)
    relay = Relay(e2e, hosts, flip=3 << 20)
    try:
        res, stats = migrate(e2e, hosts, token, w.pid, to=relay.to)
        assert "encrypted (AES-256-GCM" in res.stderr, res.stderr
        assert_error(res, 23, "failed authentication", "keeps running here")
        got = rcv.wait()
        assert_error(got, 22, "failed authentication", "nothing was restored")
    finally:
        relay.kill()
        rcv.kill()
    assert stats["outcome"] == "failed" and stats["remote_pid"] is None
    assert_source_kept(w, "a tampered stream")
