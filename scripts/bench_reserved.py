#!/usr/bin/env python3
"""Benchmark: freeze and restore of many-thread processes with a big reserved address
space (issue 12): workloads/bench_reserved.c with N threads (default 8 MiB stacks), a
0.5 GiB working set and 8 GiB of MAP_NORESERVE heaps that are never touched.

Each thread count is dumped plainly (the default: the working set is copied once while
the process runs, then frozen for what changed), plainly with --no-precopy (every page
copied frozen: `frozen`) and with --iterative (pre-copy rounds, then the final freeze), --repeat times in turn; the table gives min/median of the freeze, the dump's
wall time and the restore's wall time. The restored process joins every thread and
checks its working set; a FAIL aborts.

    python scripts/bench_reserved.py [--threads 1,40,1024] [--ws 512] [--reserved 8]
                                     [--repeat 3] [--modes plain,frozen,iterative]
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
from bench_dump import wait_line, warm_imports  # noqa: E402


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "bench_reserved")
    src = os.path.join(HERE, "workloads", "bench_reserved.c")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, src], check=True)
    return exe


def run_one(exe: str, n: int, mode: str, args, tmp: str) -> dict:
    from ckpt import api

    log = os.path.join(tmp, f"r{n}.log")
    img = os.path.join(tmp, f"img{n}")
    shutil.rmtree(img, ignore_errors=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [exe, str(n), str(args.ws), str(args.reserved)],
            stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, close_fds=True,
        )  # fmt: skip
    restored = None
    try:
        wait_line(log, "READY")
        t = time.perf_counter()
        r = api.dump(proc.pid, img, iterative=mode == "iterative", no_precopy=mode == "frozen")
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
        return {"freeze": r.freeze_ms, "dump": dump_s, "restore": restore_s}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)
        shutil.rmtree(img, ignore_errors=True)


def _mm(xs: list[float], fmt: str) -> str:
    return f"{format(min(xs), fmt)}/{format(statistics.median(xs), fmt)}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    warm_imports()
    ap.add_argument("--threads", default="1,40,1024")
    ap.add_argument("--ws", type=int, default=512, help="working set, MiB")
    ap.add_argument("--reserved", type=int, default=8, help="reserved heaps, GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="plain,frozen,iterative")
    args = ap.parse_args()
    modes = args.modes.split(",")
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        exe = build(tmp)
        results: dict[tuple[int, str], list[dict]] = {}
        for n in [int(x) for x in args.threads.split(",")]:
            for rep in range(args.repeat):
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    r = run_one(exe, n, mode, args, tmp)
                    results.setdefault((n, mode), []).append(r)
                    print(f"# {n} threads {mode}: freeze {r['freeze']:.0f} ms, "
                          f"restore {r['restore']:.3f} s", file=sys.stderr, flush=True)  # fmt: skip
        print(
            f"{args.ws} MiB working set, {args.reserved} GiB reserved; {args.repeat} runs, "
            f"min/median; load avg {os.getloadavg()[0]:.1f}"
        )
        hdr = f"{'threads':>7} {'mode':>9} {'freeze ms':>11} {'dump s':>11} {'restore s':>11}"
        print(hdr)
        print("-" * len(hdr))
        for (n, mode), rs in results.items():
            print(
                f"{n:>7} {mode:>9} {_mm([r['freeze'] for r in rs], '5.0f'):>11} "
                f"{_mm([r['dump'] for r in rs], '5.2f'):>11} "
                f"{_mm([r['restore'] for r in rs], '5.2f'):>11}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
