#!/usr/bin/env python3
"""Benchmark: dump and restore of processes with 1, 16, 256 and 1024 threads.

Each process parks N-1 threads in a condition wait (64 KiB stacks); ckpt dumps
it (freezing every thread, reading every thread's registers, xstate, masks and
the injected per-thread state), then restores it (one clone3 per thread plus
per-thread injections). The restored process wakes and joins every thread and
checks each one's TLS; a FAIL aborts the benchmark. The per-thread columns
divide the time above the 1-thread case by the extra threads.

CRIU's issue #2708 reports about 90 s for 10k threads.

    python scripts/bench_threads.py [--threads 1,16,256,1024] [--repeat 1]

A first 1-thread round trip is not counted (ckpt's modules load then). With --repeat,
each thread count runs that many times, the counts taking turns, and the table gives
medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_dump import wait_line  # noqa: E402


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "bench_threads")
    src = os.path.join(HERE, "workloads", "bench_threads.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, src], check=True)
    return exe


def run_one(exe: str, n: int, tmp: str) -> dict:
    from ckpt import api

    log = os.path.join(tmp, f"t{n}.log")
    img = os.path.join(tmp, f"img{n}")
    shutil.rmtree(img, ignore_errors=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [exe, str(n - 1)], stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, close_fds=True
        )
    restored = None
    try:
        wait_line(log, "READY")
        t = time.perf_counter()
        r = api.dump(proc.pid, img)
        dump_s = time.perf_counter() - t
        proc.wait()
        t = time.perf_counter()
        res = api.restore(img)
        restore_s = time.perf_counter() - t
        restored = res.pid
        threads = len(os.listdir(f"/proc/{restored}/task"))
        os.kill(restored, signal.SIGUSR2)
        status = api.wait_exit_status(restored)
        restored = None
        line = wait_line(log, "VERIFY")
        if status != 0 or "OK" not in line or threads != n:
            raise SystemExit(f"restored process failed ({threads} threads): {line}")
        return {"n": n, "dump_s": dump_s, "freeze_ms": r.freeze_ms, "restore_s": restore_s}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", default="1,16,256,1024")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-threads-")
    try:
        exe = build(tmp)
        run_one(exe, 1, tmp)  # warm-up: imports, caches
        counts = [int(s) for s in args.threads.split(",")]
        runs: dict[int, list[dict]] = {n: [] for n in counts}
        for _ in range(args.repeat):
            for n in counts:
                runs[n].append(run_one(exe, n, tmp))
        rows = [
            {"n": n, **{k: statistics.median(r[k] for r in runs[n])
                        for k in ("dump_s", "freeze_ms", "restore_s")}}
            for n in counts
        ]  # fmt: skip
        base = min(rows, key=lambda r: r["n"])
        hdr = (
            f"{'threads':>7} {'dump s':>7} {'freeze ms':>9} {'restore s':>9} "
            f"{'dump ms/thread':>14} {'restore ms/thread':>17}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            extra = r["n"] - base["n"]
            per_d = (r["dump_s"] - base["dump_s"]) * 1000 / extra if extra else 0.0
            per_r = (r["restore_s"] - base["restore_s"]) * 1000 / extra if extra else 0.0
            print(
                f"{r['n']:>7} {r['dump_s']:>7.3f} {r['freeze_ms']:>9.1f} {r['restore_s']:>9.3f} "
                f"{per_d:>14.3f} {per_r:>17.3f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
