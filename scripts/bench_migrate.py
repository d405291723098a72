#!/usr/bin/env python3
"""Benchmark: live migration over a veth pair vs. an offline dump + copy + restore.

Two network namespaces joined by a veth pair stand for two hosts (as in
tests/test_migrate.py). For each write rate of the workload (tests/workloads/
writer.c: N MiB, every page written once, then R MiB/s of random page writes)
and each --max-bandwidth setting it migrates the process and reports total time,
bytes on the wire, round 0's copy rate (pages and wire), rounds, throttle, and
the downtime measured at the destination (docs/MIGRATION.md defines it). Each
migration runs once per --crypto mode, one after the other in the same run:
`aead` (the default stream: AES-256-GCM keyed from the token) and `cleartext`
(`--insecure-cleartext` on both sides: HMAC tags only), so their cost compares
on the same machine state. The offline baseline in the same run: `ckpt dump`
(the process is frozen from its start), the image sent through the same veth,
`ckpt restore` there; its downtime is the sum. Each migrated process verifies
its whole memory afterwards (a FAIL aborts the benchmark).

    python scripts/bench_migrate.py [--mib 1024] [--rates 0,16,64] [--limits none,100]
                                    [--crypto aead,cleartext] [--repeat N] [--no-offline]
                                    [--no-verify]
                                    [--throttle auto] [--image-rates 64] (also the pre-staging
                                    path) [--work-dir DIR] [-v]
Needs root, iproute2 and gcc.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PY = sys.executable
PORT = 7419
MIB = float(1 << 20)


def mig_cmd() -> list[str]:
    return [PY, "-m", "ckpt"]


# ---------------------------------------------------------------- hosts


@dataclass
class Hosts:
    src: str
    dst: str
    src_ip: str
    dst_ip: str

    def exec_src(self) -> list[str]:
        return ["ip", "netns", "exec", self.src]

    def exec_dst(self) -> list[str]:
        return ["ip", "netns", "exec", self.dst]


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


@contextlib.contextmanager
def two_hosts():
    tag = secrets.token_hex(3)
    h = Hosts(f"ckbench-s-{tag}", f"ckbench-d-{tag}", "10.214.0.1", "10.214.0.2")
    sdev, ddev = f"cbs{tag}", f"cbd{tag}"
    try:
        ip("netns", "add", h.src)
        ip("netns", "add", h.dst)
        ip("link", "add", sdev, "type", "veth", "peer", "name", ddev)
        ip("link", "set", sdev, "netns", h.src)
        ip("link", "set", ddev, "netns", h.dst)
        for ns, dev, addr in ((h.src, sdev, h.src_ip), (h.dst, ddev, h.dst_ip)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield h
    finally:
        for ns in (h.src, h.dst):
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns, check=False)


# ---------------------------------------------------------------- the workload


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "writer")
    src = os.path.join(REPO, "tests", "workloads", "writer.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, src], check=True)
    return exe


class Writer:
    def __init__(self, exe: str, mib: int, rate_mib: float, tmp: str, n: int):
        self.cwd = os.path.join(tmp, f"w{n}")
        os.mkdir(self.cwd)
        self.log = os.path.join(self.cwd, "writer.log")
        args = [exe, f"mib={mib}", f"rate={int(rate_mib * 256)}", "report=0", "seed=7"]
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=True,
            )  # fmt: skip
        self.pid = self.popen.pid
        self.wait_line("READY", self.pid, 300)

    def lines(self) -> list[str]:
        with open(self.log, errors="replace") as f:
            return f.read().splitlines()

    def wait_line(self, word: str, pid: int, timeout: float) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ln in self.lines():
                if ln.startswith(word) and f"pid={pid} " in ln + " ":
                    return ln
            time.sleep(0.05)
        raise SystemExit(f"no {word} from pid {pid}:\n" + "\n".join(self.lines()[-5:]))

    def verify(self, global_pid: int, ns_pid: int) -> None:
        os.kill(global_pid, signal.SIGUSR2)
        line = self.wait_line("VERIFY", ns_pid, 300)
        if not line.startswith("VERIFY OK"):
            raise SystemExit(f"the migrated process is damaged: {line}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def ns_global_pid(init_parent: int, ns_pid: int) -> int:
    kids = read(f"/proc/{init_parent}/task/{init_parent}/children").split()
    ns = os.readlink(f"/proc/{kids[0]}/ns/pid")
    for e in os.listdir("/proc"):
        try:
            if e.isdigit() and os.readlink(f"/proc/{e}/ns/pid") == ns:
                for ln in read(f"/proc/{e}/status").splitlines():
                    if ln.startswith("NSpid:") and int(ln.split()[-1]) == ns_pid:
                        return int(e)
        except OSError:
            continue
    raise SystemExit(f"process {ns_pid} not found in the receiver's namespace")


# ---------------------------------------------------------------- runs


@dataclass
class Row:
    writes: float
    limit: str
    mode: str
    crypto: str = "-"
    total_s: float = 0.0
    wire_mib: float = 0.0
    r0_pages_mib_s: float = 0.0  # round 0: MiB of pages copied per second
    r0_wire_mib_s: float = 0.0  # round 0: MiB on the wire per second
    rounds: int = 0
    stop: str = ""
    throttle: float = 0.0
    downtime_ms: float = 0.0
    parts: dict = field(default_factory=dict)


def _parts(d: dict) -> dict:
    """The downtime breakdown: source part, then the destination's milestones."""
    out = {"src": d["source_freeze_to_marker_ms"]}
    if d.get("source_state_sent_ms") is not None:
        out["src→state"] = d["source_state_sent_ms"]  # source clock: freeze → STATE sent
    p = d.get("destination_parts") or {}
    if d.get("staged"):
        out["final@"] = p.get("final_end_at_ms", 0.0)  # final pages in place (after marker)
        out["state@"] = p.get("state_at_ms", 0.0)  # process state received
        out["zap"] = p.get("zap_ms", 0.0)
        out["apply"] = p.get("state_ms", 0.0)  # Rebuilder.apply_state()
        out["dst"] = d["destination_ms"]
    else:
        out.update(
            restore=d["destination_restore_ms"], commit=d["destination_commit_ms"],
            dst=d["destination_ms"],
        )  # fmt: skip
    return out


def run_migration(
    h: Hosts, exe, args, rate, limit, tmp, n, token, mode="migrate", crypto="aead"
) -> Row:
    w = Writer(exe, args.mib, rate, tmp, n)
    mig = mig_cmd()
    clear = ["--insecure-cleartext"] if crypto == "cleartext" else []
    with open(os.path.join(tmp, f"recv{n}.log"), "wb") as rlog:
        recv = subprocess.Popen(
            [*h.exec_dst(), "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *mig,
             "receive", "--listen", f"{h.dst_ip}:{PORT}", "--token-file", token,
             "-D", args.work_dir or tmp, *(["--no-stage"] if mode == "image" else []), *clear],
            stdin=subprocess.DEVNULL, stdout=rlog, stderr=rlog, cwd=tmp,
        )  # fmt: skip
    stats_path = os.path.join(tmp, f"stats{n}.json")
    extra = ["--max-bandwidth", limit] if limit != "none" else []
    try:
        t = time.monotonic()
        res = subprocess.run(
            [*h.exec_src(), *mig, "migrate", str(w.pid), "--to", f"{h.dst_ip}:{PORT}",
             "--token-file", token, "--stats-json", stats_path, "--throttle", args.throttle,
             *extra, *clear],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=tmp,
        )  # fmt: skip
        wall = time.monotonic() - t
        if res.returncode != 0:
            raise SystemExit(f"migration failed:\n{res.stderr}")
        if args.verbose:
            print(res.stderr, file=sys.stderr)
        st = json.loads(read(stats_path))
        if not args.no_verify:
            ns_pid = st["remote_pid"]
            w.verify(ns_global_pid(recv.pid, ns_pid), ns_pid)
        r0 = st["rounds"][0]
        return Row(
            writes=rate, limit=limit, mode=mode, crypto=crypto, total_s=wall,
            wire_mib=st["bytes_wire"] / MIB, rounds=len(st["rounds"]), stop=st["stop_reason"],
            r0_pages_mib_s=r0["bytes_raw"] / MIB / r0["seconds"],
            r0_wire_mib_s=r0["bytes_wire"] / MIB / r0["seconds"],
            throttle=st["throttle"]["max_level"], downtime_ms=st["downtime_ms"],
            parts=_parts(st["downtime"]),
        )  # fmt: skip
    finally:
        recv.kill()
        recv.wait()
        w.kill()


RECV_TAR = (
    "import socket,sys,tarfile; s=socket.create_server((sys.argv[1],int(sys.argv[2])));"
    "print('up',flush=True); c,_=s.accept(); f=c.makefile('rb');"
    "tarfile.open(fileobj=f,mode='r|').extractall(sys.argv[3]); print('done',flush=True)"
)
SEND_TAR = (
    "import socket,sys,tarfile,os,time\n"
    "for i in range(100):\n"
    "    try: c=socket.create_connection((sys.argv[1],int(sys.argv[2]))); break\n"
    "    except OSError: time.sleep(0.05)\n"
    "f=c.makefile('wb'); t=tarfile.open(fileobj=f,mode='w|')\n"
    "t.add(sys.argv[3],arcname=os.path.basename(sys.argv[3])); t.close(); f.close(); c.close()"
)


def run_offline(h: Hosts, exe, args, rate, tmp, n) -> Row:
    w = Writer(exe, args.mib, rate, tmp, n)
    img = os.path.join(tmp, f"img{n}")
    dst = os.path.join(tmp, f"dst{n}")
    os.mkdir(dst)
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [*h.exec_src(), PY, "-m", "ckpt", "dump", str(w.pid), "-D", img],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if r.returncode:
            raise SystemExit(f"offline dump failed:\n{r.stderr}")
        w.popen.wait()
        t1 = time.monotonic()
        rx = subprocess.Popen(
            [*h.exec_dst(), PY, "-c", RECV_TAR, h.dst_ip, str(PORT + 1), dst],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        rx.stdout.readline()
        subprocess.run(
            [*h.exec_src(), PY, "-c", SEND_TAR, h.dst_ip, str(PORT + 1), img], check=True
        )
        rx.wait()
        t2 = time.monotonic()
        r = subprocess.run(
            [*h.exec_dst(), PY, "-m", "ckpt", "restore", "-D",
             os.path.join(dst, os.path.basename(img)), "--detach"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if r.returncode:
            raise SystemExit(f"offline restore failed:\n{r.stderr}")
        t3 = time.monotonic()
        pid = int(r.stdout.split()[0])
        if not args.no_verify:
            w.verify(pid, pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        size = sum(os.path.getsize(os.path.join(img, f)) for f in os.listdir(img))
        return Row(
            writes=rate, limit="none", mode="offline", total_s=t3 - t0, wire_mib=size / MIB,
            downtime_ms=(t3 - t0) * 1000,
            parts={"dump": (t1 - t0) * 1000, "copy": (t2 - t1) * 1000,
                   "restore": (t3 - t2) * 1000},
        )  # fmt: skip
    finally:
        w.kill()
        shutil.rmtree(img, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)


def print_table(rows: list[Row], mib: int) -> None:
    print(f"\n{mib} MiB process over a veth pair (downtime as measured at the destination)\n")
    head = (
        f"{'writes MiB/s':>12} {'limit MiB/s':>11} {'mode':>8} {'crypto':>9} {'total s':>8} "
        f"{'wire MiB':>9} {'r0 pages/s':>10} {'r0 wire/s':>9} {'rounds':>6} {'stop':>13} "
        f"{'throttle':>8} {'downtime ms':>11}  breakdown (ms)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.parts.items())
        r0 = (
            f"{r.r0_pages_mib_s:>10.0f} {r.r0_wire_mib_s:>9.0f}" if r.r0_pages_mib_s
            else f"{'-':>10} {'-':>9}"
        )  # fmt: skip
        print(
            f"{r.writes:>12g} {r.limit:>11} {r.mode:>8} {r.crypto:>9} {r.total_s:>8.2f} "
            f"{r.wire_mib:>9.1f} {r0} {r.rounds or '-':>6} {r.stop or '-':>13} "
            f"{r.throttle * 100:>7.0f}% {r.downtime_ms:>11.0f}  {parts}"
        )
    print(
        "\nmigrate (staged restore): src = source freeze → FROZEN marker sent, src→state = "
        "freeze → process state sent (source clock); at the "
        "destination, from the marker's arrival: final@ = the final round's pages are in "
        "place, state@ = the process state arrived, zap = stale pages dropped, apply = "
        "Rebuilder.apply_state(), dst = the process runs; downtime = src + dst.\n"
        "image (receive --no-stage): dst = final layer + commit + a full restore.\n"
        "offline: the process is frozen from the start of `ckpt dump`; downtime = dump + copy "
        "+ restore.\n"
        "crypto: aead = the default stream (AES-256-GCM, keys from the token), cleartext = "
        "--insecure-cleartext on both sides (HMAC-SHA256 tags only); r0 pages/s and wire/s = "
        "round 0's copy rate in MiB/s of pages and of bytes on the wire."
    )


def print_crypto_summary(rows: list[Row]) -> None:
    """Medians per setting and crypto mode, and the encrypted stream's cost relative to
    the cleartext one (only for settings that ran both)."""
    from statistics import median

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.mode == "migrate":
            groups.setdefault((r.writes, r.limit, r.crypto), []).append(r)
    settings = list(dict.fromkeys((w, lim) for w, lim, _ in groups))  # in the order run
    if not any((w, lim, "aead") in groups and (w, lim, "cleartext") in groups
               for w, lim in settings):  # fmt: skip
        return
    print("\nencrypted (aead) vs --insecure-cleartext, medians of the runs above\n")
    head = (
        f"{'writes MiB/s':>12} {'limit MiB/s':>11} {'crypto':>9} {'runs':>4} {'total s':>8} "
        f"{'r0 pages/s':>10} {'r0 wire/s':>9} {'downtime ms':>11}"
    )
    print(head)
    print("-" * len(head))
    for w, lim in settings:
        med = {}
        for crypto in ("aead", "cleartext"):
            rs = groups.get((w, lim, crypto))
            if not rs:
                continue
            med[crypto] = m = (
                median(r.total_s for r in rs), median(r.r0_pages_mib_s for r in rs),
                median(r.r0_wire_mib_s for r in rs), median(r.downtime_ms for r in rs),
            )  # fmt: skip
            print(
                f"{w:>12g} {lim:>11} {crypto:>9} {len(rs):>4} {m[0]:>8.2f} {m[1]:>10.0f} "
                f"{m[2]:>9.0f} {m[3]:>11.0f}"
            )
        if len(med) == 2:
            a, c = med["aead"], med["cleartext"]
            print(
                f"{'':>12} {'':>11} {'aead/clear':>9} {'':>4} {a[0] / c[0]:>8.2f} "
                f"{a[1] / c[1]:>10.2f} {a[2] / c[2]:>9.2f} {a[3] / c[3]:>11.2f}"
            )


def frame_layer_speed(seconds: float = 2.0) -> str:
    """The channel alone, both crypto modes: 1 MiB frames of random bytes from this
    process to a forked child over a unix socketpair (no compression, no migration:
    the two ends are two processes, as on two hosts), in MiB/s of payload."""
    import socket

    from ckpt.transport import protocol
    from ckpt.transport.channel import Channel

    out = []
    for name, cipher in (("aead", protocol.CIPHER_AEAD), ("cleartext", protocol.CIPHER_CLEAR)):
        a, b = socket.socketpair()
        keys = os.urandom(32), os.urandom(32)
        pid = os.fork()
        if pid == 0:  # the receiving end
            try:
                a.close()
                rx = Channel(b, "tx", io_timeout=30)
                rx.protect(cipher, keys[1], keys[0])
                while rx.recv().type == protocol.PAGES:
                    pass
            finally:
                os._exit(0)
        b.close()
        tx = Channel(a, "rx", io_timeout=30)
        tx.protect(cipher, keys[0], keys[1])
        payload = os.urandom(1 << 20)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            tx.send(protocol.PAGES, payload)
            n += 1
        tx.send(protocol.DONE, b"")
        os.waitpid(pid, 0)
        dt = time.perf_counter() - t0
        tx.close()
        out.append(f"{name} {n / dt:.0f} MiB/s")
    return "frame layer alone (1 MiB frames, two processes, socketpair): " + ", ".join(out)


def aead_speed() -> str:
    """This machine's AES-256-GCM rate on one core, for 1 MiB frames (the stream's unit)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, data = AESGCM(os.urandom(32)), os.urandom(1 << 20)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 0.5:
        box = key.encrypt(n.to_bytes(12, "big"), data, b"head")
        key.decrypt(n.to_bytes(12, "big"), box, b"head")
        n += 1
    dt = time.perf_counter() - t
    return f"AES-256-GCM on one core, 1 MiB frames: {n / dt:.0f} MiB/s encrypt+decrypt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rates", default="0,16,64", help="MiB/s of random page writes")
    ap.add_argument("--limits", default="none,100", help="--max-bandwidth values (MiB/s)")
    ap.add_argument("--throttle", default="auto", choices=["auto", "cgroup", "signal", "off"])
    ap.add_argument(
        "--crypto", default="aead,cleartext",
        help="stream protection(s) to compare: aead (default stream), cleartext "
        "(--insecure-cleartext)",
    )  # fmt: skip
    ap.add_argument(
        "--repeat", type=int, default=1,
        help="run each migration N times, the crypto modes alternating (the summary "
        "gives medians)",
    )  # fmt: skip
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument(
        "--image-rates", default="",
        help="also migrate with `receive --no-stage` (restore from an image) at these rates",
    )  # fmt: skip
    ap.add_argument("--work-dir", default=None, help="receive -D (default: the run's temp dir)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="show ckpt migrate's output")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("needs root and iproute2")
    rates = [float(x) for x in args.rates.split(",")]
    limits = args.limits.split(",")
    cryptos = args.crypto.split(",")
    if not set(cryptos) <= {"aead", "cleartext"}:
        raise SystemExit(f"--crypto: aead and/or cleartext, not {args.crypto!r}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-mig-") as tmp, two_hosts() as h:
        exe = build(tmp)
        token = os.path.join(tmp, "token")
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        n = 0
        for rate in rates:
            for limit in limits:
                for crypto in cryptos * args.repeat:
                    n += 1
                    print(
                        f"migrate: writes {rate:g} MiB/s, limit {limit}, {crypto} ...",
                        file=sys.stderr,
                    )
                    rows.append(
                        run_migration(h, exe, args, rate, limit, tmp, n, token, crypto=crypto)
                    )
            if f"{rate:g}" in args.image_rates.split(","):
                n += 1
                print(f"migrate --no-stage: writes {rate:g} MiB/s ...", file=sys.stderr)
                rows.append(
                    run_migration(
                        h, exe, args, rate, "none", tmp, n, token, "image", crypto=cryptos[0]
                    )
                )
            if not args.no_offline:
                n += 1
                print(f"offline: writes {rate:g} MiB/s ...", file=sys.stderr)
                rows.append(run_offline(h, exe, args, rate, tmp, n))
    print(aead_speed())
    print(frame_layer_speed())
    print_table(rows, args.mib)
    print_crypto_summary(rows)


if __name__ == "__main__":
    main()
