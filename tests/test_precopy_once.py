"""A plain `ckpt dump` of a large process copies its memory once while the process
runs, then freezes it only for what changed (issue 12: plain freezes of 0.5 GiB were
~350 ms; docs/ARCHITECTURE.md "One round before a plain dump's freeze").

The target is tests/workloads/writer.c, which keeps rewriting pages through the dump
and after a restore proves that every byte of its memory is what it was at the freeze.
What is checked: the round happened (stats, image layers), the restored memory is
exact, `--no-precopy` and small processes copy everything frozen, and a failed arming
either falls back to the frozen copy (plain) or fails the dump leaving the target
running untouched (--iterative). Nothing here asserts on time.
"""

from __future__ import annotations

import signal

import pytest
from helpers import assert_error, signal_state
from precopy_helpers import (
    assert_left_clean,
    check_stats,
    dump_env,
    fd_listing,
    kernel_features,
    load_stats,
    log_len,
    restore_and_verify,
    tracker_unavailable,
    verify_after,
)
from test_precopy import assert_restored_state, spawn_writer

ONCE_MIB = 96  # above precopy.policy.ONCE_MIN_BYTES (64 MiB)
SMALL_MIB = 16
RATE = 3000  # pages/s written through the dump


@pytest.fixture
def auto_tracker():
    name = kernel_features().get("dirty_backend", "full")
    reason = tracker_unavailable(name)
    if reason or name == "full":
        pytest.skip(f"no dirty-page tracker on this kernel ({reason or 'only full'}): "
                    "a plain dump copies every page frozen, as test_dump.py covers")  # fmt: skip
    return name


def plain_dump(e2e, w, image, *extra: str, fault: str | None = None):
    stats = e2e.path(f"{image.name}.stats")
    args = ["dump", str(w.pid), "-D", str(image), "--stats-json", str(stats), *extra]
    res = e2e.ckpt(*args, env=dump_env(e2e, None, fault), timeout=180)
    return res, stats


def test_plain_dump_copies_once_then_freezes(e2e, auto_tracker):
    """A busy 96 MiB writer: one round while it runs (round 0 copies every page),
    the freeze copies what it wrote since, the image has both layers, and the restore
    is byte-exact at the freeze."""
    w = spawn_writer(e2e, f"mib={ONCE_MIB}", f"rate={RATE}")
    image = e2e.path("img")
    res, stats_path = plain_dump(e2e, w, image)
    assert res.returncode == 0, str(res)
    end = log_len(w)
    assert w.reap() == -signal.SIGKILL, "without --leave-running ckpt must kill the original"
    stats = load_stats(stats_path, res)
    check_stats(stats, auto_tracker, str(res))
    assert stats["precopy"] == "once" and stats["stop_reason"] == "once", stats
    assert len(stats["rounds"]) == 1, f"a plain dump runs exactly one round: {stats}"
    assert stats["rounds"][0]["pages_copied"] >= ONCE_MIB * 256, stats
    assert stats["layers"] == 2, stats
    assert "copied once while running" in res.stderr, res.stderr
    v = restore_and_verify(e2e, w, image, w.pid)
    assert_restored_state(v, w, w.pid, end)


def test_no_precopy_and_small_processes_copy_frozen(e2e, auto_tracker):
    """--no-precopy, and a process under the threshold: no round, no tracker, one
    layer; both restore exactly."""
    for mib, extra in ((ONCE_MIB, ("--no-precopy",)), (SMALL_MIB, ())):
        w = spawn_writer(e2e, f"mib={mib}", f"rate={RATE}")
        image = e2e.path(f"img{mib}")
        res, stats_path = plain_dump(e2e, w, image, *extra)
        assert res.returncode == 0, str(res)
        end = log_len(w)
        assert w.reap() == -signal.SIGKILL
        stats = load_stats(stats_path, res)
        assert stats["precopy"] == "none" and stats["tracker"] == "none", (mib, stats)
        assert stats["rounds"] == [] and stats["layers"] == 1, (mib, stats)
        v = restore_and_verify(e2e, w, image, w.pid)
        assert_restored_state(v, w, w.pid, end)


def test_arming_failure_falls_back_to_the_frozen_copy(e2e, auto_tracker):
    """Tracking armed in the target, then arming fails (CKPT_FAULT=arm-fails): the
    plain dump cleans the tracking up, says so in one line, copies every page frozen,
    and the image restores exactly."""
    w = spawn_writer(e2e, f"mib={ONCE_MIB}", f"rate={RATE}")
    image = e2e.path("img")
    res, stats_path = plain_dump(e2e, w, image, fault="arm-fails")
    assert res.returncode == 0, str(res)
    end = log_len(w)
    assert w.reap() == -signal.SIGKILL
    stats = load_stats(stats_path, res)
    assert stats["precopy"] == "none" and stats["layers"] == 1, stats
    notes = [ln for ln in res.stderr.splitlines() if "no copy while running" in ln]
    assert len(notes) == 1 and "injected fault" in notes[0], res.stderr
    v = restore_and_verify(e2e, w, image, w.pid)
    assert_restored_state(v, w, w.pid, end)


def test_arming_failure_fails_an_iterative_dump_cleanly(e2e, auto_tracker):
    """The same fault with --iterative (the user asked for pre-copy): exit 12, one
    line, and the writer runs on untraced, with its fds and signal state as before,
    no tracking left, and memory that still verifies."""
    w = spawn_writer(e2e, f"mib={SMALL_MIB}", f"rate={RATE}")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    image = e2e.path("img")
    res, _ = plain_dump(e2e, w, image, "--iterative", fault="arm-fails")
    assert_error(res, 12, "injected fault")
    assert_left_clean(w.pid, sig_before, fds_before, "after a failed arming")
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, f"the original broke after the failed dump: {v.line}"
    assert w.reap() == 0
