"""End to end: a dump that dies half-way (ckpt SIGKILLed) leaves the target
running exactly as it was and no image that looks complete (DESIGN invariant 4).

`CKPT_FAULT=<point>` makes ckpt SIGKILL itself at a named point (so it cannot
clean up after itself in-process: whatever undoes its work on the target must
survive its death). After each kill the target must be untraced, not stopped,
have the same blocked mask and signal state, still verify its memory checksum
and handle SIGUSR2; `ckpt show` must not accept the image directory.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
from helpers import (
    dump_restore_verify,
    image_complete,
    resting_signal_state,
    signal_state,
    untraced_and_running,
    wait_until,
)

FAULT_POINTS = ["seized", "inject-setup", "inject", "read-pages", "write-image", "commit"]


def prove_image_restores(e2e, w, image, what):
    """Restore a copy (--new-pid, the original is alive) and make it verify."""
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    copy = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    v = e2e.verify(w, copy)
    res = bg.wait()
    assert v.ok, f"an image left by a killed dump looks complete but is not ({what}): {v.line}"
    assert res.returncode == 0, str(res)
    assert v.fields["sum"] == w.ready["sum"]


def assert_target_intact(e2e, w, sig_before, what):
    wait_until(lambda: untraced_and_running(w.pid), 30, f"the target to run untraced ({what})")
    assert w.popen.poll() is None, f"the target died ({what})"
    wait_until(lambda: signal_state(w.pid) == sig_before, 10, f"signal state as before ({what})")


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_dump_killed_at_fault_point(e2e, point):
    w = e2e.spawn("memory", "32")
    sig_before = resting_signal_state(w.pid)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, env=e2e.env(CKPT_FAULT=point))
    assert res.returncode == -signal.SIGKILL, f"ckpt did not stop at fault point {point!r}\n{res}"
    assert_target_intact(e2e, w, sig_before, f"killed at {point}")
    assert not image_complete(e2e, image), f"an image killed at {point} looks complete"

    v = e2e.verify(w, w.pid)
    assert v.ok, f"target broken by a dump killed at {point}: {v.line}"
    assert v.fields["sum"] == w.ready["sum"]
    assert w.reap() == 0


def test_dump_after_killed_dump(e2e):
    """Leftovers of a dump killed just before its commit do not block the next dump
    to the same directory, and that dump restores correctly."""
    w = e2e.spawn("memory", "16")
    sig_before = resting_signal_state(w.pid)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, env=e2e.env(CKPT_FAULT="commit"))
    assert res.returncode == -signal.SIGKILL, str(res)
    assert_target_intact(e2e, w, sig_before, "killed at commit")

    v = dump_restore_verify(e2e, w, image=image)  # same DIR as the killed dump
    assert v.fields["sum"] == w.ready["sum"]


def test_dump_killed_at_random_moments(e2e):
    """SIGKILL `ckpt dump --leave-running` of a 256 MiB process at several moments
    spread over a full dump's duration; each time the target is intact and the
    image is either not loadable or (ckpt finished, or was killed after its
    commit) really restores."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    w = e2e.spawn("memory", "256", timeout=120)
    sig_before = resting_signal_state(w.pid)

    start = time.monotonic()
    res = e2e.dump(w.pid, e2e.path("img"), "--leave-running")
    full = time.monotonic() - start
    assert res.returncode == 0, str(res)
    assert_target_intact(e2e, w, sig_before, "after a full --leave-running dump")

    for frac in (0.05, 0.25, 0.45, 0.65, 0.85):
        delay = full * frac * rng.uniform(0.8, 1.2)
        what = f"killed after {delay:.2f}s of a {full:.2f}s dump (seed {seed})"
        image = e2e.path("img")
        bg = e2e.ckpt_bg("dump", str(w.pid), "-D", str(image), "--leave-running")
        time.sleep(delay)
        bg.kill()
        rc = bg.result().returncode
        assert_target_intact(e2e, w, sig_before, what)
        assert rc in (0, -signal.SIGKILL), f"{what}: {bg.result()}"
        if rc == 0:
            assert image_complete(e2e, image), f"ckpt finished but its image is unusable ({what})"
        elif image_complete(e2e, image):
            # killed after its commit: then the image must be a real one
            prove_image_restores(e2e, w, image, what)

    v = e2e.verify(w, w.pid)
    assert v.ok, f"target broken by killed dumps (seed {seed}): {v.line}"
    assert v.fields["sum"] == w.ready["sum"]
    assert w.reap() == 0
