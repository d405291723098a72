#!/usr/bin/env python3
"""Benchmark snapshot-store gc and compaction (ckpt/store).

Builds a store like `ckpt snapshot` from cron would: one full snapshot of a
SIZE MiB process, then SNAPSHOTS-1 incremental ones, each rewriting RATE of
the pages (random pages; contents half random, half text-like, as in
bench_image.py), written through the same Store.begin/commit API. Then, each
on its own copy of that store (cp -a keeps the hard links):

  compact            compaction alone (every snapshot kept; chains → ≤ 8)
  compact again      nothing to do (a fixpoint)
  gc keep-last 10    retention + compaction
  gc hourly/daily    --keep-hourly 24 --keep-daily 7 (snapshots 20 min apart)
  +5, compact        the steady state: 5 new snapshots since the last compaction
  verify --deep      every chunk of every layer, once per layer file

and reads the newest snapshot back (plan + iter_data, as restore does) before
and after compaction. Prints a table.

    python scripts/bench_gc.py                       # 256 MiB, 50 snapshots, 1 %
    python scripts/bench_gc.py --size 64 --dir /dev/shm
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckpt.image import ImageReader
from ckpt.store import Store
from ckpt.store.chain import present_runs

P = 4096
BASE = 0x7F0000000000
BATCH = 2048  # pages per add_run (8 MiB)


def page_source(rng: random.Random):
    """Pages: half random, half text-like (compressible ~2.5x), 5 % zero."""
    words = [
        bytes(rng.choice(b"abcdefghij klmnop") for _ in range(rng.randint(2, 9)))
        for _ in range(512)
    ]
    text = b" ".join(rng.choice(words) for _ in range(4 * 1024 * 1024 // 5))[: 4 << 20]

    def make(n: int) -> bytes:
        out = []
        for _ in range(n):
            r = rng.random()
            if r < 0.05:
                out.append(bytes(P))
            elif r < 0.5:
                off = rng.randrange(0, len(text) - P)
                out.append(text[off : off + P])
            else:
                out.append(os.urandom(P))
        return b"".join(out)

    return make


def runs(pages):
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_store import fake_state  # noqa: E402 - a minimal valid state, as the store tests use


def build(root: str, npages: int, nsnap: int, rate: float, interval: float, seed: int) -> float:
    rng = random.Random(seed)
    make = page_source(rng)
    store = Store.open(root, create=True)
    state = fake_state(1, BASE, BASE + npages * 4096, [[BASE, npages]])
    t0 = time.time() - nsnap * interval
    per = max(1, int(npages * rate))
    start = time.monotonic()
    for k in range(nsnap):
        with store.lock():
            parent = store.latest(1)
            w = store.begin(parent)
            lw = w.begin_layer()
            pages = range(npages) if parent is None else rng.sample(range(npages), per)
            todo = [(s, n) for s, n in runs(pages)]
            batch: list[tuple[int, int]] = []
            count = 0
            for s, n in todo:
                batch.append((BASE + s * P, n))
                count += n
                if count >= BATCH:
                    lw.add_runs(batch, make(count))
                    batch, count = [], 0
            if batch:
                lw.add_runs(batch, make(count))
            lw.close()
            store.commit(w, state, {"pid": 1, "time": t0 + k * interval, "freeze_ms": 0.0})
    return time.monotonic() - start


def copy(src: str, dst: str) -> Store:
    subprocess.run(["cp", "-a", src, dst], check=True)
    return Store.open(dst)


def read_latest(store: Store) -> float:
    t = time.monotonic()
    with ImageReader(store.latest().path) as r:
        plan = r.plan(present_runs(r.state))
        for _ in r.iter_data(plan):
            pass
    return time.monotonic() - t


def du(path: str) -> int:
    from ckpt.store.layout import disk_usage

    return disk_usage(path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=256, help="MiB of process memory (default 256)")
    ap.add_argument("--snapshots", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.01, help="fraction rewritten per snapshot")
    ap.add_argument("--interval", type=float, default=1200, help="seconds between snapshots")
    ap.add_argument("--dir", default=None, help="where to build the stores (default: tmp)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times scale with it)"
    )

    work = tempfile.mkdtemp(prefix="bench-gc-", dir=args.dir)
    try:
        npages = args.size * 256
        base = os.path.join(work, "base")
        t_build = build(base, npages, args.snapshots, args.rate, args.interval, args.seed)
        print(
            f"store: {args.snapshots} snapshots of {args.size} MiB, {args.rate:.1%} rewritten each "
            f"({max(1, int(npages * args.rate))} pages); built in {t_build:.1f} s, "
            f"{du(base) / 2**20:.0f} MiB on disk, in {work}"
        )
        rows = []

        def row(name: str, store: Store, fn) -> None:
            before = du(store.root)
            t, c = time.monotonic(), time.process_time()
            with store.lock():
                rep = fn(store)
            secs, cpu = time.monotonic() - t, time.process_time() - c
            rows.append(
                (
                    name,
                    secs,
                    cpu,
                    len(rep.kept),
                    len(rep.removed),
                    len(rep.compacted),
                    f"{rep.max_chain_before}→{rep.max_chain_after}",
                    rep.bytes_written / 2**20,
                    before / 2**20,
                    du(store.root) / 2**20,
                )
            )

        s1 = copy(base, os.path.join(work, "c1"))
        read_before = read_latest(s1)
        row("compact", s1, lambda s: s.compact())
        read_after = read_latest(s1)
        row("compact again", s1, lambda s: s.compact())
        s2 = copy(base, os.path.join(work, "c2"))
        row("gc --keep-last 10", s2, lambda s: s.gc(keep_last=10))
        s3 = copy(base, os.path.join(work, "c3"))
        row("gc --keep-hourly 24 --keep-daily 7", s3, lambda s: s.gc(keep_hourly=24, keep_daily=7))
        # steady state: 5 more snapshots on top of the compacted store, then compact
        rng = random.Random(args.seed + 2)
        make = page_source(rng)
        state = fake_state(1, BASE, BASE + npages * 4096, [[BASE, npages]])
        for k in range(5):
            with s1.lock():
                w = s1.begin(s1.latest(1))
                lw = w.begin_layer()
                for s, n in runs(rng.sample(range(npages), max(1, int(npages * args.rate)))):
                    lw.add_run(BASE + s * P, make(n))
                lw.close()
                s1.commit(w, state, {"pid": 1, "time": time.time() + k})
        row("+5 snapshots, compact", s1, lambda s: s.compact())

        t, c = time.monotonic(), time.process_time()
        v = s1.verify(deep=True)
        t_verify, c_verify = time.monotonic() - t, time.process_time() - c
        assert v.ok, v.first_error()

        print()
        print(
            f"{'operation':<36} {'wall':>7} {'CPU':>6} {'kept':>5} {'removed':>7} {'rewritten':>9} "
            f"{'chain':>7} {'written':>9} {'disk before':>11} {'disk after':>10}"
        )
        for name, secs, cpu, kept, removed, comp, chain, written, b, a in rows:
            print(
                f"{name:<36} {secs:>6.2f}s {cpu:>5.1f}s {kept:>5} {removed:>7} {comp:>9} {chain:>7} "
                f"{written:>7.1f}Mi {b:>9.0f}Mi {a:>8.0f}Mi"
            )
        print(
            f"{'verify --deep (after compact)':<36} {t_verify:>6.2f}s {c_verify:>5.1f}s  "
            f"{v.layers_checked} layer files, {v.chunks_checked} chunks"
        )
        print(
            f"{'read newest snapshot (restore path)':<36} {read_before:>6.2f}s before compaction, "
            f"{read_after:.2f}s after"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
