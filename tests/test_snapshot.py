"""End to end: point-in-time snapshots of live processes (`ckpt snapshot PID --store S`),
restored with `ckpt restore --store S --at ID --new-pid` while the original runs on.

The main workload is tests/workloads/snapgen.c: its memory history is numbered.
Generation g (one per SIGUSR1) rewrites and drops a PRNG-chosen set of pages
that depends only on (seed, g), so a restored copy proves WHICH instant it is: it
reports its generation and checks every byte of its memory against a replay of
generations 1..g computed from scratch. With no background writes (the default)
the memory changes only on SIGUSR1, so the generation the original had when a
snapshot was taken is exactly known, and the restored copy must report it. The
writer workload (tests/workloads/writer.c, steps=1, rate=0) does the same for
structural changes (new, moved, re-created, PROT_NONE, DONTNEED'd mappings,
THP): step k is applied between snapshots and the copy reports steps= and
written=. tests/workloads/respawn.c starts a new process under a chosen PID
(clone3 set_tid) to replace a snapshotted process by another one.

Covered (issue "Point-in-time snapshots"): each of a series of snapshots restores
its own instant, and the listing shows one full snapshot followed by small
increments; lost tracking (exec, closed fd, a new process under the same PID)
makes the next snapshot full, with the reason; a snapshot run killed anywhere
(fault points and random moments) leaves a valid store, no partial snapshot, a
target that runs on unharmed and a full next snapshot; concurrent runs on one
store (exit 14 or --wait); the first snapshot of a process restored beside the
running original (and exit 9 without --new-pid). Beyond that: tracked processes
meeting `ckpt dump`, `ckpt dump --iterative` and a second store.

Every process a test starts is killed and reaped by the e2e fixture even when the
test fails (restored copies are found with find_restored, which adopts them).
Nothing asserts on time; waits poll with generous deadlines.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    DEADLINE,
    E2E,
    POLL,
    Ident,
    Result,
    RoundHook,
    Workload,
    assert_error,
    copies,
    proc_alive,
    proc_status,
    read_bytes,
    read_link,
    signal_state,
    wait_until,
)
from precopy_helpers import (
    UFFD_LINK,
    Hook,
    dump_env,
    fd_listing,
    find_after,
    log_len,
    tracker_unavailable,
    verify_after,
)

SNAPGEN_ARGS = ("mib=4", "per=48", "drop=4")
SNAPGEN_PAGES = 4 * 256
# pages an idle snapgen writes besides its generation's (stack, libc, its own
# variables): an increment holds at most this many more than the generation wrote
IDLE_SLACK = 64


@pytest.fixture(autouse=True)
def _need_uffd_wp():
    """Without uffd-wp every snapshot is full (docs/SNAPSHOTS.md): nothing to test here."""
    why = tracker_unavailable("uffd-wp")
    if why:
        pytest.skip(f"persistent snapshot tracking needs uffd-wp: {why}")


# ---------------------------------------------------------------- small helpers


def starttime(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def uffd_fds(pid: int) -> list[int]:
    return sorted(fd for fd, link in fd_listing(pid).items() if link == UFFD_LINK)


def wait_line(
    w: Workload, start: int, word: str, pid: int, want=None, timeout: float = DEADLINE
) -> tuple[list[str], dict[str, str]]:
    """The first `word ...` line from pid after log line `start` for which
    want(words, fields) holds; fail early if pid is gone without printing it."""
    end = time.monotonic() + timeout
    while True:
        for words, fields, _line in find_after(w, start, word, pid):
            if want is None or want(words, fields):
                return words, fields
        if not proc_alive(pid):
            time.sleep(0.2)
            if not any(want is None or want(a, b) for a, b, _ in find_after(w, start, word, pid)):
                tail = "\n".join(w.lines()[start:][-20:])
                raise AssertionError(f"pid {pid} is gone without a {word} line:\n{tail}")
            continue
        if time.monotonic() > end:
            tail = "\n".join(w.lines()[start:][-20:])
            raise AssertionError(f"no {word} line from pid {pid} in {timeout}s:\n{tail}")
        time.sleep(POLL)


def next_gen(w: Workload, pid: int, g: int) -> int:
    """SIGUSR1 snapgen into generation g; the number of pages it wrote (and kept)."""
    start = log_len(w)
    os.kill(pid, signal.SIGUSR1)
    _, fields = wait_line(w, start, "GEN", pid, lambda words, _f: words[1:2] == [str(g)])
    return int(fields["written"])


def snapshot(e2e: E2E, pid: int, store: Path, *extra: str, env=None) -> Result:
    return e2e.ckpt("snapshot", str(pid), "--store", str(store), *extra, env=env)


def snap_ok(e2e: E2E, pid: int, store: Path, *extra: str, env=None) -> tuple[str, Result]:
    """A successful snapshot; its id (the one line `ckpt snapshot` prints on stdout)."""
    res = snapshot(e2e, pid, store, *extra, env=env)
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)
    lines = res.stdout.split()
    assert len(lines) == 1, f"`ckpt snapshot` should print just the new id\n{res}"
    return lines[0], res


def full_reason(res: Result) -> str | None:
    """The reason of a `full snapshot: <reason>` line on stderr, or None."""
    for line in res.stderr.splitlines():
        if line.startswith("full snapshot: "):
            return line[len("full snapshot: ") :].strip()
    return None


def listing(e2e: E2E, store: Path) -> list[dict]:
    res = e2e.ckpt("snapshots", str(store), "--json")
    assert res.returncode == 0, str(res)
    try:
        return json.loads(res.stdout)["snapshots"]
    except (ValueError, KeyError) as exc:
        raise AssertionError(
            f"`ckpt snapshots --json` is not the documented JSON: {exc}\n{res}"
        ) from None


def by_id(snaps: list[dict]) -> dict[str, dict]:
    return {s["id"]: s for s in snaps}


def verify_deep(e2e: E2E, store: Path, what: str) -> None:
    res = e2e.ckpt("verify", str(store), "--deep")
    assert res.returncode == 0, f"the store does not verify ({what})\n{res}"


def tracking_record(store: Path, pid: int) -> dict | None:
    """tracking/<pid>.json (docs/SNAPSHOTS.md "Tracking between snapshots")."""
    try:
        return json.loads((store / "tracking" / f"{pid}.json").read_text())
    except FileNotFoundError:
        return None


def tmp_entries(store: Path) -> list[str]:
    d = store / "tmp"
    return sorted(os.listdir(d)) if d.is_dir() else []


def restore_copy(e2e: E2E, w: Workload, store: Path, sid: str, pid: int, what: str = ""):
    """Restore snapshot sid as a copy (--new-pid) beside the running pid; the copy
    must come back without ckpt's tracking fd and verify itself; ckpt restore exits
    with the copy's status 0. Returns the copy's Verify."""
    start = log_len(w)
    bg = e2e.ckpt_bg("restore", "--store", str(store), "--at", sid, "--new-pid")
    copy = e2e.find_restored(w.ident, exclude=pid, bg=bg)
    try:
        fds = uffd_fds(copy)
    except FileNotFoundError:
        fds = []  # already verified and gone: its VERIFY line says the rest
    assert not fds, f"the restored copy of {sid} holds ckpt's tracking uffd (fds {fds})"
    v = verify_after(e2e, w, copy, start)
    res = bg.wait()
    assert v.ok, f"the copy restored from snapshot {sid} failed its own checks {what}: {v.line}"
    assert res.returncode == 0, f"ckpt restore should exit with the copy's status 0\n{res}"
    return v


def assert_gen(v, g: int, sid: str, what: str = "") -> None:
    assert v.fields.get("gen") == str(g), (
        f"snapshot {sid} was taken at generation {g}, but its restored copy is at "
        f"generation {v.fields.get('gen')} {what}: {v.line}"
    )


def restore_gen(
    e2e: E2E, w: Workload, store: Path, sid: str, pid: int, g: int, what: str = ""
) -> None:
    """restore_copy + assert_gen: snapshot sid restores exactly generation g."""
    assert_gen(restore_copy(e2e, w, store, sid, pid, what), g, sid, what)


def finish_original(e2e: E2E, w: Workload, pid: int, g: int, *, ours: bool = True) -> None:
    """The original (or its replacement at pid) is still at generation g and verifies."""
    v = verify_after(e2e, w, pid, 0)
    assert v.ok, f"the snapshotted process itself is broken: {v.line}"
    assert v.fields.get("gen") == str(g), f"the original is at the wrong generation: {v.line}"
    if ours:
        assert w.reap() == 0
    else:
        e2e.reap_adopted(pid)


def untraced_running(pid: int) -> bool:
    st = proc_status(pid)
    return bool(st) and st["TracerPid"] == "0" and st["State"][:1] in "RSD"


# ---------------------------------------------------------------- 1. a series of snapshots


def test_each_snapshot_restores_its_instant(e2e):
    """Six snapshots with a generation of writes and drops between each two: every
    snapshot restores (as a copy, the original running on) exactly the generation
    the original had when it was taken; the listing shows one full snapshot and
    then small increments, each child of the one before."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    store = e2e.path("store")
    taken: list[tuple[str, int, int]] = []  # (id, generation, pages the generation kept)
    for g in range(6):
        kept = next_gen(w, pid, g) if g else SNAPGEN_PAGES
        sid, res = snap_ok(e2e, pid, store)
        reason = full_reason(res)
        if g == 0:
            assert reason and "first" in reason, f"the first snapshot must say it is full\n{res}"
        else:
            assert reason is None, f"snapshot {g + 1} should be incremental\n{res}"
        taken.append((sid, g, kept))
        rec = tracking_record(store, pid)
        assert rec and rec.get("state") == "clean" and rec.get("last") == sid, (
            f"after snapshot {sid} the tracking record should be clean and name it: {rec}"
        )
        assert len(uffd_fds(pid)) == 1, (
            f"the target should hold one tracking uffd: {fd_listing(pid)}"
        )
    next_gen(w, pid, 6)  # the original moves on past the last snapshot

    snaps = listing(e2e, store)
    assert [s["id"] for s in snaps] == [t[0] for t in taken], json.dumps(snaps, indent=1)
    first = snaps[0]
    assert first["full"] and first["parent"] is None and first["pid"] == pid, first
    assert first["pages_written"] >= SNAPGEN_PAGES, f"a full snapshot holds every page: {first}"
    for prev, s, (sid, g, kept) in zip(snaps, snaps[1:], taken[1:]):
        assert s["pid"] == pid and not s["full"], (
            f"snapshot of generation {g} is not incremental: {s}"
        )
        assert s["reason"] == "incremental", s
        assert s["parent"] == prev["id"], f"{sid}: parent {s['parent']}, want {prev['id']}"
        assert s["layers"] > prev["layers"], f"an increment adds layers: {prev} -> {s}"
        assert kept <= s["pages_written"] <= kept + IDLE_SLACK, (
            f"generation {g} wrote {kept} pages, snapshot {sid} holds {s['pages_written']} "
            f"(the full one {first['pages_written']}): the increment must hold every written "
            f"page and little else"
        )
        assert s["pages_written"] * 8 < first["pages_written"], s
    verify_deep(e2e, store, "after six snapshots")

    order = list(range(len(taken)))
    random.Random(7).shuffle(order)  # not only newest-first: any snapshot, any order
    for i in order:
        sid, g, _ = taken[i]
        v = restore_copy(e2e, w, store, sid, pid)
        assert_gen(v, g, sid)
        assert untraced_running(pid), "the original must keep running while copies are restored"
    finish_original(e2e, w, pid, 6)


def test_writer_steps_each_snapshot_restores_its_instant(e2e):
    """The writer's structural mutations (new, moved, re-created, PROT_NONE and
    DONTNEED'd mappings, a THP written and split, shared memory) applied one step
    between each two snapshots: each snapshot restores with exactly the steps and
    page-write count the original had when it was taken."""
    w = e2e.spawn("writer", "mib=8", "rate=0", "steps=1", "ballast=1", "report=0.05", timeout=120)
    pid = w.pid
    store = e2e.path("store")

    def written_now(k: int, start: int) -> int:
        # rate=0: the count changes only in a step; a RATE line after STEP k has it
        _, f = wait_line(w, start, "RATE", pid, lambda _w, f: f.get("steps") == str(k))
        return int(f["total"])

    taken: list[tuple[str, int, int]] = []  # (id, steps, written)
    for k in range(6):
        start = log_len(w)
        if k:
            os.kill(pid, signal.SIGUSR1)
            done = [str(k), "DONE"]
            wait_line(w, start, "STEP", pid, lambda words, _f, done=done: words[1:3] == done)
        total = written_now(k, start)
        sid, res = snap_ok(e2e, pid, store)
        assert (full_reason(res) is not None) == (k == 0), f"step {k}\n{res}"
        taken.append((sid, k, total))
    os.kill(pid, signal.SIGUSR1)  # the original moves on (step 6)

    snaps = listing(e2e, store)
    assert [s["id"] for s in snaps] == [t[0] for t in taken]
    assert snaps[0]["full"] and snaps[0]["parent"] is None
    for prev, s in itertools.pairwise(snaps):
        assert not s["full"] and s["parent"] == prev["id"], s
        assert s["pages_written"] * 2 < snaps[0]["pages_written"], (
            f"an increment should be far below the full snapshot: {s} vs {snaps[0]}"
        )
    verify_deep(e2e, store, "after the writer's steps")
    for sid, k, total in taken:
        v = restore_copy(e2e, w, store, sid, pid)
        assert v.fields.get("steps") == str(k) and v.fields.get("written") == str(total), (
            f"snapshot {sid} was taken after step {k} with {total} pages written; the copy "
            f"says {v.line}"
        )
    v = verify_after(e2e, w, pid, 0)
    assert v.ok and v.fields.get("steps") == "6", v.line
    assert w.reap() == 0


# ---------------------------------------------------------------- 2. tracking lost


def _replace(e2e: E2E, w: Workload, store: Path, pid: int, how: str) -> int:
    """Make pid lose ckpt's tracking; return snapgen's generation afterwards."""
    start = log_len(w)
    st0 = starttime(pid)
    if how == "exec":
        os.kill(pid, signal.SIGURG)
        _, f = wait_line(w, start, "EXECED", pid)
        assert starttime(pid) == st0, "exec keeps the process (same start time)"
        return int(f["gen"])
    if how == "close_range":
        os.kill(pid, signal.SIGHUP)
        _, f = wait_line(w, start, "CLOSED", pid)
        assert int(f["fds"]) >= 1 and f["left"] == "0", f"close_range did not close the uffd: {f}"
        return 1
    # a new process under the same PID
    os.kill(pid, signal.SIGKILL)
    assert w.reap() == -signal.SIGKILL
    if how == "restore":
        # the store's latest snapshot (generation 1), restored at its own PID
        res = e2e.ckpt("restore", "--store", str(store), "--detach")
        assert res.returncode == 0, str(res)
        gen = 1
    else:  # set_tid: a fresh snapgen at generation 0
        argv = [str(e2e.bins["respawn"]), str(pid), *w.popen.args]
        with open(w.log, "ab") as out:
            r = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=w.cwd, timeout=DEADLINE, check=False,
            )  # fmt: skip
        e2e.adopt(pid)
        assert r.returncode == 0, "respawn failed:\n" + "\n".join(w.lines()[start:])
        wait_line(w, start, "READY", pid)
        gen = 0
    e2e.wait_restored(pid, w.ident)
    assert starttime(pid) != st0, "a new process under the same PID has a new start time"
    return gen


@pytest.mark.parametrize("how", ["exec", "close_range", "restore", "set_tid"])
def test_lost_tracking_means_full_snapshot(e2e, how):
    """After the process exec'd (same PID and start time; the tracking fd is
    close-on-exec), closed its fds (close_range), or was replaced by a new process
    under the same PID (restored from the store, or a fresh one via clone3 set_tid),
    the next snapshot is full and says why (stderr and the listing), restores
    exactly, and the one after it is incremental again."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    store = e2e.path("store")
    s1, _ = snap_ok(e2e, pid, store)
    next_gen(w, pid, 1)
    s2, res = snap_ok(e2e, pid, store)
    assert full_reason(res) is None, str(res)

    g = _replace(e2e, w, store, pid, how)
    assert not uffd_fds(pid), f"{how}: the process should no longer hold the tracking uffd"
    g += 1
    next_gen(w, pid, g)
    s3, res = snap_ok(e2e, pid, store)
    reason = full_reason(res)
    assert reason, f"after {how} the next snapshot must be full (and say so on stderr)\n{res}"
    want = "restarted" if how in ("restore", "set_tid") else "tracking"
    assert want in reason, f"after {how} the reason should mention {want!r}: {reason!r}"
    g += 1
    kept = next_gen(w, pid, g)
    s4, res = snap_ok(e2e, pid, store)
    assert full_reason(res) is None, f"tracking should be armed again after a full snapshot\n{res}"

    snaps = by_id(listing(e2e, store))
    assert list(snaps) == [s1, s2, s3, s4]
    assert snaps[s3]["full"] and snaps[s3]["reason"] == reason, snaps[s3]
    assert snaps[s3]["parent"] is None, f"a full snapshot has no parent: {snaps[s3]}"
    assert snaps[s3]["pages_written"] >= SNAPGEN_PAGES, snaps[s3]
    assert not snaps[s4]["full"] and snaps[s4]["parent"] == s3, snaps[s4]
    assert snaps[s4]["pages_written"] <= kept + IDLE_SLACK, snaps[s4]
    verify_deep(e2e, store, f"after {how}")
    restore_gen(e2e, w, store, s3, pid, g - 1, f"(full, after {how})")
    restore_gen(e2e, w, store, s4, pid, g, f"(after {how})")
    finish_original(e2e, w, pid, g, ours=how in ("exec", "close_range"))


def test_dump_then_restore_at_same_pid(e2e):
    """A snapshotted process checkpointed with plain `ckpt dump` (which kills it) and
    restored at its PID: a new process under the same PID, so the next snapshot is
    full ("restarted") and restores exactly. The dump must not trip over ckpt's own
    tracking uffd in the target (docs/SNAPSHOTS.md: it is ckpt's, not the process's)."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    store = e2e.path("store")
    snap_ok(e2e, pid, store)
    next_gen(w, pid, 1)
    snap_ok(e2e, pid, store)
    st0 = starttime(pid)
    image = e2e.path("img")
    res = e2e.dump(pid, image)
    assert res.returncode == 0, (
        f"`ckpt dump` of a process with snapshot tracking fails (fds {fd_listing(pid)})\n{res}"
    )
    assert w.reap() == -signal.SIGKILL
    res = e2e.ckpt("restore", "-D", str(image), "--detach")
    assert res.returncode == 0, str(res)
    e2e.wait_restored(pid, w.ident)
    assert starttime(pid) != st0
    assert not uffd_fds(pid), "a restored process must not hold ckpt's tracking uffd"
    next_gen(w, pid, 2)
    s3, res = snap_ok(e2e, pid, store)
    assert full_reason(res) and "restarted" in full_reason(res), str(res)
    restore_gen(e2e, w, store, s3, pid, 2, "(after dump + restore)")
    finish_original(e2e, w, pid, 2, ours=False)


# ---------------------------------------------------------------- 3. killed snapshot runs


def _after_kill_checks(
    e2e: E2E, w: Workload, store: Path, pid: int, sig_before: dict, before: list[str], what: str
) -> list[dict]:
    """What a killed snapshot run must leave: a target running untraced with its
    signal state, a store that verifies, and only complete snapshots listed."""
    wait_until(lambda: untraced_running(pid), 15, f"the target to run untraced ({what})")
    assert signal_state(pid) == sig_before, f"signal mask/dispositions changed ({what})"
    verify_deep(e2e, store, what)
    snaps = listing(e2e, store)
    ids = [s["id"] for s in snaps]
    assert ids[: len(before)] == before and len(ids) <= len(before) + 1, (
        f"snapshots before: {before}, after ({what}): {ids}"
    )
    assert all(s.get("error") is None for s in snaps), f"a damaged snapshot is listed ({what})"
    return snaps


def _next_must_be_full(e2e, w, store, pid, g: int, what: str) -> str:
    """The snapshot after a killed run: full, complete, tmp/ cleaned, no leaked
    uffd in the target, and restores generation g exactly."""
    sid, res = snap_ok(e2e, pid, store)
    reason = full_reason(res)
    assert reason, f"the snapshot after a run {what} must be full\n{res}"
    latest = listing(e2e, store)[-1]
    assert latest["id"] == sid and latest["full"] and latest["parent"] is None, latest
    assert tmp_entries(store) == [], f"tmp/ not cleaned by the next run: {tmp_entries(store)}"
    assert len(uffd_fds(pid)) == 1, f"uffds left in the target ({what}): {fd_listing(pid)}"
    restore_gen(e2e, w, store, sid, pid, g, f"(snapshot after a run {what})")
    return sid


@pytest.mark.parametrize("point", ["seized", "armed", "round", "read-pages", "commit"])
def test_snapshot_killed_at_fault_point(e2e, point):
    """`ckpt snapshot` SIGKILLs itself at a fault point (CKPT_FAULT) in a run that
    would have been incremental (for `seized`, which only a run that arms tracking
    reaches: after the process closed its tracking fd). The store verifies, no partial
    snapshot is listed, the target runs on untraced with its signal state, the
    tracking record says dirty, and the next snapshot is full and restores exactly."""
    # background writes into a scratch region (checked by the workload's own model)
    # so that every round, and the frozen final one, has pages to copy
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS, "rate=400")
    pid = w.pid
    store = e2e.path("store")
    s1, _ = snap_ok(e2e, pid, store)
    next_gen(w, pid, 1)
    if point == "seized":
        start = log_len(w)
        os.kill(pid, signal.SIGHUP)  # close_range: the next run must arm a new uffd
        wait_line(w, start, "CLOSED", pid)
    rec_before = tracking_record(store, pid)
    sig_before = signal_state(pid)
    what = f"killed at {point}"
    res = snapshot(e2e, pid, store, env=e2e.env(CKPT_FAULT=point))
    assert res.returncode == -signal.SIGKILL, f"ckpt did not stop at {point!r}\n{res}"
    snaps = _after_kill_checks(e2e, w, store, pid, sig_before, [s1], what)
    assert [s["id"] for s in snaps] == [s1], f"a snapshot {what} is listed: {snaps}"
    rec = tracking_record(store, pid)
    if point == "seized":
        assert rec == rec_before, f"nothing was armed yet: the record must be untouched: {rec}"
    else:
        assert rec and rec.get("state") == "dirty", f"{what}: the tracking record is {rec}"
    next_gen(w, pid, 2)
    _next_must_be_full(e2e, w, store, pid, 2, what)
    finish_original(e2e, w, pid, 2)


def test_snapshot_killed_at_random_moments(e2e):
    """SIGKILL `ckpt snapshot` at random moments of runs (made longer by a round hook
    that naps), several times on one store: after each, the same guarantees; a
    snapshot that made it into the listing is complete and restores exactly; the next
    snapshot is full unless the tracking record is clean and names the latest
    snapshot (the killed run finished, or had not armed anything yet)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS, "rate=400")
    pid = w.pid
    store = e2e.path("store")
    hook = Hook(e2e, w, nap=0.15)
    env = dump_env(e2e, hook)
    s1, _ = snap_ok(e2e, pid, store, env=env)
    g = 1
    next_gen(w, pid, g)
    t = time.monotonic()
    sid, _ = snap_ok(e2e, pid, store, env=env)
    full_run = time.monotonic() - t
    gens = {s1: 0, sid: 1}
    for i in range(4):
        g += 1
        next_gen(w, pid, g)
        before = [s["id"] for s in listing(e2e, store)]
        sig_before = signal_state(pid)
        delay = full_run * rng.uniform(0.15, 1.1)
        what = f"killed after {delay:.2f}s of a {full_run:.2f}s run (kill {i}, seed {seed})"
        bg = e2e.ckpt_bg("snapshot", str(pid), "--store", str(store), env=env)
        time.sleep(delay)
        bg.kill()
        rc = bg.result().returncode
        assert rc in (0, -signal.SIGKILL), f"{what}\n{bg.result()}"
        snaps = _after_kill_checks(e2e, w, store, pid, sig_before, before, what)
        if rc == 0:
            assert len(snaps) == len(before) + 1, f"ckpt finished but listed nothing ({what})"
        for s in snaps[len(before) :]:
            gens[s["id"]] = g
            restore_gen(e2e, w, store, s["id"], pid, g, f"({what})")
        rec = tracking_record(store, pid)
        trusted = bool(rec) and rec.get("state") == "clean" and rec.get("last") == snaps[-1]["id"]
        g += 1
        next_gen(w, pid, g)
        if trusted:
            nid, res = snap_ok(e2e, pid, store, env=env)
            assert full_reason(res) is None, f"clean record, yet full ({what})\n{res}"
            restore_gen(e2e, w, store, nid, pid, g, f"(after a run {what})")
        else:
            nid = _next_must_be_full(e2e, w, store, pid, g, what)
        gens[nid] = g
    verify_deep(e2e, store, f"after all kills (seed {seed})")
    assert [s["id"] for s in listing(e2e, store)] == list(gens), f"seed {seed}"
    finish_original(e2e, w, pid, g)


# ---------------------------------------------------------------- 4. concurrency


def _holds_open(pid: int, path: Path) -> bool:
    try:
        return str(path) in fd_listing(pid).values()
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_concurrent_snapshot_is_busy_or_waits(e2e):
    """While one `ckpt snapshot` runs (held mid-run by a round hook), a second one on
    the same store fails with exit 14 "busy" (and so does gc); one with --wait waits
    for the first and then succeeds, incrementally after it. The store verifies."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS, "rate=200")
    pid = w.pid
    store = e2e.path("store")
    s1, _ = snap_ok(e2e, pid, store)
    holding, release = threading.Event(), threading.Event()

    def hold(_round: int, _pid: int) -> None:
        """After a round: keep the snapshot (and its store lock) until released."""
        holding.set()
        release.wait(120)

    env = e2e.env(**RoundHook(e2e, hold).env())
    a = e2e.ckpt_bg("snapshot", str(pid), "--store", str(store), env=env)
    try:
        wait_until(lambda: holding.is_set() or a.poll() is not None, what="the hold")
        assert a.poll() is None, f"the first snapshot ended before its hook ran\n{a.result()}"
        b = snapshot(e2e, pid, store)
        assert_error(b, 14, "busy")
        g = e2e.ckpt("gc", str(store), "--keep-last", "1")
        assert_error(g, 14, "busy")
        c = e2e.ckpt_bg("snapshot", str(pid), "--store", str(store), "--wait", "120")
        lock = store / "lock"
        wait_until(lambda: _holds_open(c.pid, lock) or c.poll() is not None, what="--wait to block")
        assert c.poll() is None, f"--wait did not wait for the busy store\n{c.result()}"
    finally:
        release.set()
    ra = a.wait()
    assert ra.returncode == 0, str(ra)
    rc = c.wait()
    assert rc.returncode == 0, str(rc)
    sa, sc = ra.stdout.strip(), rc.stdout.strip()
    snaps = listing(e2e, store)
    assert [s["id"] for s in snaps] == [s1, sa, sc], snaps
    assert not snaps[1]["full"] and snaps[1]["parent"] == s1, snaps[1]
    assert not snaps[2]["full"] and snaps[2]["parent"] == sa, snaps[2]
    verify_deep(e2e, store, "after concurrent snapshots")
    restore_gen(e2e, w, store, sc, pid, 0)
    finish_original(e2e, w, pid, 0)


def test_simultaneous_snapshots_race(e2e):
    """Two `ckpt snapshot` runs started at the same instant, several times: each
    either succeeds or fails with exit 14 (never anything else), at least one
    succeeds, every success is listed, and the store verifies."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS, "rate=200")
    pid = w.pid
    store = e2e.path("store")
    snap_ok(e2e, pid, store)
    ok_ids = []
    for i in range(3):
        runs = [e2e.ckpt_bg("snapshot", str(pid), "--store", str(store)) for _ in range(2)]
        results = [r.wait() for r in runs]
        wins = [r for r in results if r.returncode == 0]
        assert wins, "both simultaneous snapshots failed:\n" + "\n".join(map(str, results))
        for r in results:
            if r.returncode != 0:
                assert r.returncode == 14, (
                    f"the loser of two simultaneous snapshot runs must see a busy store "
                    f"(exit 14), whatever the winner is doing to the target:\n{r}"
                )
                assert_error(r, 14, "busy")
        ok_ids += [r.stdout.strip() for r in wins]
        verify_deep(e2e, store, f"race {i}")
    snaps = listing(e2e, store)
    assert [s["id"] for s in snaps[1:]] == sorted(ok_ids), snaps
    for prev, s in itertools.pairwise(snaps):
        assert not s["full"] and s["parent"] == prev["id"], s
    restore_gen(e2e, w, store, snaps[-1]["id"], pid, 0)
    finish_original(e2e, w, pid, 0)


def _stop_while_tracing(target: int, tracer: int, deadline: float) -> bool:
    """Poll target's TracerPid tightly; the moment `tracer` (a ckpt run) traces it,
    SIGSTOP the tracer. True if it is stopped while still tracing; False if it
    exited first (a freeze lasts milliseconds: the caller retries with a new run)."""
    status = f"/proc/{target}/status"
    needle = f"TracerPid:\t{tracer}\n"
    while time.monotonic() < deadline:
        try:
            with open(status) as f:
                traced = needle in f.read()
        except FileNotFoundError:
            return False
        if traced:
            os.kill(tracer, signal.SIGSTOP)
            wait_until(lambda: (proc_status(tracer) or {}).get("State", "T")[:1] in "TZ")
            if (proc_status(target) or {}).get("TracerPid") == str(tracer):
                return True
            os.kill(tracer, signal.SIGCONT)  # it detached in between: wait for the next freeze
        elif not proc_alive(tracer):
            return False
    return False


def test_snapshot_waits_while_another_has_the_target_frozen(e2e):
    """A second `ckpt snapshot` of the same process into the same store, started
    while the first one has the target frozen (ptrace-stopped: the first run is
    SIGSTOPped at that moment by the test), is a busy store like any other: exit 14
    without --wait, and with --wait it waits and then succeeds, rather than failing
    because the target is traced (by the very run that holds the store)."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS, "rate=200")
    pid = w.pid
    store = e2e.path("store")
    snap_ok(e2e, pid, store)
    end = time.monotonic() + 120
    a = None
    for _ in range(20):
        run = e2e.ckpt_bg("snapshot", str(pid), "--store", str(store))
        if _stop_while_tracing(pid, run.pid, end):
            a = run
            break
        assert run.wait().returncode == 0, str(run.result())
    if a is None:
        pytest.skip("never caught a snapshot run while it had the target frozen")
    try:
        b = snapshot(e2e, pid, store)
        c = e2e.ckpt_bg("snapshot", str(pid), "--store", str(store), "--wait", "120")
        wait_until(
            lambda: _holds_open(c.pid, store / "lock") or c.poll() is not None,
            what="--wait to block",
        )
        waited = c.poll() is None
        both = f"without --wait: {b}\nwith --wait 120: " + (
            "waiting" if waited else str(c.result())
        )
        assert b.returncode == 14 and waited, (
            f"snapshot runs started while another run of the same store has the target "
            f"frozen must see a busy store (14, or wait with --wait):\n{both}"
        )
        assert_error(b, 14, "busy")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra, rc = a.wait(), c.wait()
    assert ra.returncode == 0, str(ra)
    assert rc.returncode == 0, str(rc)
    snaps = listing(e2e, store)
    assert [s["id"] for s in snaps[-2:]] == [ra.stdout.strip(), rc.stdout.strip()], snaps
    verify_deep(e2e, store, "after a run waited for a frozen one")
    wait_until(lambda: untraced_running(pid), 15, "the target to run untraced")
    restore_gen(e2e, w, store, rc.stdout.strip(), pid, 0)
    finish_original(e2e, w, pid, 0)


# ---------------------------------------------------------------- 5. first snapshot, restore beside


def test_first_snapshot_restored_beside_running_original(e2e):
    """The first snapshot of a process in a store restores as a copy while the
    original runs (--new-pid); without --new-pid the restore fails with exit 9 and
    leaves no process behind; the original runs on unharmed."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    next_gen(w, pid, 1)
    store = e2e.path("store")
    sid, res = snap_ok(e2e, pid, store)
    assert full_reason(res) and "first" in full_reason(res), str(res)
    next_gen(w, pid, 2)
    restore_gen(e2e, w, store, sid, pid, 1)
    res = e2e.ckpt("restore", "--store", str(store), "--at", sid)
    assert_error(res, 9, str(pid))
    assert copies(w.ident) == [pid], f"a failed restore left a process: {copies(w.ident)}"
    assert untraced_running(pid)
    finish_original(e2e, w, pid, 2)


# ---------------------------------------------------------------- other ckpt runs on a tracked process


def test_iterative_dump_between_snapshots_does_not_hide_writes(e2e):
    """`ckpt dump --iterative --leave-running` of a process with snapshot tracking
    (whether the dump succeeds or not) must not make the next snapshot miss the
    writes made since the previous one: the next snapshot, full or incremental,
    restores the generation the process had when it was taken."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    store = e2e.path("store")
    snap_ok(e2e, pid, store)
    next_gen(w, pid, 1)
    image = e2e.path("img")
    dres = e2e.ckpt("dump", "--iterative", "--leave-running", str(pid), "-D", str(image))
    wait_until(lambda: untraced_running(pid), 15, "the target to run on after the dump")
    sid, _ = snap_ok(e2e, pid, store)
    snaps = by_id(listing(e2e, store))
    restore_gen(
        e2e, w, store, sid, pid, 1,
        f"({'a full' if snaps[sid]['full'] else 'an incremental'} snapshot after `ckpt dump "
        f"--iterative --leave-running`, which exited {dres.returncode}: {dres.stderr.strip()!r})",
    )  # fmt: skip
    finish_original(e2e, w, pid, 1)


def test_one_process_two_stores(e2e):
    """Snapshots of one process into a second store: the first store's snapshots keep
    working and stay exact; a failed attempt leaves the target as it was."""
    w = e2e.spawn("snapgen", *SNAPGEN_ARGS)
    pid = w.pid
    s_a, s_b = e2e.path("storeA"), e2e.path("storeB")
    snap_ok(e2e, pid, s_a)
    fds_before = fd_listing(pid)
    next_gen(w, pid, 1)
    rb = snapshot(e2e, pid, s_b)
    if rb.returncode != 0:
        assert "Traceback" not in rb.stderr, str(rb)
        assert fd_listing(pid) == fds_before, (
            f"a failed snapshot into a second store left fds in the target: "
            f"{fds_before} -> {fd_listing(pid)}\n{rb}"
        )
    next_gen(w, pid, 2)
    sa2, ra = snap_ok(e2e, pid, s_a)
    kind = "a full" if full_reason(ra) else "an incremental"
    restore_gen(
        e2e, w, s_a, sa2, pid, 2,
        f"({kind} snapshot into store A after one into store B, which exited "
        f"{rb.returncode}: {rb.stderr.strip()!r})",
    )  # fmt: skip
    if rb.returncode == 0:
        sb = rb.stdout.strip()
        restore_gen(e2e, w, s_b, sb, pid, 1, "(store B)")
        next_gen(w, pid, 3)
        sb2, _ = snap_ok(e2e, pid, s_b)
        restore_gen(e2e, w, s_b, sb2, pid, 3, "(store B again)")
        finish_original(e2e, w, pid, 3)
    else:
        finish_original(e2e, w, pid, 2)


def ident_of(pid: int) -> Ident:
    return Ident(
        read_bytes(f"/proc/{pid}/cmdline") or b"",
        read_link(f"/proc/{pid}/exe") or "",
        read_link(f"/proc/{pid}/cwd") or "",
    )


def test_tree_descendants_tracked_between_snapshots(e2e):
    """A parent whose child has a numbered memory history (snapgen): the child is
    tracked between runs like the root (its own uffd and record), so later snapshots
    hold only what it wrote since; restored as copies, each snapshot's child has
    exactly the generation it had when the snapshot was taken."""
    w = e2e.spawn("parentof", str(e2e.bins["snapgen"]), *SNAPGEN_ARGS)
    child = int(w.ready["pid"])  # the READY line is snapgen's
    parent = w.popen.pid
    assert int(Path(f"/proc/{parent}/task/{parent}/children").read_text()) == child
    pident = ident_of(parent)
    store = e2e.path("store")
    taken: list[tuple[str, int, int]] = []
    for g in range(3):
        kept = next_gen(w, child, g) if g else SNAPGEN_PAGES
        sid, res = snap_ok(e2e, parent, store)
        if g:
            assert full_reason(res) is None, f"snapshot {g + 1}: the root is incremental\n{res}"
            assert "copied whole" not in res.stderr, f"the child should be incremental\n{res}"
            rec = tracking_record(store, child)
            assert rec and rec["state"] == "clean" and rec["last"] == sid, rec
        taken.append((sid, g, kept))
    snaps = listing(e2e, store)
    assert snaps[0]["pages_written"] >= SNAPGEN_PAGES
    for s, (sid, g, kept) in zip(snaps[1:], taken[1:]):
        # the root (a small idle parent) and the child's generation: far below a full copy
        assert kept <= s["pages_written"] <= kept + 2 * IDLE_SLACK, (
            f"generation {g} wrote {kept} pages; snapshot {sid} holds {s['pages_written']}"
        )
    for sid, g, _ in taken:
        start = log_len(w)
        bg = e2e.ckpt_bg("restore", "--store", str(store), "--at", sid, "--new-pid")
        root = e2e.find_restored(pident, exclude=parent, bg=bg)
        kids = Path(f"/proc/{root}/task/{root}/children")
        wait_until(lambda kids=kids: kids.read_text().split(), DEADLINE, "the restored child")
        kid = int(kids.read_text().split()[0])
        e2e.adopt(kid)
        os.kill(root, signal.SIGUSR2)  # the parent forwards it to its child
        _, fields = wait_line(w, start, "VERIFY", kid)
        assert fields.get("gen") == str(g), f"snapshot {sid} restored generation {fields}"
        _, done = wait_line(w, start, "PARENT", root)
        assert done["child_status"] == "0", done
        assert bg.wait().returncode == 0


def test_tree_snapshot_killed_then_descendants_copied_whole(e2e):
    """A tree snapshot SIGKILLed at its commit leaves the child's tracking record
    dirty: the next snapshot copies the child whole (and says why), and restores."""
    w = e2e.spawn("parentof", str(e2e.bins["snapgen"]), *SNAPGEN_ARGS)
    child = int(w.ready["pid"])
    parent = w.popen.pid
    store = e2e.path("store")
    snap_ok(e2e, parent, store)
    next_gen(w, child, 1)
    res = snapshot(e2e, parent, store, env=e2e.env(CKPT_FAULT="commit"))
    assert res.returncode == -signal.SIGKILL, str(res)
    rec = tracking_record(store, child)
    assert rec and rec["state"] == "dirty", rec
    next_gen(w, child, 2)
    sid, res = snap_ok(e2e, parent, store)
    assert f"descendant {child} copied whole" in res.stderr, res.stderr
    assert tracking_record(store, child)["state"] == "clean"
    start = log_len(w)
    bg = e2e.ckpt_bg("restore", "--store", str(store), "--at", sid, "--new-pid")
    pident = ident_of(parent)
    root = e2e.find_restored(pident, exclude=parent, bg=bg)
    kids = Path(f"/proc/{root}/task/{root}/children")
    wait_until(lambda: kids.read_text().split(), DEADLINE, "the restored child")
    kid = int(kids.read_text().split()[0])
    e2e.adopt(kid)
    os.kill(root, signal.SIGUSR2)
    _, fields = wait_line(w, start, "VERIFY", kid)
    assert fields.get("gen") == "2", fields
    assert bg.wait().returncode == 0
