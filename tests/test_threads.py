"""Multi-threaded processes (issue "Real programs"): every thread is stopped, its
per-thread state captured and given back under its own TID.

The workloads check themselves after the restore: tests/workloads/pthreads.c
(threads running, blocked on a mutex, in a condition wait, in nanosleep; each
verifies its TID, name, sigaltstack, signal mask, TLS, robust list, rseq and
its own memory, and pthread_join must work) and tests/workloads/pythreads.py
(a ThreadPoolExecutor, a queue pipeline and a parked thread in CPython).
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers import (
    assert_error,
    assert_no_process,
    dir_digest,
    dump_restore_verify,
    proc_status,
    wait_until,
)
from precopy_helpers import need_tracker

from ckpt.kernel.spawn import spawn_restorer


def thread_names(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            out[int(tid)] = f.read().strip()
    return out


def test_pthreads_round_trip(e2e):
    w = e2e.spawn("pthreads", "4")
    assert len(thread_names(w.pid)) == 9
    v = dump_restore_verify(e2e, w)
    assert v.fields["threads"] == "9"


def test_pthreads_pending_signals(e2e):
    """Signals each thread sent itself and blocks (tgkill: SI_TKILL or SI_USER, which
    the kernel lets only the thread itself queue again) are pending in the same thread
    after the restore, with the same sender."""
    w = e2e.spawn("pthreads", "4", "pending")
    v = dump_restore_verify(e2e, w)
    assert v.fields["threads"] == "9"


def test_pthreads_same_tids_and_names(e2e):
    """Checked from outside while the restored process runs: same TIDs, same names."""
    w = e2e.spawn("pthreads", "2")
    pid = w.pid
    before = thread_names(pid)
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(pid, w.ident, bg)
    wait_until(lambda: len(os.listdir(f"/proc/{pid}/task")) == len(before), 30, "all threads")
    assert thread_names(pid) == before
    for tid in before:
        st = proc_status(f"{pid}/task/{tid}")
        assert st is not None and st["TracerPid"] == "0", f"thread {tid} is still traced"
    v = e2e.verify(w, pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def test_pthreads_new_pid(e2e):
    w = e2e.spawn("pthreads", "2")
    image = e2e.path("img")
    e2e.dump_ok(w, image, "--leave-running")
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    new = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    assert new != w.pid
    wait_until(lambda: len(os.listdir(f"/proc/{new}/task")) == 7, 30, "all threads")
    v = e2e.verify(w, new)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, v0.line


@pytest.mark.parametrize("tracker", ["uffd-wp", "soft-dirty", "full"])
def test_pthreads_iterative(e2e, tracker):
    """Pre-copy rounds while the spinners write their regions; every thread arrives.
    (soft-dirty: run inside the Debian 6.1 VM by tests/test_vm_kernel.py.)"""
    need_tracker(tracker)
    w = e2e.spawn("pthreads", "3")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--iterative", "--tracker", tracker, "--max-rounds", "4")
    assert res.returncode == 0, str(res)
    assert w.reap() == -signal.SIGKILL
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def test_python_threadpool(e2e):
    """(The pool keeps working, so its malloc arenas may grow: no maps comparison.)"""
    w = e2e.spawn("pythreads", "4")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid, signal.SIGUSR2, timeout=120)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0
    assert int(v.fields["tasks"]) > 64


@pytest.mark.parametrize("mode", ["plain", "iterative"])
def test_threads_appearing_while_attaching(e2e, mode):
    """A thread keeps creating and joining short-lived threads: every pass of the
    freeze must catch the ones that appeared, and the process keeps churning after."""
    w = e2e.spawn("pthreads", "1", "churn")
    extra = ("--iterative", "--max-rounds", "3") if mode == "iterative" else ()
    for _ in range(3):  # several attempts at different moments of the churn
        res = e2e.dump(w.pid, e2e.path("img"), "--leave-running", *extra)
        assert res.returncode == 0, str(res)
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0


def thread_masks(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        st = proc_status(f"{pid}/task/{tid}")
        if st:
            out[int(tid)] = st["SigBlk"]
    return out


def all_untraced(pid: int) -> bool:
    tids = os.listdir(f"/proc/{pid}/task")
    return all(
        (proc_status(f"{pid}/task/{t}") or {}).get("TracerPid") == "0"
        and (proc_status(f"{pid}/task/{t}") or {}).get("State", "t")[:1] not in "tT"
        for t in tids
    )


def thread_pending(pid: int) -> dict[int, tuple[str, str]]:
    """(SigPnd, ShdPnd) of each thread: a dump killed mid-way leaves no signal behind
    (the marker of an injected program: kernel/inject_batch.py)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        st = proc_status(f"{pid}/task/{tid}")
        if st:
            out[int(tid)] = (st["SigPnd"], st["ShdPnd"])
    return out


@pytest.mark.parametrize(
    "point,variant",
    [("seized", ""), ("inject", ""), ("inject-thread", ""), ("read-pages", ""),
     ("inject-thread", "handlers"), ("inject-thread", "blocked")],
)  # fmt: skip
def test_threads_dump_killed_at_fault_point(e2e, point, variant):
    """ckpt SIGKILLed mid-dump, also inside one thread's own injected session (the
    threads' injected programs; with handlers on every signal a program could end on,
    one injected syscall at a time; with those signals blocked by the threads, programs
    ending on a signal they block): every thread runs on untraced with its own mask,
    altstack, TLS and memory intact, and no signal left pending."""
    w = e2e.spawn("pthreads", "4", *([variant] if variant else []))
    masks = thread_masks(w.pid)
    pending = thread_pending(w.pid)
    res = e2e.dump(w.pid, e2e.path("img"), env=e2e.env(CKPT_FAULT=point))
    assert res.returncode == -signal.SIGKILL, f"ckpt did not stop at {point}\n{res}"
    wait_until(lambda: all_untraced(w.pid), 30, f"every thread to run untraced ({point})")
    # the main thread sits in sigsuspend (its mask shows the call's): compare the others
    wait_until(
        lambda: (
            {t: m for t, m in thread_masks(w.pid).items() if t != w.pid}
            == {t: m for t, m in masks.items() if t != w.pid}
        ),
        10,
        "every thread's signal mask as before",
    )
    assert thread_pending(w.pid) == pending, f"signals left pending by a dump killed at {point}"
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, f"threads broken by a dump killed at {point}: {v.line}"
    assert w.reap() == 0


def test_threads_dump_killed_at_random_moments(e2e):
    """SIGKILL `ckpt dump --leave-running` of a 33-thread process at moments spread
    over a whole dump; afterwards every thread is intact and the process verifies."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    w = e2e.spawn("pthreads", "28")
    pending = thread_pending(w.pid)
    start = time.monotonic()
    res = e2e.dump(w.pid, e2e.path("img"), "--leave-running")
    full = time.monotonic() - start
    assert res.returncode == 0, str(res)
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        delay = full * frac * rng.uniform(0.8, 1.2)
        bg = e2e.ckpt_bg("dump", str(w.pid), "-D", str(e2e.path("img")), "--leave-running")
        time.sleep(delay)
        bg.kill()
        what = f"killed after {delay:.2f}s of a {full:.2f}s dump (seed {seed})"
        wait_until(lambda: all_untraced(w.pid), 30, f"every thread to run untraced ({what})")
        assert thread_pending(w.pid) == pending, f"signals left pending ({what})"
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, f"threads broken by killed dumps (seed {seed}): {v.line}"
    assert w.reap() == 0


def test_restore_fails_cleanly_when_a_thread_id_is_taken(e2e):
    """A thread's TID is in use: exit 9 naming it before anything is built, no
    process left, image untouched; once it is free the restore works."""
    w = e2e.spawn("pthreads", "1")
    tids = [int(t) for t in w.ready["tids"].split(",")]
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)
    holder = spawn_restorer(tids[-1])  # a parked child of ours at that TID
    try:
        res = e2e.ckpt("restore", "-D", str(image))
        assert_error(res, 9, str(tids[-1]))
        assert_no_process(w.pid)
        assert dir_digest(image) == digest
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert bg.wait(60).returncode == 0
