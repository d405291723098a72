#!/usr/bin/env python3
"""Benchmark: point-in-time snapshots of a big process writing 1% of its pages between them.

Prints, per snapshot: wall time of `ckpt snapshot`, the freeze, pages and bytes
stored; then, in the same run, a full (non-iterative) dump of the same process
for comparison, and gc of the store. The last snapshot is restored and the
restored process's checksum must equal the one the workload printed at that
step.

    python scripts/bench_snapshot.py [--mib 4096] [--pct 1] [--snapshots 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT = [sys.executable, "-m", "ckpt"]


def lines(path: str, prefix: str) -> list[str]:
    with open(path) as f:
        return [ln.split() for ln in f if ln.startswith(prefix)]


def wait_count(path: str, prefix: str, count: int, timeout: float = 600) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = lines(path, prefix)
        if len(got) >= count:
            return got
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {count}x {prefix!r} in {path}")


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=4096)
    ap.add_argument("--pct", type=float, default=1.0)
    ap.add_argument("--snapshots", type=int, default=6)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-snap-")
    exe = os.path.join(tmp, "bench_snap")
    subprocess.run(
        ["gcc", "-O2", "-o", exe, os.path.join(HERE, "workloads", "bench_snap.c")], check=True
    )
    log = os.path.join(tmp, "w.log")
    store = os.path.join(tmp, "store")
    restored = None
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [exe, str(args.mib), str(args.pct)],
            stdin=subprocess.DEVNULL,
            stdout=lf,
            stderr=lf,
            close_fds=True,
        )
    try:
        wait_count(log, "READY", 1)
        rows = []
        for i in range(args.snapshots):
            if i:
                os.kill(proc.pid, signal.SIGUSR1)
                wait_count(log, "STEP", i)
            t = time.perf_counter()
            r = run([*CKPT, "snapshot", str(proc.pid), "--store", store, "--json"])
            wall = time.perf_counter() - t
            res = json.loads(r.stdout)
            rows.append(
                (
                    res["id"],
                    "full" if res["full"] else "incr",
                    wall,
                    res["freeze_ms"],
                    res["pages_written"],
                    res["bytes_stored"],
                )
            )
        # a full dump of the same process, for comparison (left running)
        img = os.path.join(tmp, "full")
        t = time.perf_counter()
        r = run(
            [
                *CKPT,
                "dump",
                str(proc.pid),
                "-D",
                img,
                "--leave-running",
                "--stats-json",
                os.path.join(tmp, "s.json"),
            ]
        )
        full_wall = time.perf_counter() - t
        with open(os.path.join(tmp, "s.json")) as f:
            st = json.load(f)
        full_bytes = sum(os.path.getsize(os.path.join(img, x)) for x in os.listdir(img))
        # restore the last snapshot and check it against the workload's own checksum
        want = lines(log, "STEP")[-1][2] if args.snapshots > 1 else lines(log, "READY")[0][2]
        rr = run([*CKPT, "restore", "--store", store, "--new-pid", "--detach"])
        restored = int(rr.stdout.strip())
        os.kill(restored, signal.SIGUSR2)
        got = wait_count(log, "VERIFY", 1)[0][1]
        ok = "OK" if got == want else f"MISMATCH {got} != {want}"
        t = time.perf_counter()
        gc = subprocess.run(
            [*CKPT, "gc", store, "--keep-last", "2"], capture_output=True, text=True
        )
        gc_s = time.perf_counter() - t

        print(f"process: {args.mib} MiB, {args.pct}% of pages rewritten between snapshots")
        hdr = f"{'snapshot':<24} {'kind':<5} {'wall s':>7} {'freeze ms':>9} {'pages':>9} {'stored MiB':>10}"
        print(hdr)
        print("-" * len(hdr))
        for sid, kind, wall, fr, pages, b in rows:
            print(f"{sid:<24} {kind:<5} {wall:>7.2f} {fr:>9.1f} {pages:>9} {b / 2**20:>10.1f}")
        print(
            f"{'full dump (same run)':<24} {'dump':<5} {full_wall:>7.2f} {st['final']['freeze_ms']:>9.1f} {st['pages']:>9} {full_bytes / 2**20:>10.1f}"
        )
        print(f"restore of the last snapshot: checksum {ok}")
        print(f"gc --keep-last 2: {gc_s:.2f} s (exit {gc.returncode})")
    finally:
        for pid in (proc.pid, restored):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
