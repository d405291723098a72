#!/usr/bin/env python3
"""Benchmark: dump and restore of a PostgreSQL server while pgbench runs.

For each case a fresh cluster (tests/pg.py: Debian's server binaries run as
`postgres`, 127.0.0.1 on a free port, shared_buffers 64 MiB by default,
huge_pages off) is filled by `pgbench -i -s SCALE`. pgbench (4 clients, 2
threads, TPC-B) runs --tps-seconds on its own ("tps before"), then again in the
background for --load seconds ("across"; case churn: `pgbench -C`, a new
connection per transaction); ~2 s into it ckpt dumps the server and its
processes (`--tcp-established`, `--iterative` or plain) and kills them,
restores them with `--detach` at the same PIDs, and the background pgbench runs
on to its end on the same connections; then pgbench runs --tps-seconds again
("tps after"). The balances invariant of pgbench's tables is checked at the end
of each case (a mismatch fails the case, as does any pgbench error).

Columns: zomb = zombies in the image (children of the server that had exited and
were not reaped yet: restored as zombies); dump = wall time of `ckpt dump` (Python
start-up included); freeze =
the time the processes were stopped (the final round for --iterative, the whole
dump otherwise); rounds = pre-copy rounds (+1 final); image = the image directory
on disk; restore = wall time of `ckpt restore --detach`; serve = from the
restore's start until a new connection is answered; tps before / across / after.

    python scripts/bench_postgres.py [--scale 4] [--shared-buffers 64MB] [--repeat 1]
        [--cases iterative,plain,churn] [--load 20] [--tps-seconds 5]

Needs root, nftables (the network lock) and the postgresql package.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import pg  # noqa: E402 - tests/pg.py, the same cluster the acceptance test uses

CKPT = [sys.executable, "-m", "ckpt"]
CASES = ("iterative", "plain", "churn")  # churn: --iterative while pgbench -C reconnects
DEFAULT_CASES = ("iterative", "plain")


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def wait(pred, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def checked(res: pg.PgbenchResult, what: str) -> float:
    if not res.ok():
        raise RuntimeError(f"pgbench {what}: exit {res.returncode}, {res.problems()[:3]}")
    return res.tps() or float("nan")


def run_case(case: str, args, tmp: str) -> dict:
    home = tempfile.mkdtemp(dir=tmp)
    os.chmod(home, 0o711)  # the postgres user enters its cluster's directory
    c = pg.Cluster(Path(home) / "pg", shared_buffers=args.shared_buffers)
    procs: list[subprocess.Popen] = []
    pids: list[int] = []
    zombies: list[int] = []
    lock = None
    try:
        c.initdb()
        server = c.popen()
        procs.append(server)
        c.wait_ready(server)
        pm = server.pid
        c.pgbench_init(args.scale)
        before = checked(c.pgbench(args.tps_seconds), "before")
        out = open(c.root / "load.log", "w")  # noqa: SIM115 - closed below
        churn = ["-C"] if case == "churn" else []  # a new connection per transaction
        load = subprocess.Popen(
            c.pgbench_argv("-T", str(args.load), *churn), env=c.client_env(), cwd=c.root,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        procs.append(load)
        time.sleep(2)  # let it run; then wait for a moment without a zombie child
        if not churn:
            wait(lambda: c.quiet(pm, 4), "pgbench's 4 clients (and nothing else)")
        pids = pg.tree(pm)
        c.note_ipc(pids)

        img = str(c.root / "img")
        stats_path = str(c.root / "stats.json")
        cmd = [*CKPT, "dump", str(pm), "-D", img, "--tcp-established", "--stats-json", stats_path]
        if case != "plain":
            cmd.append("--iterative")
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=c.root, check=False)
        dump_s = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"dump exited {res.returncode}: {last_line(res.stderr)}")
        server.wait()
        show = json.loads(
            subprocess.run([*CKPT, "show", img, "--json"], capture_output=True, text=True).stdout
        )["process"]
        lock = show.get("net_lock")
        pids = [show["pid"], *(d["pid"] for d in show.get("descendants", []))]
        zombies = [z["pid"] for z in show.get("zombies", [])]  # came to us (subreaper)
        pg.reap(pids + zombies)
        with open(stats_path) as f:
            stats = json.load(f)

        t = time.perf_counter()
        res = subprocess.run(
            [*CKPT, "restore", "-D", img, "--detach"], capture_output=True, text=True,
            cwd=c.root, check=False,
        )  # fmt: skip
        restore_s = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"restore exited {res.returncode}: {last_line(res.stderr)}")
        lock = None
        c.wait_ready()
        serve_s = time.perf_counter() - t
        rc = load.wait(args.load + 300)
        out.close()
        across = checked(pg.PgbenchResult(rc, (c.root / "load.log").read_text()), "across")
        after = checked(c.pgbench(args.tps_seconds), "after")
        bal = c.balances()
        if len(set(bal)) != 1:
            raise RuntimeError(f"balances differ after the restore: {bal}")
        final = stats.get("final", {})
        return {
            "case": case,
            "procs": len(pids),
            "zombies": len(zombies),
            "dump": dump_s,
            "freeze": final.get("freeze_ms", stats.get("freeze_ms", float("nan"))),
            "rounds": len(stats.get("rounds", [])) + 1,
            "image": dir_size(img),
            "restore": restore_s,
            "serve": serve_s,
            "before": before,
            "across": across,
            "after": after,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in pids:  # the restored server (ours: we are a child subreaper)
            with contextlib.suppress(ProcessLookupError):
                if pg.title(pid).startswith(("postgres", c.tool("postgres"))):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            pg.reap(pids + zombies, timeout=30)
        c.remove_ipc()
        if lock:
            subprocess.run(["nft", "delete", "table", "inet", lock], capture_output=True)
        shutil.rmtree(c.root.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--shared-buffers", default=pg.SHARED_BUFFERS)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated: {CASES}")
    ap.add_argument("--load", type=int, default=20, help="seconds of pgbench across the dump")
    ap.add_argument("--tps-seconds", type=int, default=5, help="pgbench before and after")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("ckpt needs root")
    missing = pg.missing()
    if missing:
        sys.exit(missing)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            sys.exit(f"unknown case {c!r}; choose from {CASES}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored server comes back to us

    hdr = (
        f"{'case':<10} {'procs':>5} {'zomb':>4} {'dump s':>7} {'freeze ms':>9} {'rounds':>6} "
        f"{'image MiB':>9} {'restore s':>9} {'serve s':>7} {'tps before':>10} "
        f"{'across':>7} {'after':>7}"
    )
    print(
        f"PostgreSQL, pgbench -s {args.scale}, shared_buffers {args.shared_buffers}, "
        f"pgbench -c 4 for {args.load} s across the dump; {args.repeat} run(s) per case"
    )
    print(hdr)
    print("-" * len(hdr))
    with tempfile.TemporaryDirectory(prefix="bench_postgres.") as tmp:
        os.chmod(tmp, 0o711)
        for case in cases:
            for _ in range(args.repeat):
                try:
                    r = run_case(case, args, tmp)
                except (RuntimeError, AssertionError) as exc:
                    print(f"{case:<10} FAILED: {exc}", flush=True)
                    continue
                print(
                    f"{r['case']:<10} {r['procs']:>5} {r['zombies']:>4} {r['dump']:>7.2f} {r['freeze']:>9.0f} "
                    f"{r['rounds']:>6} {r['image'] / 2**20:>9.1f} {r['restore']:>9.2f} "
                    f"{r['serve']:>7.2f} {r['before']:>10.0f} {r['across']:>7.0f} "
                    f"{r['after']:>7.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
