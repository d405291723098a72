#!/usr/bin/env python3
"""Benchmark: a process tree (a parent and K children of M MiB each), dumped plainly
and with pre-copy (--iterative: every member is tracked and copied round by round,
so the freeze holds only what changed), then restored with the same PIDs.

The restored tree verifies itself (every child recomputes its checksum); a FAIL
aborts the benchmark.

    python scripts/bench_tree.py [--children 4] [--mib 128] [--repeat 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_dump import wait_line  # noqa: E402


def build(tmp: str) -> tuple[str, str]:
    mem = os.path.join(tmp, "bench_mem")
    forker = os.path.join(tmp, "bench_forker")
    subprocess.run(["gcc", "-O2", "-o", mem, os.path.join(HERE, "workloads", "bench_mem.c")],
                   check=True)  # fmt: skip
    subprocess.run(
        ["gcc", "-O2", "-o", forker, os.path.join(HERE, "workloads", "bench_forker.c")], check=True
    )
    return mem, forker


def kids_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def reap(pids: list[int], timeout: float = 60) -> None:
    """Killed children are re-parented to us (subreaper): reap them, freeing the PIDs."""
    end = time.monotonic() + timeout
    for pid in pids:
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.01)


def run_one(mem: str, forker: str, k: int, mib: int, mode: str, tmp: str) -> dict:
    log = os.path.join(tmp, f"t-{mode}.log")
    img = os.path.join(tmp, f"img-{mode}")
    stats = os.path.join(tmp, f"stats-{mode}.json")
    shutil.rmtree(img, ignore_errors=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [forker, str(k), mem, str(mib)], stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
            close_fds=True, start_new_session=True,
        )  # fmt: skip
    restored = None
    kids: list[int] = []
    try:
        wait_line(log, "TREE READY")
        kids = kids_of(proc.pid)
        extra = ["--iterative", "--stats-json", stats] if mode == "iterative" else []
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ckpt", "dump", str(proc.pid), "-D", img, *extra],
                           capture_output=True, text=True)  # fmt: skip
        dump_s = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"dump failed: {r.stderr}")
        proc.wait()
        reap(kids)
        meta = json.loads(subprocess.run([sys.executable, "-m", "ckpt", "show", img, "--json"],
                                         capture_output=True, text=True, check=True).stdout)["meta"]  # fmt: skip
        final = None
        if mode == "iterative":
            with open(stats) as f:
                final = json.load(f)["final"]["pages_copied"]
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ckpt", "restore", "-D", img, "--detach"],
                           capture_output=True, text=True)  # fmt: skip
        restore_s = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(f"restore failed: {r.stderr}")
        restored = int(r.stdout.split()[0])
        os.kill(restored, signal.SIGUSR2)
        line = wait_line(log, "TREE VERIFY", timeout=120)
        if "OK" not in line:
            raise SystemExit(f"the restored tree failed: {line}")
        reap([restored, *kids])
        restored = None
        return {
            "mode": mode, "procs": k + 1, "mib": k * mib, "dump_s": dump_s,
            "freeze_ms": meta["freeze_ms"], "rounds": meta.get("rounds", 1),
            "final_pages": final if final is not None else meta["pages"],
            "restore_s": restore_s,
        }  # fmt: skip
    finally:
        for pid in [proc.pid, *kids, *([restored] if restored else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            proc.wait()
        reap(kids)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-tree-")
    try:
        mem, forker = build(tmp)
        rows = [
            run_one(mem, forker, args.children, args.mib, mode, tmp)
            for _ in range(args.repeat)
            for mode in ("plain", "iterative")
        ]
        hdr = (
            f"{'mode':<10} {'procs':>5} {'MiB':>6} {'dump s':>7} {'freeze ms':>9} "
            f"{'rounds':>6} {'final pages':>11} {'restore s':>9}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            print(
                f"{r['mode']:<10} {r['procs']:>5} {r['mib']:>6} {r['dump_s']:>7.2f} "
                f"{r['freeze_ms']:>9.0f} {r['rounds']:>6} {r['final_pages']:>11} "
                f"{r['restore_s']:>9.2f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
