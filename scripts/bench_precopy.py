#!/usr/bin/env python3
"""Benchmark: iterative (pre-copy) dump of a busy 1 GiB process vs a full dump.

The target is tests/workloads/writer.c: N MiB, every page written once, then
rewriting random pages at a set rate while ckpt works (it reports its achieved
page writes per second in its log every second). For each write rate:

  1. `ckpt dump --leave-running` (non-iterative): the whole copy happens frozen;
     its freeze (`ckpt show --json` meta.freeze_ms) and image size;
  2. `ckpt dump --iterative` of the same process (which ckpt then kills): rounds,
     stop reason, total time, final freeze and bytes stored (from --stats-json);
  3. both images restored one after the other; each restored process verifies
     every byte of its memory against its own state (a FAIL aborts the run).

Then the writer's own throughput with and without tracking armed: an unthrottled
writer (rate=max) runs untracked, then under `ckpt dump --iterative
--leave-running` whose round hook (CKPT_TEST_ROUND_SOCKET) marks the writer's log and
sleeps, so ckpt is idle while tracking is armed; the RATE lines inside those
windows are the tracked throughput (first second: pages take their first
write-protect fault; later seconds: pages already written this round).

    python scripts/bench_precopy.py [--mib 1024] [--rates 0,16,64,256] [--tracker auto]
                                    [--no-throughput] [--keep]

The collect + re-arm cost per GiB is measured by scripts/bench_scan.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRITER_C = REPO / "tests" / "workloads" / "writer.c"
CKPT = [sys.executable, "-m", "ckpt"]
PR_SET_CHILD_SUBREAPER = 36


def die(msg: str) -> None:
    raise SystemExit(f"bench_precopy: {msg}")


def build(tmp: Path) -> Path:
    exe = tmp / "ckwriter"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(WRITER_C)], check=True)
    return exe


def become_subreaper() -> None:
    """Restored processes (children of `ckpt restore`) come back to us if ckpt dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class Writer:
    """One writer process (our child) and its log."""

    def __init__(self, exe: Path, tmp: Path, name: str, *args: str):
        self.exe = exe
        self.dir = tmp / name
        self.dir.mkdir()
        self.log = self.dir / "writer.log"
        with open(self.log, "ab") as out:  # O_APPEND: restored copies append too
            self.popen = subprocess.Popen(
                [str(exe), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                close_fds=True,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self.cmdline = None
        self.wait_line("READY", 0, timeout=300)
        self.cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def wait_line(self, word: str, start: int, timeout: float = 120, pid_alive=None) -> str:
        end = time.monotonic() + timeout
        while True:
            for line in self.lines()[start:]:
                if line.startswith(word + " "):
                    return line
                if line.startswith("SETUP"):
                    die(f"writer failed to start: {line}")
            if pid_alive is not None and not pid_alive():
                time.sleep(0.3)
                for line in self.lines()[start:]:
                    if line.startswith(word + " "):
                        return line
                die(f"the writer died before printing {word}")
            if time.monotonic() > end:
                die(f"no {word} line in {self.log} after {timeout}s")
            time.sleep(0.05)

    def is_ours(self, pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes() == self.cmdline and os.readlink(
                f"/proc/{pid}/cwd"
            ) == str(self.dir)
        except OSError:
            return False

    def verify(self, pid: int) -> str:
        """SIGUSR2 pid (our writer or its restored copy) and wait for its VERIFY line."""
        start = len(self.lines())
        end = time.monotonic() + 300
        next_kick = 0.0
        while True:
            for line in self.lines()[start:]:
                if line.startswith("VERIFY ") and f"pid={pid} " in line + " ":
                    if not line.startswith("VERIFY OK"):
                        die(f"verification failed: {line[:2000]}")
                    return line
            now = time.monotonic()
            if not self.is_ours(pid):
                time.sleep(0.3)
                if not any(ln.startswith("VERIFY ") for ln in self.lines()[start:]):
                    die(f"pid {pid} is gone without a VERIFY line")
                continue
            if now >= next_kick:
                os.kill(pid, signal.SIGUSR2)
                next_kick = now + 2
            if now > end:
                die(f"pid {pid} did not verify")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def ckpt(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [*CKPT, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        die(f"`ckpt {' '.join(args)}` exited {res.returncode}:\n{res.stderr}")
    return res


def show_meta(image: Path) -> dict:
    return json.loads(ckpt("show", str(image), "--json").stdout)["meta"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reap_any(pid: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if got == pid:
            return
        time.sleep(0.05)


def restore_verify(w: Writer, image: Path, pid: int) -> float:
    """Restore image at pid (free), verify the copy; returns restore wall seconds."""
    with tempfile.TemporaryFile() as err:
        t = time.monotonic()
        bg = subprocess.Popen(
            [*CKPT, "restore", "-D", str(image)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            end = time.monotonic() + 600
            while not (w.is_ours(pid) and _untraced(pid)):
                if bg.poll() is not None:
                    err.seek(0)
                    die(f"ckpt restore exited {bg.returncode}: {err.read().decode()}")
                if time.monotonic() > end:
                    die("restore did not finish")
                time.sleep(0.02)
            secs = time.monotonic() - t
            w.verify(pid)
            rc = bg.wait(300)
            if rc != 0:
                die(f"ckpt restore exited {rc} after the writer verified")
            return secs
        finally:
            if bg.poll() is None:
                bg.kill()
                bg.wait()
            if w.is_ours(pid):  # only a failed run gets here with the copy alive
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                reap_any(pid)


def _untraced(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return line.split()[1] == "0"
    except OSError:
        return False
    return False


def rate_lines(lines: list[str], pid: int) -> list[float]:
    out = []
    for line in lines:
        if line.startswith("RATE ") and f"pid={pid} " in line:
            for tok in line.split():
                if tok.startswith("pages_s="):
                    out.append(float(tok[8:]))
    return out


def env_without_hooks() -> dict:
    env = dict(os.environ)
    for k in ("CKPT_TEST_ROUND_SOCKET", "CKPT_FAULT"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------- part 1


def run_rate(exe: Path, tmp: Path, mib: int, rate_mib: int, args) -> dict:
    pages_s = rate_mib * 256
    w = Writer(exe, tmp, f"rate{rate_mib}", f"mib={mib}", f"rate={pages_s}")
    try:
        time.sleep(1.5)  # let it settle at its rate
        env = env_without_hooks()
        full_img = tmp / f"full{rate_mib}"
        t = time.monotonic()
        ckpt("dump", str(w.pid), "-D", str(full_img), "--leave-running", env=env)
        full_s = time.monotonic() - t
        full_meta = show_meta(full_img)

        it_img, stats_path = tmp / f"iter{rate_mib}", tmp / f"stats{rate_mib}.json"
        start = len(w.lines())
        cmd = [
            "dump",
            "--iterative",
            str(w.pid),
            "-D",
            str(it_img),
            "--stats-json",
            str(stats_path),
        ]
        cmd += ["--tracker", args.tracker]
        if args.max_rounds:
            cmd += ["--max-rounds", str(args.max_rounds)]
        if args.target_downtime_ms is not None:
            cmd += ["--target-downtime-ms", str(args.target_downtime_ms)]
        t = time.monotonic()
        ckpt(*cmd, env=env)
        it_s = time.monotonic() - t
        w.popen.wait(60)
        stats = json.loads(stats_path.read_text())
        achieved = rate_lines(w.lines()[start:], w.pid)

        pid = w.pid
        restore_it = restore_verify(w, it_img, pid)
        restore_full = restore_verify(w, full_img, pid)
        row = {
            "rate": rate_mib,
            "achieved": (sum(achieved) / len(achieved) / 256) if achieved else float("nan"),
            "tracker": stats["tracker"],
            "rounds": len(stats["rounds"]),
            "stop": stats["stop_reason"],
            "total_s": stats.get("total_seconds", it_s),
            "freeze_ms": stats["final"]["freeze_ms"],
            "final_pages": stats["final"]["pages_copied"],
            "stored_mib": stats["bytes_stored"] / 2**20,
            "image_mib": dir_bytes(it_img) / 2**20,
            "full_s": full_s,
            "full_freeze_ms": float(full_meta.get("freeze_ms", float("nan"))),
            "full_image_mib": dir_bytes(full_img) / 2**20,
            "restore_it_s": restore_it,
            "restore_full_s": restore_full,
            "per_round": stats["rounds"],
        }
        if not args.keep:
            shutil.rmtree(it_img, ignore_errors=True)
            shutil.rmtree(full_img, ignore_errors=True)
        return row
    finally:
        w.kill()


# ---------------------------------------------------------------- part 2


def round_hook(path: Path, log: Path, secs: float) -> socket.socket:
    """Serve ckpt's round hook at `path` (ckpt/precopy.py _round_hook): after each
    round, mark the writer's log, keep ckpt idle for `secs`, mark it again."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                k = conn.recv(64).split()[0].decode()
                with open(log, "a") as f:
                    f.write(f"HOOK BEGIN round={k}\n")
                time.sleep(secs)
                with open(log, "a") as f:
                    f.write(f"HOOK END round={k}\n")
                conn.sendall(b"k")

    threading.Thread(target=serve, daemon=True).start()
    return srv


REPORT_S = 0.5  # the writer's RATE interval in part 2


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def throughput(exe: Path, tmp: Path, mib: int, tracker: str, secs: float) -> dict:
    """The unthrottled writer's pages/s: untracked, during the dump's copying
    rounds, and in the hook windows (ckpt idle, tracking armed): the first
    interval after the window opens, and the rest."""
    hook = None
    w = Writer(exe, tmp, f"tput-{tracker}", f"mib={mib}", "rate=max", f"report={REPORT_S}")
    try:
        time.sleep(secs + 2 * REPORT_S)
        base = rate_lines(w.lines(), w.pid)[1:]  # the first line includes start-up
        env = env_without_hooks()
        hook_path = tmp / f"tput-{tracker}.sock"
        hook = round_hook(hook_path, w.log, secs)
        env["CKPT_TEST_ROUND_SOCKET"] = str(hook_path)
        img, stats_path = tmp / f"tput-{tracker}-img", tmp / f"tput-{tracker}.json"
        start = len(w.lines())
        ckpt(
            "dump", "--iterative", str(w.pid), "-D", str(img), "--leave-running",
            "--tracker", tracker, "--max-rounds", "3", "--target-downtime-ms", "0",
            "--stats-json", str(stats_path), env=env,
        )  # fmt: skip
        copying, first, later = [], [], []
        inside, n = False, 0
        for line in w.lines()[start:]:
            if line.startswith("HOOK BEGIN"):
                inside, n = True, 0
            elif line.startswith("HOOK END"):
                inside, n = False, 0
            elif line.startswith("RATE ") and f"pid={w.pid} " in line:
                n += 1
                v = rate_lines([line], w.pid)[0]
                if not inside:
                    if n > 1:  # the first one straddles the hook's end
                        copying.append(v)
                elif n == 2:  # n == 1 straddles the hook's start
                    first.append(v)
                elif n > 2:
                    later.append(v)
        w.verify(w.pid)
        w.popen.wait(60)
        shutil.rmtree(img, ignore_errors=True)
        return {
            "tracker": json.loads(stats_path.read_text())["tracker"],
            "base": mean(base),
            "copying": mean(copying),
            "first": mean(first),
            "later": mean(later),
        }
    finally:
        if hook is not None:
            hook.close()
        w.kill()


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024, help="writer size (default 1024)")
    ap.add_argument("--rates", default="0,16,64,256", help="write rates in MiB/s")
    ap.add_argument("--tracker", default="auto", help="tracker for the iterative dumps")
    ap.add_argument("--max-rounds", type=int, default=None, help="default: ckpt's")
    ap.add_argument("--target-downtime-ms", type=float, default=None, help="default: ckpt's")
    ap.add_argument("--tput-trackers", default="auto,full", help="trackers for part 2")
    ap.add_argument("--tput-secs", type=float, default=4.0, help="seconds per tracked window")
    ap.add_argument("--no-throughput", action="store_true", help="skip part 2")
    ap.add_argument("--keep", action="store_true", help="keep the images and logs")
    args = ap.parse_args()
    become_subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-precopy-"))
    try:
        exe = build(tmp)
        rows = []
        for r in (int(x) for x in args.rates.split(",")):
            print(f"... {args.mib} MiB writer at {r} MiB/s", file=sys.stderr, flush=True)
            rows.append(run_rate(exe, tmp, args.mib, r, args))

        print(f"\nIterative vs full dump of a {args.mib} MiB writer (both restored and verified)")
        hdr = (
            f"{'write':>7} {'got':>6} {'tracker':>10} {'rounds':>6} {'stop':>13} "
            f"{'total s':>7} {'freeze ms':>9} {'final pg':>8} {'stored MiB':>10} "
            f"{'| full s':>8} {'freeze ms':>9} {'image MiB':>9}"
        )
        print(hdr)
        print("-" * len(hdr))
        for x in rows:
            print(
                f"{x['rate']:>5}M/s {x['achieved']:>5.0f}M {x['tracker']:>10} {x['rounds']:>6} "
                f"{x['stop']:>13} {x['total_s']:>7.2f} {x['freeze_ms']:>9.0f} "
                f"{x['final_pages']:>8} {x['stored_mib']:>10.1f} | {x['full_s']:>6.2f} "
                f"{x['full_freeze_ms']:>9.0f} {x['full_image_mib']:>9.1f}"
            )
        print("\n(write: requested rate; got: the writer's own average during the iterative")
        print(" dump; stored: bytes written to the iterative image, all layers)")
        print("\nPer round (pages copied / est. freeze ms):")
        for x in rows:
            cells = " ".join(
                f"{r['pages_copied']}/{r['est_freeze_ms']:.0f}" for r in x["per_round"]
            )
            print(f"  {x['rate']:>4} MiB/s: {cells}")

        if not args.no_throughput:
            tp = []
            for t in args.tput_trackers.split(","):
                print(f"... throughput with tracker {t}", file=sys.stderr, flush=True)
                tp.append(throughput(exe, tmp, args.mib, t, args.tput_secs))
            print(f"\nWriter throughput, {args.mib} MiB, unthrottled (pages/s, MiB/s)")
            hdr = (
                f"{'tracker':>10} {'untracked':>18} {'ckpt copying':>18} "
                f"{'armed, 1st':>18} {'armed, later':>18}"
            )
            print(hdr)
            print("-" * len(hdr))
            for x in tp:
                cells = " ".join(
                    f"{v:>10.0f} {v / 256:>6.0f}M"
                    for v in (x["base"], x["copying"], x["first"], x["later"])
                )
                print(f"{x['tracker']:>10} {cells}")
            print(f"\n(RATE every {REPORT_S} s. ckpt copying: during the dump's rounds, ckpt")
            print(" competing for the CPU; armed: ckpt idle in its round hook, tracking armed")
            print(" (1st: the first interval, when pages not yet written since the re-arm")
            print(" still take a write-protect fault). `full` arms nothing: the control.)")
    finally:
        if args.keep:
            print(f"\nkept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
