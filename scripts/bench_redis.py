#!/usr/bin/env python3
"""Benchmark: dump and restore of Debian's redis-server holding 200k keys.

For each case a fresh redis-server (loopback port, no persistence) is filled
through `redis-cli --pipe`; with a writer, redis-benchmark then runs SETs on its
own keys (4 clients, pipeline 4, 64-byte values, 100k random keys) during the
whole dump. ckpt dumps it (`--tcp-established`; `--iterative` or a plain stop-
the-world dump) and kills it, restores it with `--detach`, and the restored
server must answer PING and hold every key it had (DBSIZE).

Columns: dump = wall time of `ckpt dump` (Python start-up included); total =
ckpt's own figure; freeze = the time the process was stopped (the final round
for --iterative, the whole dump otherwise); rounds = pre-copy rounds (+1 final);
image = the image directory on disk; restore = wall time of `ckpt restore
--detach`; serve = from the restore's start until the restored server answers
PING.

    python scripts/bench_redis.py [--keys 200000] [--repeat 3] [--cases ...]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

CKPT = [sys.executable, "-m", "ckpt"]
CASES = ("iterative", "iterative+writer", "plain", "plain+writer")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} not found (apt-get install redis-server redis-tools)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(port: int, *args: str, stdin: bytes | None = None) -> str:
    res = subprocess.run(
        [tool("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"redis-cli {args[0]}: {res.stderr.decode()}{res.stdout.decode()}")
    return res.stdout.decode()


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait(pred, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def clients(port: int) -> int:
    return len(cli(port, "CLIENT", "LIST").splitlines()) - 1  # not redis-cli itself


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def reap(pid: int, timeout: float = 30) -> None:
    """Wait for pid to go away (reaped by us: we are a child subreaper)."""
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.005)


def fill_payload(keys: int) -> bytes:
    out = []
    for i in range(keys):
        k = f"k:{i}".encode()
        v = f"{(i * 2654435761) % (1 << 32):08x}".encode() * (1 + i % 12)
        out.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
    return b"".join(out)


def run_case(case: str, keys: int, payload: bytes, tmp: str) -> dict:
    port = free_port()
    cwd = tempfile.mkdtemp(dir=tmp)
    img = os.path.join(cwd, "img")
    stats_path = os.path.join(cwd, "stats.json")
    procs: list[subprocess.Popen] = []
    restored = None
    try:
        server = subprocess.Popen(
            [tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", cwd,
             "--logfile", os.path.join(cwd, "redis.log")],
            cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        procs.append(server)
        wait(lambda: ping(port), "redis-server to answer PING")
        out = cli(port, "--pipe", stdin=payload)
        if "errors: 0" not in out:
            raise RuntimeError(out)
        dbsize = int(cli(port, "DBSIZE"))
        if "+writer" in case:
            bench = subprocess.Popen(
                [tool("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port), "-c", "4",
                 "-P", "4", "-d", "64", "-t", "set", "-r", "100000", "-n", "1000000000", "-q"],
                cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            procs.append(bench)
            wait(lambda: clients(port) == 4, "redis-benchmark's clients")
            time.sleep(0.5)  # let it write for a while
        rss = int(cli(port, "INFO", "memory").split("used_memory_rss:")[1].split()[0])

        cmd = [*CKPT, "dump", str(server.pid), "-D", img, "--tcp-established"]
        cmd += ["--stats-json", stats_path]
        if case.startswith("iterative"):
            cmd.append("--iterative")
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        dump_s = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"dump exited {res.returncode}: {res.stderr.strip()}")
        server.wait()
        with open(stats_path) as f:
            stats = json.load(f)

        t = time.perf_counter()
        res = subprocess.run(
            [*CKPT, "restore", "-D", img, "--detach"], capture_output=True, text=True, check=False
        )
        restore_s = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"restore exited {res.returncode}: {res.stderr.strip()}")
        restored = int(res.stdout.split()[0])
        wait(lambda: ping(port), "the restored redis-server to answer PING")
        serve_s = time.perf_counter() - t
        after = int(cli(port, "DBSIZE"))
        if after < dbsize:
            raise RuntimeError(f"DBSIZE {dbsize} before the dump, {after} after the restore")
        final = stats.get("final", {})
        return {
            "case": case,
            "rss": rss,
            "dump": dump_s,
            "total": stats.get("total_seconds", float("nan")),
            "freeze": final.get("freeze_ms", stats.get("freeze_ms", float("nan"))),
            "rounds": len(stats.get("rounds", [])),
            "stop": stats.get("stop_reason", "-"),
            "image": dir_size(img),
            "restore": restore_s,
            "serve": serve_s,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if restored is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(restored, signal.SIGKILL)
            reap(restored)
        shutil.rmtree(cwd, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {CASES}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ckpt needs root")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored server comes back to us
    payload = fill_payload(args.keys)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            sys.exit(f"unknown case {c!r}; choose from {CASES}")

    hdr = (
        f"{'case':<18} {'rss MiB':>7} {'dump s':>7} {'total s':>7} {'freeze ms':>9} "
        f"{'rounds':>6} {'stop':<14} {'image MiB':>9} {'restore s':>9} {'serve s':>7}"
    )
    print(f"redis-server with {args.keys} keys, {args.repeat} run(s) per case")
    print(hdr)
    print("-" * len(hdr))
    with tempfile.TemporaryDirectory(prefix="bench_redis.") as tmp:
        for case in cases:
            for _ in range(args.repeat):
                r = run_case(case, args.keys, payload, tmp)
                print(
                    f"{r['case']:<18} {r['rss'] / 2**20:>7.1f} {r['dump']:>7.2f} "
                    f"{r['total']:>7.2f} {r['freeze']:>9.1f} {r['rounds']:>6} {r['stop']:<14} "
                    f"{r['image'] / 2**20:>9.1f} {r['restore']:>9.2f} {r['serve']:>7.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
