#!/usr/bin/env python3
"""ckpt in one minute: checkpoint a counting process, restore it, watch it carry on.

    pip install . && python scripts/demo.py

Starts a tiny C program that appends `count N` to a log file every 0.2 s, dumps
it with `ckpt dump` (which kills it), shows the image with `ckpt show`, brings
it back with `ckpt restore --detach`, and checks that the counter continues
from where it was rather than from 0. Exits 0 if it did, 1 if not (2 if the
demo could not run at all). Needs gcc and root (ckpt uses ptrace).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
    prctl(PR_SET_NAME, "counter");
    for (unsigned long n = 0;; n++) {
        char line[64];
        int len = snprintf(line, sizeof(line), "count %lu pid %d\n", n, (int)getpid());
        if (write(1, line, (size_t)len) != len)
            return 1;
        struct timespec t = {0, 200000000};
        while (nanosleep(&t, &t) == -1 && errno == EINTR)
            ;
    }
}
"""

CKPT = [sys.executable, "-m", "ckpt"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def counts(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"^count (\d+)", log.read_text(), re.M)]


def wait_for(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def ckpt(work: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ckpt (from the scratch dir, so an uninstalled source tree cannot shadow it)."""
    say(f"$ ckpt {' '.join(args)}")
    res = subprocess.run(
        [*CKPT, *args], cwd=work, capture_output=True, text=True, timeout=300, check=False
    )
    for line in (res.stdout + res.stderr).splitlines():
        say(f"    {line}")
    if res.returncode != 0:
        raise RuntimeError(f"ckpt {args[0]} exited {res.returncode}")
    return res


def kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def main() -> int:
    if shutil.which("gcc") is None:
        say("demo: gcc is needed to build the counter program (apt-get install gcc)")
        return 2
    # the restored counter is ckpt's child; once ckpt exits it comes back to us
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    work = Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    counter = None
    restored = None
    try:
        src, exe, log, image = (
            work / "counter.c",
            work / "counter",
            work / "counter.log",
            work / "image",
        )
        src.write_text(COUNTER_C)
        subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)

        say("1. Start a counter that appends a line to a log file every 0.2 s.")
        with open(log, "ab") as out:
            counter = subprocess.Popen(
                [str(exe)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=work,
                start_new_session=True,
            )
        wait_for(lambda: len(counts(log)) >= 6, 30, "the counter to count")
        say(f"   counter pid {counter.pid} has counted to {counts(log)[-1]}")
        say()

        say("2. Checkpoint it. ckpt freezes it, saves it to an image directory, kills it.")
        ckpt(work, "dump", str(counter.pid), "-D", str(image))
        counter.wait(30)
        last = counts(log)[-1]
        say(f"   the counter is gone (exit {counter.returncode}); its last line was 'count {last}'")
        say()

        say("3. Look inside the image.")
        ckpt(work, "show", str(image))
        say()

        say("4. Wait a second: nothing is counting now.")
        time.sleep(1.0)
        still = counts(log)[-1]
        say(f"   last line is still 'count {still}'")
        say()

        say("5. Restore it in the background (--detach prints its pid).")
        res = ckpt(work, "restore", "-D", str(image), "--detach")
        restored = int(res.stdout.split()[-1])
        wait_for(lambda: counts(log)[-1] > last + 3, 30, "the restored counter to count")
        after = counts(log)
        first_new = after[after.index(last) + 1] if last in after else None
        say(f"   pid {restored} is counting again: ... {', '.join(map(str, after[-5:]))}")
        say()

        if still != last or first_new != last + 1:
            say(
                f"FAIL: expected the counter to continue at {last + 1}, it went on with {first_new}"
            )
            return 1
        say(f"OK: the counter continued from {last} to {last + 1}, not from 0.")
        return 0
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        say(f"FAIL: {exc}")
        return 1
    finally:
        if restored is not None:
            kill_and_reap(restored)
        if counter is not None and counter.poll() is None:
            counter.kill()
            counter.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
