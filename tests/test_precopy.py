"""End to end: the iterative (pre-copy) dump, `ckpt dump --iterative`.

The target is tests/workloads/writer.c: it keeps rewriting pseudo-random pages
while ckpt copies rounds, and after a restore proves that every byte of its
memory is what its own state says it was at the instant of the freeze (each page
is derived from a seed, its number and a version counter kept in the process's
own memory). `CKPT_TEST_ROUND_SOCKET` reports each pre-copy round to a hook (see
precopy_helpers.HOOK_SH): it makes the writer apply its next memory mutation
between two rounds, naps so the writer dirties pages, or kills the target.

Tests parametrized by tracker run with every backend this kernel has and skip the
others (the soft-dirty ones run in a VM with CONFIG_MEM_SOFT_DIRTY).
Nothing here asserts on time; waits poll with generous deadlines.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
from helpers import (
    assert_error,
    assert_same_maps,
    dir_digest,
    image_complete,
    signal_state,
    untraced_and_running,
    wait_until,
)
from precopy_helpers import (
    TRACKERS,
    Hook,
    assert_left_clean,
    check_stats,
    dir_bytes,
    dump_args,
    dump_env,
    fd_listing,
    find_after,
    kernel_features,
    last_total,
    layer_count,
    load_stats,
    log_len,
    maps_without_sd,
    need_tracker,
    restore_and_verify,
    show_json,
    steps_done,
    tracker_unavailable,
    uw_areas,
    verify_after,
)

WRITER_MIB = 64
WRITER_PAGES = WRITER_MIB * 256
WRITER_RATE = 3000  # pages/s

# the mutation test: a halving ballast keeps the rounds going (written and present
# sets shrink by half per step, far above 1 ms of copying), so steps 1-4 land
# between rounds 0-1, 1-2, 2-3 and 3-4
MUTATION_STEPS = 4
BALLAST_MIB = 128


@pytest.fixture(params=TRACKERS)
def tracker(request):
    return need_tracker(request.param)


def spawn_writer(e2e, *args: str):
    return e2e.spawn("writer", *args, timeout=120)


def iterative_dump(e2e, w, image, *, hook=None, fault=None, stats=None, timeout=180, **opts):
    args = dump_args(w.pid, image, stats=stats, **opts)
    return e2e.ckpt(*args, env=dump_env(e2e, hook, fault), timeout=timeout)


def assert_restored_state(v, w, pid: int, end: int) -> None:
    """The restored copy is not older than what the original printed before the freeze."""
    total = last_total(w, pid, end)
    assert int(v.fields["written"]) >= total, (
        f"restored writer has written {v.fields['written']} pages, but the original had "
        f"already reported {total} before the freeze (an old state was restored)"
    )
    assert int(v.fields["steps"]) == steps_done(w, pid, end), (
        f"restored writer did {v.fields['steps']} steps, the original "
        f"{steps_done(w, pid, end)} before the freeze"
    )


# ---------------------------------------------------------------- the workload itself


def test_writer_verifies_without_ckpt(e2e):
    """The writer, all its mutation steps applied by hand (SIGUSR1), verifies OK
    with no ckpt involved: a failure elsewhere is not the workload's fault."""
    w = spawn_writer(e2e, "mib=8", "rate=3000", "steps=1", "ballast=8")
    for k in range(1, MUTATION_STEPS + 3):
        os.kill(w.pid, signal.SIGUSR1)
        wait_until(lambda k=k: steps_done(w, w.pid) >= k, 30, f"STEP {k} DONE")
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, v.line
    assert v.fields["steps"] == str(MUTATION_STEPS + 2)
    assert w.reap() == 0


def test_writer_verifier_catches_bad_pages(e2e):
    """The verification is not vacuous: a flipped word in a written page and data
    in a page that must read zero (MADV_DONTNEED'd in step 2) both fail it."""
    w = spawn_writer(e2e, "mib=8", "rate=0", "steps=1")
    for k in (1, 2):
        os.kill(w.pid, signal.SIGUSR1)
        wait_until(lambda k=k: steps_done(w, w.pid) >= k, 30, f"STEP {k} DONE")
    wbase, dn = int(w.ready["w"], 16), int(w.ready["dn"], 16)
    with open(f"/proc/{w.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(wbase + 7 * 4096 + 800)
        mem.write(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        mem.seek(dn + 10 * 4096 + 64)
        mem.write(b"stale!!!")
    v = verify_after(e2e, w, w.pid, 0)
    assert not v.ok, f"the writer did not notice corrupted pages: {v.line}"
    assert "w page 7" in v.fields["reason"] and "dn page 10" in v.fields["reason"], v.line
    assert w.reap() == 1


# ---------------------------------------------------------------- round trips


def test_busy_writer_layers_restore(e2e, tracker):
    """A writer dirtying ~3000 pages/s through the rounds: --stats-json follows the
    contract, a tracking backend copies far less than everything after round 0,
    `ckpt show` lists several layers, and the restore (replaying the layers, the
    newest holding a page wins) verifies byte-exact at the freeze."""
    # nothp=1: 4 KiB pages, so that tracking precision is measurable (soft-dirty
    # tracks a transparent huge page as one 2 MiB unit; THP is "always" on Debian 6.1)
    w = spawn_writer(e2e, f"mib={WRITER_MIB}", f"rate={WRITER_RATE}", "nothp=1")
    hook = Hook(e2e, w, nap=0.2)
    image, stats_path = e2e.path("img"), e2e.path("stats")
    res = iterative_dump(
        e2e, w, image, hook=hook, stats=stats_path, tracker=tracker,
        max_rounds=4, target_downtime_ms=1, max_time=120,
    )  # fmt: skip
    assert res.returncode == 0, f"{res}\n{hook}"
    end = log_len(w)
    assert w.reap() == -signal.SIGKILL, "without --leave-running ckpt must kill the original"

    stats = load_stats(stats_path, res)
    check_stats(stats, tracker, str(res))
    rounds = stats["rounds"]
    assert rounds[0]["pages_copied"] >= WRITER_PAGES, (
        f"round 0 must copy every present page (>= {WRITER_PAGES}): {rounds[0]}"
    )
    assert len(rounds) >= 2, f"a busy writer should get a second round: {stats}"
    ran = hook.rounds()
    assert ran == list(range(len(ran))) and len(ran) >= len(rounds) - 1, (
        f"the round hook should run after each pre-copy round, CKPT_ROUND 0, 1, ...\n"
        f"{hook}\n{stats}"
    )
    if tracker == "full":
        for r in rounds[1:]:
            assert r["pages_copied"] >= WRITER_PAGES, f"full copies everything: {r}"
    else:
        for r in rounds[1:]:
            assert r["pages_copied"] < WRITER_PAGES * 3 // 4, (
                f"{tracker}: round {r['round']} copied {r['pages_copied']} of "
                f"{WRITER_PAGES} pages: it is not tracking\n{stats}"
            )
    progress = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(progress) >= len(rounds), f"want one progress line per round on stderr\n{res}"

    assert stats["layers"] >= 3, f"want round 0 + pre-copy + final layers: {stats}"
    info = show_json(e2e, image)
    meta = info["meta"]
    assert meta.get("tracker") == tracker, f"show: meta.tracker {meta.get('tracker')!r}"
    assert "rounds" in meta and "freeze_ms" in meta, f"show: meta lacks rounds/freeze_ms: {meta}"
    assert layer_count(info) == stats["layers"], (
        f"show lists {layer_count(info)} layers, the stats {stats['layers']}"
    )
    assert stats["bytes_stored"] <= dir_bytes(image), (
        f"bytes_stored {stats['bytes_stored']} > the image's size {dir_bytes(image)}"
    )

    v = restore_and_verify(e2e, w, image, w.pid)
    assert_restored_state(v, w, w.pid, end)


def test_mutations_between_rounds(e2e, tracker):
    """Each kind of memory change lands between two pre-copy rounds (step n after
    round n-1): MADV_DONTNEED of written pages, munmap + mmap at the same address,
    mremap to a new address, mprotect to PROT_NONE with data and back, a new
    mapping, COW writes to a private file mapping (then DONTNEED: the file again),
    a written 2 MiB MADV_HUGEPAGE area (then split), shared anonymous memory
    (written, MADV_REMOVE). --leave-running: the original runs on untouched and
    verifies; the image restores with the same maps and verifies byte-exact."""
    w = spawn_writer(e2e, "mib=4", "rate=300", "steps=1", f"ballast={BALLAST_MIB}")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    hook = Hook(e2e, w, steps=True)
    image, stats_path = e2e.path("img"), e2e.path("stats")
    res = iterative_dump(
        e2e, w, image, hook=hook, stats=stats_path, tracker=tracker, leave_running=True,
        max_rounds=MUTATION_STEPS + 1, target_downtime_ms=1, max_time=120,
    )  # fmt: skip
    assert res.returncode == 0, f"{res}\n{hook}"
    stats = load_stats(stats_path, res)
    check_stats(stats, tracker, str(res))
    done = steps_done(w, w.pid)
    assert done >= MUTATION_STEPS, (
        f"only {done} of {MUTATION_STEPS} mutation steps ran between rounds: ckpt stopped "
        f"pre-copying early (stop_reason {stats['stop_reason']!r})\n{hook}\n{stats}"
    )

    stepped = hook.stepped()
    for n in range(1, MUTATION_STEPS + 1):
        assert stepped.get(n) == n - 1, (
            f"step {n} should run in the hook after round {n - 1}: {stepped}\n{hook}"
        )

    assert_left_clean(w.pid, sig_before, fds_before, "after dump --leave-running")
    maps_at_freeze = maps_without_sd(w.pid)  # no mapping changes after the last step
    v0 = verify_after(e2e, w, w.pid, 0)
    assert v0.ok, f"the original broke after the dump: {v0.line}"
    assert w.reap() == 0

    start = log_len(w)
    digest = dir_digest(image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    assert_same_maps(maps_at_freeze, maps_without_sd(w.pid), "restored vs at the freeze")
    v = verify_after(e2e, w, w.pid, start)
    rres = bg.wait()
    assert v.ok, f"the restored writer failed its own checks: {v.line}\n{stats}"
    assert rres.returncode == 0, str(rres)
    assert v.fields["steps"] == str(done), f"restored after step {v.fields['steps']}, not {done}"
    assert dir_digest(image) == digest, "restore modified the image"


def test_leave_running_leaves_nothing(e2e, tracker):
    """--leave-running: the writer keeps writing (new RATE lines), has exactly the
    fds it had, no uffd-wp registration left (no `uw`), is untraced with the same
    signal state and maps, and verifies; the image restores and verifies too."""
    # nothp=1: 4 KiB pages, so that tracking precision is measurable (soft-dirty
    # tracks a transparent huge page as one 2 MiB unit; THP is "always" on Debian 6.1)
    w = spawn_writer(e2e, f"mib={WRITER_MIB}", f"rate={WRITER_RATE}", "nothp=1")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    maps_before = maps_without_sd(w.pid)
    hook = Hook(e2e, w, nap=0.1)
    image, stats_path = e2e.path("img"), e2e.path("stats")
    res = iterative_dump(
        e2e, w, image, hook=hook, stats=stats_path, tracker=tracker, leave_running=True,
        max_rounds=3, target_downtime_ms=1, max_time=120,
    )  # fmt: skip
    assert res.returncode == 0, f"{res}\n{hook}"
    check_stats(load_stats(stats_path, res), tracker, str(res))
    end = log_len(w)

    assert_left_clean(w.pid, sig_before, fds_before, "after dump --leave-running")
    assert_same_maps(maps_before, maps_without_sd(w.pid), "after dump --leave-running")
    wait_until(lambda: find_after(w, end, "RATE", w.pid), 30, "the writer to keep writing")
    v0 = verify_after(e2e, w, w.pid, 0)
    assert v0.ok, f"the original broke after the dump: {v0.line}"
    assert w.reap() == 0

    # (the original ran on after the freeze: its later RATE lines say nothing
    # about the state in the image)
    restore_and_verify(e2e, w, image, w.pid)


# ---------------------------------------------------------------- failures


def test_target_exits_mid_rounds(e2e, tracker):
    """The target is SIGKILLed by the round hook after round 2: ckpt exits 12 with
    one clear error line and leaves no image that looks complete."""
    w = spawn_writer(e2e, "mib=4", "rate=500", "steps=1", "ballast=32")
    hook = Hook(e2e, w, steps=True, kill_at=2)
    image = e2e.path("img")
    res = iterative_dump(
        e2e, w, image, hook=hook, tracker=tracker,
        max_rounds=6, target_downtime_ms=1, max_time=120,
    )  # fmt: skip
    assert any(ln.startswith("KILLED round=2") for ln in hook.lines()), (
        f"ckpt never reached round 2 (the test needs 3 pre-copy rounds)\n{res}\n{hook}"
    )
    assert_error(res, 12, str(w.pid))
    err = res.stderr.strip().splitlines()[-1].lower()
    assert any(word in err for word in ("exit", "gone", "died", "vanish", "killed")), (
        f"the error should say the process went away\n{res}"
    )
    assert w.reap() == -signal.SIGKILL
    if image.exists():
        r = e2e.ckpt("restore", "-D", str(image), "--detach")
        assert r.returncode == 8, f"an image of a dump that failed must be incomplete\n{r}"
    assert not image_complete(e2e, image)


@pytest.mark.parametrize("point", ["armed", "round"])
def test_killed_at_fault_point(e2e, tracker, point):
    """ckpt SIGKILLed with tracking armed (before round 0's copy) or after round 1's
    layer (target running): the target runs on, untraced, same fds and signal
    state, no userfaultfd and no `uw` left, memory verifies; no complete image."""
    # nothp=1: 4 KiB pages, so that tracking precision is measurable (soft-dirty
    # tracks a transparent huge page as one 2 MiB unit; THP is "always" on Debian 6.1)
    w = spawn_writer(e2e, f"mib={WRITER_MIB}", f"rate={WRITER_RATE}", "nothp=1")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    hook = Hook(e2e, w, nap=0.1)
    image = e2e.path("img")
    res = iterative_dump(
        e2e, w, image, hook=hook, fault=point, tracker=tracker, leave_running=True,
        max_rounds=4, target_downtime_ms=1, max_time=120,
    )  # fmt: skip
    assert res.returncode == -signal.SIGKILL, f"ckpt did not stop at {point!r}\n{res}\n{hook}"
    assert_left_clean(w.pid, sig_before, fds_before, f"ckpt killed at {point}")
    assert w.popen.poll() is None, "the target died"
    assert not image_complete(e2e, image), f"an image killed at {point} looks complete"
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, f"target broken by a dump killed at {point}: {v.line}"
    assert w.reap() == 0


def test_killed_at_random_moment(e2e, tracker):
    """SIGKILL `ckpt dump --iterative --leave-running` at a random moment of a
    run as long as a complete one: the same guarantees; if ckpt happened to
    finish, its image is complete, and an image that looks complete (ckpt was
    killed after its commit) restores (--new-pid) and verifies."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # nothp=1: 4 KiB pages, so that tracking precision is measurable (soft-dirty
    # tracks a transparent huge page as one 2 MiB unit; THP is "always" on Debian 6.1)
    w = spawn_writer(e2e, f"mib={WRITER_MIB}", f"rate={WRITER_RATE}", "nothp=1")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    hook = Hook(e2e, w, nap=0.15)
    opts = dict(tracker=tracker, leave_running=True, max_rounds=5, target_downtime_ms=1)

    t = time.monotonic()
    res = iterative_dump(e2e, w, e2e.path("img"), hook=hook, max_time=120, **opts)
    full = time.monotonic() - t
    assert res.returncode == 0, f"{res}\n{hook}"
    assert_left_clean(w.pid, sig_before, fds_before, "after a complete dump")

    delay = full * rng.uniform(0.1, 0.9)
    what = f"killed after {delay:.2f}s of a {full:.2f}s dump (seed {seed})"
    image = e2e.path("img")
    bg = e2e.ckpt_bg(*dump_args(w.pid, image, **opts), env=dump_env(e2e, hook))
    time.sleep(delay)
    bg.kill()
    rc = bg.result().returncode
    assert_left_clean(w.pid, sig_before, fds_before, what)
    assert rc in (0, -signal.SIGKILL), f"{what}: {bg.result()}"
    if rc == 0:
        assert image_complete(e2e, image), f"ckpt finished but its image is unusable ({what})"
    if image_complete(e2e, image):
        # finished, or killed after its commit: then the image must be a good one
        bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
        copy = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
        v = verify_after(e2e, w, copy, 0)
        assert v.ok, f"an image that looks complete does not restore right ({what}): {v.line}"
        assert bg.wait().returncode == 0
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, f"target broken ({what}): {v.line}"
    assert w.reap() == 0


# ---------------------------------------------------------------- backend choice


@pytest.mark.parametrize("name", ["uffd-wp", "soft-dirty"])
def test_unavailable_tracker_is_exit_13(e2e, name):
    """Asking for a backend this kernel lacks: exit 13 naming the missing feature;
    the target is untouched and no image is left."""
    if tracker_unavailable(name) is None:
        pytest.skip(f"{name} is available on this kernel")
    w = spawn_writer(e2e, "mib=8", "rate=1000")
    sig_before, fds_before = signal_state(w.pid), fd_listing(w.pid)
    image = e2e.path("img")
    res = iterative_dump(e2e, w, image, tracker=name)
    assert_error(res, 13, name)
    assert_left_clean(w.pid, sig_before, fds_before, f"after --tracker {name} was refused")
    assert not image_complete(e2e, image)
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, v.line
    assert w.reap() == 0


def test_auto_tracker_is_the_check_backend(e2e):
    """--tracker auto (and no --tracker) use the backend `ckpt check` names."""
    want = kernel_features()["dirty_backend"]
    w = spawn_writer(e2e, "mib=16", "rate=1000")
    for extra in ({"tracker": "auto"}, {}):
        stats_path = e2e.path("stats")
        res = iterative_dump(
            e2e, w, e2e.path("img"), stats=stats_path, leave_running=True, max_rounds=2,
            **extra,
        )  # fmt: skip
        assert res.returncode == 0, str(res)
        assert load_stats(stats_path, res)["tracker"] == want, f"{extra}: want {want}"
        wait_until(lambda: untraced_and_running(w.pid) and not uw_areas(w.pid), 15, "cleanup")
    v = verify_after(e2e, w, w.pid, 0)
    assert v.ok, v.line
    assert w.reap() == 0
