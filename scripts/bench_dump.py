#!/usr/bin/env python3
"""Benchmark: full dump and restore against the machine's own limit (issue 12).

For each size, a fresh workload process (workloads/bench_mem.c: half random pages, a
quarter text-like, a quarter sparse structures) is dumped and restored by:

  ckpt        default settings (zstd level 1)
  ckpt -l0    --level 0: compression off (raw zstd blocks)
  ckpt-frz    --no-precopy: every page copied frozen (without it, a plain dump of more than
              64 MiB copies the memory once while the process runs, then freezes for what
              changed: the freeze column shows the difference)
  bare        workloads/bare_copy.c: process_vm_readv of the same present pages and
              write(2) of them, uncompressed, to a file on the same file system, then
              fsync (ckpt fsyncs its image too); restore: fork a fresh process and
              process_vm_writev the file's bytes into it

The variants run in turn (A B C A B C …, --repeat times) so that they share the
machine's mood; the table gives min and median of each, and the median ratio to
bare. ckpt's times are api.dump / api.restore in this process (no interpreter
start-up); the restored process checks its own memory (a FAIL aborts).

    python scripts/bench_dump.py [--sizes 256,1024,4096] [--repeat 3] [--dir DIR]
                                 [--variants ckpt,ckpt-l0,ckpt-frz,bare]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# name → (zstd level, no_precopy); bare: the C reader/writer
VARIANTS = {"ckpt": (1, False), "ckpt-l0": (0, False), "ckpt-frz": (1, True), "bare": None}


def build(tmp: str) -> dict[str, str]:
    out = {}
    for name in ("bench_mem", "bare_copy"):
        exe = os.path.join(tmp, name)
        src = os.path.join(HERE, "workloads", f"{name}.c")
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        out[name] = exe
    return out


def wait_line(path: str, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.strip()
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {prefix!r} in {path}")


def _start(exe: str, mib: int, log: str) -> subprocess.Popen:
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [exe, str(mib)], stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, close_fds=True
        )
    wait_line(log, "READY")
    return proc


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run_ckpt(exes: dict, mib: int, tmp: str, level: int, no_precopy: bool = False) -> dict:
    from ckpt import api

    log = os.path.join(tmp, f"w{mib}.log")
    img = os.path.join(tmp, f"img{mib}-{level}")
    shutil.rmtree(img, ignore_errors=True)
    proc = _start(exes["bench_mem"], mib, log)
    restored = None
    try:
        t = time.perf_counter()
        r = api.dump(proc.pid, img, level=level, no_precopy=no_precopy)
        dump_s = time.perf_counter() - t
        proc.wait()
        size = _size(img)
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
        return {"dump": dump_s, "freeze": r.freeze_ms / 1000, "restore": restore_s, "bytes": size}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)
        shutil.rmtree(img, ignore_errors=True)


def run_bare(exes: dict, mib: int, tmp: str) -> dict:
    log = os.path.join(tmp, f"w{mib}.log")
    out = os.path.join(tmp, f"bare{mib}.bin")
    proc = _start(exes["bench_mem"], mib, log)
    try:
        t = time.perf_counter()
        subprocess.run([exes["bare_copy"], "dump", str(proc.pid), out], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        dump_s = time.perf_counter() - t
    finally:
        proc.kill()
        proc.wait()
    try:
        size = _size(out)
        t = time.perf_counter()
        subprocess.run([exes["bare_copy"], "restore", out], check=True, stdout=subprocess.DEVNULL)
        restore_s = time.perf_counter() - t
    finally:
        os.unlink(out)
    return {"dump": dump_s, "freeze": float("nan"), "restore": restore_s, "bytes": size}


def _mm(xs: list[float]) -> str:
    if not xs or xs[0] != xs[0]:
        return f"{'-':>13}"
    return f"{min(xs):6.3f}/{statistics.median(xs):6.3f}"


def warm_imports() -> None:
    """Import ckpt's dump and restore modules before anything is timed: `api` imports
    them on first use, which would bill the first variant run for it (~150 ms where
    no .pyc is written, PYTHONDONTWRITEBYTECODE)."""
    import ckpt.api.dumping
    import ckpt.api.restoring  # noqa: F401


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    warm_imports()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="256,1024,4096", help="MiB, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dir", default=None, help="where images go (default: a tmp dir)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    try:
        exes = build(tmp)
        results: dict[tuple[int, str], list[dict]] = {}
        for mib in [int(s) for s in args.sizes.split(",")]:
            for rep in range(args.repeat):
                order = variants if rep % 2 == 0 else variants[::-1]
                for v in order:
                    os.sync()  # the previous run's deletions and writeback, not this run's
                    if v == "bare":
                        r = run_bare(exes, mib, tmp)
                    else:
                        r = run_ckpt(exes, mib, tmp, *VARIANTS[v])
                    results.setdefault((mib, v), []).append(r)
                    print(f"# {mib} MiB {v}: dump {r['dump']:.3f} s, restore {r['restore']:.3f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
        load = os.getloadavg()[0]
        print(f"{args.repeat} runs per cell, interleaved; min/median seconds; load avg {load:.1f}")
        hdr = (
            f"{'size':>9} {'variant':>8} {'dump s':>13} {'freeze s':>13} {'restore s':>13} "
            f"{'image':>6} {'dump/bare':>9} {'rest/bare':>9}"
        )
        print(hdr)
        print("-" * len(hdr))
        for (mib, v), rs in results.items():
            bare = results.get((mib, "bare"))
            d = [r["dump"] for r in rs]
            rr = [r["restore"] for r in rs]
            ratio_d = ratio_r = "-"
            if bare:
                ratio_d = f"{statistics.median(d) / statistics.median(x['dump'] for x in bare):.2f}"
                ratio_r = (
                    f"{statistics.median(rr) / statistics.median(x['restore'] for x in bare):.2f}"
                )
            print(
                f"{f'{mib} MiB':>9} {v:>8} {_mm(d)} {_mm([r['freeze'] for r in rs])} {_mm(rr)} "
                f"{rs[0]['bytes'] / (mib << 20):6.2f} {ratio_d:>9} {ratio_r:>9}"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
