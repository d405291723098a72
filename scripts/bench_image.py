#!/usr/bin/env python3
"""Benchmark the image format: write and read throughput and ratio per zstd level.

Data: SIZE MiB of pages laid out in runs of 1-64 pages; half the pages are random
bytes, a quarter text-like (words from a small vocabulary), a quarter zero.
Writes go through ImageWriter/LayerWriter in BATCH-sized add_run calls (as the
dump side does after process_vm_readv) and include commit's fsyncs; reads plan
the whole image and consume every extent from ImageReader.iter_data. Prints one
row per level: wall-clock MB/s and seconds, and CPU seconds of all threads
(wcpu_s, rcpu_s), which vary less than wall time on a shared machine.
Use --dir /dev/shm to leave the disk out.

    python scripts/bench_image.py --size 256 --levels 1,3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from ckpt.image import ImageReader, ImageWriter

PAGE = 4096


def make_text_pool(nbytes: int, rng: random.Random) -> bytes:
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(3000)]
    out = bytearray()
    while len(out) < nbytes:
        out += b" ".join(rng.choices(words, k=200)) + b"\n"
    return bytes(out[:nbytes])


def make_data(size_mib: int, seed: int = 1) -> bytes:
    """Half random, a quarter text-like, a quarter zero pages, in runs of 1-64 pages."""
    rng = random.Random(seed)
    npages = size_mib * 256
    pool = make_text_pool(8 << 20, rng)
    rand = os.urandom(npages * PAGE)  # more than enough random material
    buf = bytearray(npages * PAGE)
    page = 0
    while page < npages:
        n = min(rng.randint(1, 64), npages - page)
        kind = rng.random()
        lo, hi = page * PAGE, (page + n) * PAGE
        if kind < 0.5:
            buf[lo:hi] = rand[lo:hi]
        elif kind < 0.75:
            for i in range(n):
                off = rng.randrange(0, len(pool) - PAGE)
                buf[lo + i * PAGE : lo + (i + 1) * PAGE] = pool[off : off + PAGE]
        page += n
    return bytes(buf)


def bench(data: bytes, level: int, threads: int, chunk: int, batch: int, root: str) -> dict:
    path = os.path.join(root, f"img-{level}")
    base = 0x7F0000000000
    t0, c0 = time.perf_counter(), time.process_time()
    with ImageWriter(path, level=level, chunk_bytes=chunk, threads=threads) as w:
        lw = w.begin_layer()
        mv = memoryview(data)
        for off in range(0, len(data), batch):
            # Slices of a bytes object: the writer keeps them without copying.
            lw.add_run(base + off, mv[off : off + batch])
        stats = lw.close()
        w.commit({"bench": True}, {})
    t_write, c_write = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    with ImageReader(path) as r:
        plan = r.plan([(base, len(data) // PAGE)])
        got = 0
        for _vaddr, piece in r.iter_data(plan, threads=threads):
            got += len(piece)
    t_read, c_read = time.perf_counter() - t0, time.process_time() - c0
    assert got == stats.bytes_raw, (got, stats.bytes_raw)
    shutil.rmtree(path)
    mb = len(data) / 1e6
    return {
        "level": level,
        "write_MBps": mb / t_write,
        "read_MBps": mb / t_read,
        "write_s": t_write,
        "read_s": t_read,
        "wcpu_s": c_write,
        "rcpu_s": c_read,
        "ratio_all": len(data) / stats.bytes_stored,
        "ratio_data": stats.bytes_raw / stats.bytes_stored,
        "stored_MiB": stats.bytes_stored / (1 << 20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="MiB of pages (default 256)")
    ap.add_argument("--levels", default="1,3", help="comma-separated zstd levels (default 1,3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=4, help="chunk size in MiB (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="add_run size in MiB (default 8)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per level; best is shown")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    data = make_data(args.size)
    print(
        f"# {args.size} MiB test data made in {time.perf_counter() - t0:.1f} s; "
        f"threads={args.threads} chunk={args.chunk} MiB batch={args.batch} MiB "
        f"cpus={os.cpu_count()}"
    )
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir)
    try:
        cols = [
            "level",
            "write_MBps",
            "read_MBps",
            "write_s",
            "read_s",
            "wcpu_s",
            "rcpu_s",
            "ratio_all",
            "ratio_data",
            "stored_MiB",
        ]
        print(" ".join(f"{c:>11}" for c in cols))
        for level in (int(x) for x in args.levels.split(",")):
            runs = [
                bench(data, level, args.threads, args.chunk << 20, args.batch << 20, root)
                for _ in range(args.repeat)
            ]
            best = {
                **min(runs, key=lambda r: r["write_s"]),
                "read_MBps": max(r["read_MBps"] for r in runs),
                "read_s": min(r["read_s"] for r in runs),
                "rcpu_s": min(r["rcpu_s"] for r in runs),
            }
            print(" ".join(f"{best[c]:>11}" if c == "level" else f"{best[c]:>11.2f}" for c in cols))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
