#!/usr/bin/env python3
"""Benchmark: full dump and restore of 256 MiB and 1 GiB processes.

For each size it prints dump wall time, freeze time, image bytes (vs raw),
restore time, and the raw process_vm_readv copy rate measured in the same run
on the same process, so the numbers can be compared. The restored process
verifies its own checksum; a FAIL aborts the benchmark.

    python scripts/bench_dump.py [--sizes 256,1024] [--repeat 1]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "bench_mem")
    subprocess.run(
        ["gcc", "-O2", "-o", exe, os.path.join(HERE, "workloads", "bench_mem.c")], check=True
    )
    return exe


def wait_line(path: str, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.strip()
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {prefix!r} in {path}")


def raw_read_rate(pid: int) -> float:
    """MB/s of process_vm_readv over the process's anonymous pages (8 MiB batches)."""
    from ckpt.kernel import native, procfs
    from ckpt.kernel.memory import pagemap_runs, read_runs

    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        runs = []
        for m in procfs.maps(pid):
            if m.name == "" and m.perms.startswith("rw"):
                runs += pagemap_runs(
                    pm, m.start, m.end, include_file=False, zero_pfn=native.zero_pfn()
                )
        pieces = []
        for a, n in runs:
            while n:
                k = min(n, 2048)
                pieces.append((a, k))
                a += k * 4096
                n -= k
        buf = bytearray(2048 * 4096)
        t = time.perf_counter()
        total = 0
        for a, n in pieces:
            read_runs(pid, mem, [(a, n)], buf if n == 2048 else None)
            total += n * 4096
        return total / (time.perf_counter() - t) / 1e6
    finally:
        os.close(pm)
        os.close(mem)


def run_one(exe: str, mib: int, tmp: str) -> dict:
    log = os.path.join(tmp, f"w{mib}.log")
    img = os.path.join(tmp, f"img{mib}")
    shutil.rmtree(img, ignore_errors=True)
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [exe, str(mib)], stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, close_fds=True
        )
    restored = None
    try:
        wait_line(log, "READY")
        rate = raw_read_rate(proc.pid)
        from ckpt import api

        t = time.perf_counter()
        r = api.dump(proc.pid, img)
        dump_s = time.perf_counter() - t
        proc.wait()
        size = sum(os.path.getsize(os.path.join(img, f)) for f in os.listdir(img))
        t = time.perf_counter()
        res = api.restore(img)
        restore_s = time.perf_counter() - t
        restored = res.pid
        os.kill(restored, signal.SIGUSR2)
        status = api.wait_exit_status(restored)
        restored = None
        line = wait_line(log, "VERIFY")
        if status != 0 or "OK" not in line:
            raise SystemExit(f"restored process failed verification: {line}")
        return {
            "size": f"{mib} MiB", "dump_s": dump_s, "freeze_ms": r.freeze_ms,
            "image_mib": size / 2**20, "ratio": size / (mib << 20), "restore_s": restore_s,
            "readv_mbs": rate,
        }  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        exe = build(tmp)
        rows = []
        for mib in [int(s) for s in args.sizes.split(",")]:
            for _ in range(args.repeat):
                rows.append(run_one(exe, mib, tmp))
        hdr = f"{'size':>9} {'dump s':>7} {'freeze ms':>9} {'image MiB':>9} {'ratio':>6} {'restore s':>9} {'raw readv MB/s':>14}"
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            print(
                f"{r['size']:>9} {r['dump_s']:>7.2f} {r['freeze_ms']:>9.0f} {r['image_mib']:>9.1f} "
                f"{r['ratio']:>6.2f} {r['restore_s']:>9.2f} {r['readv_mbs']:>14.0f}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
