"""End to end: dump a live single-threaded process, kill it, restore it, and let
the restored process prove its own state (issue "Checkpoint and restore a live
single-threaded process").

Each workload (tests/workloads/) records its state at READY and, on SIGUSR2 or
when its blocked call returns, re-derives and checks it, printing VERIFY OK or
VERIFY FAIL with the reasons. `dump_restore_verify` also checks from outside:
the restored process has the same PID, /proc/PID/maps (adjacent areas merged),
the same signal mask / dispositions / blocked pending signals, ckpt restore exits
with the workload's status, and the image is byte-identical after the restore.
"""

from __future__ import annotations

import secrets
import signal

import pytest
from helpers import current_syscall, dump_restore_verify, wait_until


def test_memory_restored_exactly(e2e):
    """Anonymous/shared/file-backed/heap/stack/protected/THP/zero memory, clocks, identity."""
    token = secrets.token_hex(8)
    w = e2e.spawn("memory", "64", env=e2e.env(CKPT_TEST_TOKEN=token))
    v = dump_restore_verify(e2e, w)
    assert v.fields["sum"] == w.ready["sum"], "memory checksum differs from the one at READY"
    assert v.fields["token"] == token


def test_signal_state_restored(e2e):
    """Handlers and flags, mask, queued signals with values, alt stack, timers, rseq."""
    w = e2e.spawn("signals")
    v = dump_restore_verify(e2e, w)
    assert int(v.fields["ticks"]) > 0


def test_files_and_process_attributes_restored(e2e):
    """Open files with offsets/flags/dup/high fd, devices, dir fd; cwd, umask, rlimits..."""
    w = e2e.spawn("files")
    dump_restore_verify(e2e, w)


SYSCALL_SECONDS = "4"


@pytest.mark.parametrize(
    "mode",
    ["nanosleep", "clock_nanosleep", "clock_nanosleep_abs", "poll", "select", "futex", "pause"],
)
def test_blocked_syscall_completes_after_restore(e2e, mode):
    """Dumped inside a blocking call; restored, the call finishes as if nothing happened.

    (A blocking `read` is not covered: without pipes, ttys or sockets, which this
    issue's ckpt does not support, nothing can block a read.)
    """
    w = e2e.spawn("syscalls", mode, SYSCALL_SECONDS)
    nr = int(w.ready["nr"])
    wait_until(lambda: current_syscall(w.pid) == nr, 20, f"{mode} to block in syscall {nr}")

    def still_blocked_at_dump(_image):
        woke = w.find("WOKE", w.pid)
        assert not woke, (
            f"{mode} returned before the dump froze it (the dump took longer than "
            f"{SYSCALL_SECONDS}s?): {woke}"
        )

    sig = signal.SIGUSR2 if mode == "pause" else None
    v = dump_restore_verify(e2e, w, sig=sig, after_dump=still_blocked_at_dump)
    assert v.fields["sum"] == w.ready["sum"]
    woke = w.find("WOKE", w.pid)
    assert len(woke) == 1, woke


def test_python_interpreter_restored(e2e):
    """A CPython process holding 300 MB of objects comes back and re-hashes them."""
    w = e2e.spawn("pywork", "300", timeout=180)
    v = dump_restore_verify(e2e, w, timeout=180)
    assert v.fields["digest"] == w.ready["digest"]
