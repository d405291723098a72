"""Snapshot stores (ckpt/store): listing, resolve, retention, compaction, crash safety,
concurrency, corruption — on real files.

Most tests build stores without a live process: a FakeProc holds page contents and a
present set, each "snapshot" writes the pages changed since the previous one as a new
layer through the same Store.begin/commit API the snapshot command uses, and
`content()` reads a snapshot back through ImageReader.plan/iter_data, exactly as a
restore does, for comparison with what was written. One test at the end drives the
real `ckpt snapshot` / `ckpt restore --store` against a live workload.

The store CLI is run as `python -m ckpt snapshots|verify|gc|compact ...` once ckpt/cli/
registers those commands, and through `python -m ckpt.store ...` (the same click
commands) until then.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.errors import (
    ImageCorrupt,
    ImageExists,
    ImageNotFound,
    ImageVersionError,
    StoreBusy,
    UsageError,
)
from ckpt.image import ImageReader
from ckpt.store import Store
from ckpt.store import plan as planmod
from ckpt.store.chain import present_runs

P = 4096
BASE = 0x7F0000000000


STORE_CLI = [sys.executable, "-m", "ckpt"]
T0 = 1_790_000_000.0  # 2026-09-21, fixed so hour/day buckets are reproducible


# ---------------------------------------------------------------- a fake process


class FakeProc:
    """Memory as the store sees it: page → content (b"" = zero page) and the present set."""

    def __init__(self, rng: random.Random, npages: int, pid: int):
        self.rng = rng
        self.pid = pid
        self.npages = npages
        self.version = 0
        self.mem: dict[int, bytes] = {}
        self.present: set[int] = set(range(npages))
        for p in range(npages):
            self.mem[p] = self._page(p)

    def _page(self, p: int) -> bytes:
        if self.rng.random() < 0.05:
            return b""  # a zero page: recorded as a zero run, never stored
        # half compressible, half random: exercises both zstd paths, cheaply
        head = struct.pack("<QQ", p, self.version) * 128
        return head + self.rng.randbytes(P // 2)

    def step(self, nwrite: int, ndrop: int = 1, nback: int = 1) -> set[int]:
        """Mutate like a process would; return the pages a tracker would report."""
        self.version += 1
        pages = range(self.npages)
        written = set(self.rng.sample(pages, nwrite))
        gone = set(self.rng.sample(pages, ndrop))  # MADV_DONTNEED: no longer present
        back = set(self.rng.sample(pages, nback)) - self.present  # faulted in again
        self.present -= gone
        self.present |= back
        written = (written | back) - gone
        for p in written:
            self.mem[p] = self._page(p)
        return written

    def state(self) -> dict:
        """A whole process state (verify checks it as restore does: ckpt/schema.py)."""
        present = [[BASE + s * P, n] for s, n in runs(self.present)]
        return fake_state(self.pid, BASE, BASE + self.npages * P, present)

    def content(self) -> dict[int, bytes]:
        return {p: self.mem[p] for p in self.present}


def fake_state(pid: int, start: int, end: int, present: list[list[int]]) -> dict:
    """A minimal but valid process state: one thread, one anonymous mapping."""
    from ckpt.kernel.ptrace import REG_NAMES
    from ckpt.model import MmFields, ProcessImage, Thread, Vma

    vma = Vma(start=start, end=end, prot=3, shared=False, kind="anon", name="", present=present)
    thread = Thread(
        tid=pid, regs=dict.fromkeys(REG_NAMES, 0), xstate=b"", sigmask=0, pending=[],
        sigaltstack=[0, 2, 0], rseq=None, robust_list=[0, 0], clear_child_tid=0,
    )  # fmt: skip
    mm = MmFields(*[0] * 11, auxv=b"", exe=None)
    return ProcessImage(
        pid=pid, ppid=1, pgid=pid, sid=pid, comm=b"fake", cmdline=b"fake", exe="/bin/fake",
        cwd="/", umask=0o22, personality=0, uids=[0] * 4, gids=[0] * 4, groups=[], rlimits={},
        mm=mm, vmas=[vma], fds=[], sigactions=[], shared_pending=[], itimers=[],
        posix_timers=[], threads=[thread],
    ).to_dict()  # fmt: skip


def runs(pages) -> list[list[int]]:
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return out


def take_snapshot(store: Store, proc: FakeProc, written, t: float, rounds: int = 1):
    """One snapshot through the store API: `rounds` layers, like a pre-copy."""
    with store.lock():
        parent = None if written is None else store.latest(proc.pid)
        w = store.begin(parent)
        pages = sorted(set(range(proc.npages)) if written is None else written)
        pages = [p for p in pages if p in proc.present]
        parts = [pages[i::rounds] for i in range(rounds)]
        for part in parts:
            lw = w.begin_layer()
            for s, n in runs(part):
                data = b"".join(proc.mem[q] or bytes(P) for q in range(s, s + n))
                lw.add_run(BASE + s * P, data)
            lw.close()
        meta = {"pid": proc.pid, "time": t, "freeze_ms": 1.5, "reason": "test"}
        return store.commit(w, proc.state(), meta)


def content(path: str) -> dict[int, bytes]:
    """A snapshot's memory, read the way restore reads it (plan + iter_data + zero runs)."""
    out: dict[int, bytes] = {}
    with ImageReader(path) as r:
        plan = r.plan(present_runs(r.state))
        for vaddr, data in r.iter_data(plan):
            for i in range(len(data) // P):
                out[(vaddr - BASE) // P + i] = bytes(data[i * P : (i + 1) * P])
        for vaddr, n in plan.zero:
            for i in range(n):
                out[(vaddr - BASE) // P + i] = b""
    return {p: (b"" if d == bytes(P) else d) for p, d in out.items()}


def build_store(root: Path, n: int, npages: int, nwrite: int, interval: float, seed: int = 1):
    """n snapshots of pid 7 (every interval s), plus a second process (pid 8) snapshotted
    at three points in between: two lineages interleaved. Returns {id: content}."""
    store = Store.open(root, create=True)
    rng = random.Random(seed)
    a = FakeProc(rng, npages, 7)
    b = FakeProc(rng, npages // 4, 8)
    expected: dict[str, dict[int, bytes]] = {}
    first_b = True
    for k in range(n):
        t = T0 + k * interval
        written = None if k == 0 else a.step(nwrite)
        info = take_snapshot(store, a, written, t, rounds=1 + k % 3)
        expected[info.id] = a.content()
        if k in (10, 20, 30):
            wb = None if first_b else b.step(nwrite // 4)
            first_b = False
            info = take_snapshot(store, b, wb, t + 1)
            expected[info.id] = b.content()
    return store, expected, a


def assert_contents(store: Store, expected: dict[str, dict[int, bytes]], ids=None) -> None:
    for s in store.snapshots():
        if ids is None or s.id in ids:
            assert content(s.path) == expected[s.id], f"snapshot {s.id} reads back wrong"


def copy_store(src: Path, dst: Path) -> Store:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps hard links
    return Store.open(dst)


def store_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.pop("CKPT_FAULT", None)
    e.update(env or {})
    return subprocess.run(
        STORE_CLI + [str(a) for a in args],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(res, code: int, *needles: str) -> str:
    assert res.returncode == code, f"exit {res.returncode}, want {code}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("ckpt: error:")]
    assert len(errors) == 1, res.stderr
    for n in needles:
        assert n.lower() in errors[0].lower(), f"{n!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """50 snapshots of pid 7 (every 47 min: crosses days) + 3 of pid 8; built once."""
    root = tmp_path_factory.mktemp("pristine") / "S"
    _, expected, proc = build_store(root, n=50, npages=512, nwrite=8, interval=47 * 60)
    return root, expected, proc


# ---------------------------------------------------------------- opening, listing, resolve


def test_open_errors(tmp_path):
    with pytest.raises(ImageNotFound, match="no such snapshot store"):
        Store.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x").write_text("x")
    with pytest.raises(ImageNotFound, match="not a snapshot store"):
        Store.open(tmp_path / "plain")
    with pytest.raises(ImageExists):
        Store.open(tmp_path / "plain", create=True)
    s = Store.open(tmp_path / "new", create=True)
    marker = Path(s.root) / "store.json"
    obj = json.loads(marker.read_text())
    assert obj["format"] == "ckpt-store" and obj["version"][0] == 1
    obj["version"] = [2, 0]
    marker.write_text(json.dumps(obj))
    with pytest.raises(ImageVersionError, match=r"2\.0"):
        Store.open(s.root)


def test_concurrent_create(tmp_path):
    """Two first snapshots at once (cron) both open the store they create."""
    code = f"from ckpt.store import Store; Store.open({str(tmp_path / 'S')!r}, create=True)"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    assert Store.open(tmp_path / "S").snapshots() == []


def test_listing_and_resolve(pristine):
    root, _, _ = pristine
    store = Store.open(root)
    snaps = store.snapshots()
    assert len(snaps) == 53 and [s.seq for s in snaps] == list(range(1, 54))
    assert [s.id for s in snaps] == sorted(s.id for s in snaps)  # time-first ids sort too
    a = [s for s in snaps if s.pid == 7]
    b = store.snapshots(pid=8)
    assert len(a) == 50 and len(b) == 3
    assert a[0].full and a[0].parent is None and a[0].layers == 1
    assert not a[1].full and a[1].parent == a[0].id and a[1].layers == 3  # 1 + 2 rounds
    assert b[1].parent == b[0].id and b[0].full
    assert a[5].pages_written > 0 and a[5].bytes > 0 and a[5].freeze_ms == 1.5
    assert store.latest().id == a[-1].id and store.latest(8).id == b[-1].id

    assert store.resolve(None).id == a[-1].id
    assert store.resolve(a[7].id) == a[7]
    assert store.resolve(a[7].id[:-1]) == a[7]  # a unique prefix
    with pytest.raises(UsageError, match="ambiguous"):
        store.resolve(a[7].id[:8])  # the date alone matches many
    with pytest.raises(ImageNotFound, match="no snapshot"):
        store.resolve("19990101T000000Z-9999")
    # a time: the newest snapshot at or before it
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a[9].time + 60))
    assert store.resolve(iso) == a[9]
    assert store.resolve(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a[9].time))) == a[9]
    with pytest.raises(ImageNotFound, match="at or before"):
        store.resolve("2000-01-01T00:00:00Z")
    with pytest.raises(UsageError):
        store.resolve("2026-13-45T99:00")


def test_resolve_relative_time(tmp_path):
    store = Store.open(tmp_path / "S", create=True)
    proc = FakeProc(random.Random(3), 64, 7)
    now = time.time()
    ids = []
    for k, ago in enumerate((4 * 3600, 3 * 3600, 2 * 3600, 600)):
        info = take_snapshot(store, proc, None if k == 0 else proc.step(4), now - ago)
        ids.append(info.id)
    assert store.resolve("-90m").id == ids[2]
    assert store.resolve("-2h30m").id == ids[1]
    assert store.resolve("-5m").id == ids[3]
    with pytest.raises(ImageNotFound, match="at or before"):
        store.resolve("-1d")


def test_snapshots_cli_json_and_table(pristine):
    root, _, _ = pristine
    res = store_cli("snapshots", root, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["snapshots"]) == 53 and out["bytes_on_disk"] > 0
    first = out["snapshots"][0]
    for key in ("id", "time", "pid", "pages_written", "bytes", "freeze_ms", "parent", "layers"):
        assert key in first
    res = store_cli("snapshots", root, "--pid", "8")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "TIME", "PID"] and len(lines) == 4
    assert "3 snapshot(s)" in res.stderr
    one_error_line(store_cli("snapshots", root / "nope"), 8, "no such snapshot store")


def test_tracking_records(tmp_path):
    store = Store.open(tmp_path / "S", create=True)
    assert store.tracking_get(42) is None
    with pytest.raises(RuntimeError, match="lock"):
        store.tracking_put(42, {"fd": 3})
    with store.lock():
        store.tracking_put(42, {"fd": 3, "last": "x"})
        store.tracking_put(42, {"fd": 4, "last": "y"})
    assert store.tracking_get(42) == {"fd": 4, "last": "y"}
    assert store.tracked_pids() == [42]
    (Path(store.root) / "tracking" / "43.json").write_text("{broken")
    assert store.tracking_get(43) is None  # unreadable → treated as absent (full snapshot)
    with store.lock():
        store.tracking_drop(42)
        store.tracking_drop(42)
    assert store.tracking_get(42) is None


def test_killed_snapshot_leaves_nothing_visible(tmp_path):
    """A snapshot killed before commit leaves only tmp/ garbage, removed by the next lock."""
    root = tmp_path / "S"
    store = Store.open(root, create=True)
    proc = FakeProc(random.Random(5), 64, 7)
    take_snapshot(store, proc, None, T0)
    code = (
        f"import os; from ckpt.store import Store; s = Store.open({str(root)!r})\n"
        "with s.lock():\n"
        "    w = s.begin(s.latest()); lw = w.begin_layer(); lw.add_run(0x1000, os.urandom(8192))\n"
        "    lw.close(); os.kill(os.getpid(), 9)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False)
    assert res.returncode == -signal.SIGKILL
    assert os.listdir(root / "tmp"), "the killed writer should have left its tmp dir"
    assert len(store.snapshots()) == 1
    with store.lock():
        pass  # the exclusive holder cleans up
    assert os.listdir(root / "tmp") == []
    assert store.verify(deep=True).ok


# ---------------------------------------------------------------- retention and compaction


def reference_keep(snaps, keep_last, keep_hourly, keep_daily, tracked=()) -> set[str]:
    """restic's rules, written independently of ckpt/store/retention.py."""
    newest = sorted(snaps, key=lambda s: s.seq, reverse=True)
    keep = {newest[0].id}
    keep |= {s.id for s in newest[:keep_last]}
    for n, fmt in ((keep_hourly, "%Y%m%d%H"), (keep_daily, "%Y%m%d")):
        seen: list[str] = []
        for s in newest:
            bucket = time.strftime(fmt, time.localtime(s.time))
            if bucket not in seen and len(seen) < n:
                seen.append(bucket)
                keep.add(s.id)
    for pid in tracked:
        keep.add(next(s.id for s in newest if s.pid == pid))
    return keep


def test_gc_retention_keeps_exact_set_and_content(pristine, tmp_path):
    root, expected, _ = pristine
    store = copy_store(root, tmp_path / "S")
    before = store.snapshots()
    with store.lock():
        store.tracking_put(8, {"last": before[-1].id})  # pid 8 is still tracked
        rep = store.gc(keep_last=5, keep_hourly=8, keep_daily=3)
    want = reference_keep(before, 5, 8, 3, tracked=[8])
    after = store.snapshots()
    assert {s.id for s in after} == want == set(rep.kept)
    assert set(rep.removed) == {s.id for s in before} - want
    assert 8 <= len(want) < 20  # the policy really removed most
    assert store.latest(8).id == store.snapshots(8)[-1].id  # tracked pid's newest survived
    assert all(s.layers <= 8 for s in after) and rep.max_chain_after <= 8
    assert rep.max_chain_before > 40
    assert_contents(store, expected)
    v = store.verify(deep=True)
    assert v.ok, v.to_json()
    assert os.listdir(Path(store.root) / "tmp") == []
    # a second gc with the same policy has nothing left to do
    with store.lock():
        again = store.gc(keep_last=5, keep_hourly=8, keep_daily=3)
    assert again.removed == [] and again.compacted == [] and again.bytes_written == 0


def test_gc_dry_run_changes_nothing(pristine, tmp_path):
    root, _, _ = pristine
    store = copy_store(root, tmp_path / "S")
    listing = [s.id for s in store.snapshots()]
    res = store_cli("gc", store.root, "--keep-last", "3", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["dry_run"] and len(rep["removed"]) == 50 and rep["compacted"]
    assert [s.id for s in store.snapshots()] == listing
    one_error_line(store_cli("gc", store.root), 2, "retention policy")


def test_compaction_keeps_content_and_shortens_chains(pristine, tmp_path):
    root, expected, _ = pristine
    store = copy_store(root, tmp_path / "S")
    res = store_cli("compact", store.root, "--max-chain", "4", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["removed"] == [] and len(rep["kept"]) == 53
    assert rep["max_chain_before"] >= 90 and rep["max_chain_after"] <= 4
    assert all(s.layers <= 4 for s in store.snapshots())
    assert_contents(store, expected)
    # compaction is a fixpoint: nothing to do the second time
    rep2 = json.loads(store_cli("compact", store.root, "--max-chain", "4", "--json").stdout)
    assert rep2["compacted"] == []
    # snapshots continue from a compacted one, and the next compaction folds them in
    proc = copy.deepcopy(pristine[2])
    expected = dict(expected)
    for k in range(6):
        before = store.latest(7).layers
        info = take_snapshot(store, proc, proc.step(12), T0 + 10**6 + k, rounds=3)
        assert info.layers == before + 3
        expected[info.id] = proc.content()
    with store.lock():
        store.compact(max_chain=4)
    assert all(s.layers <= 4 for s in store.snapshots())
    assert_contents(store, expected)


def test_compaction_drops_dead_pages(tmp_path):
    """Pages rewritten again and again, with only the newest snapshot kept: gc leaves one
    copy of the hot set instead of one per snapshot."""
    store = Store.open(tmp_path / "S", create=True)
    rng = random.Random(9)
    proc = FakeProc(rng, 256, 7)
    take_snapshot(store, proc, None, T0)
    hot = list(range(64))
    expected = {}
    for k in range(30):
        proc.version += 1
        for p in hot:
            proc.mem[p] = proc._page(p)
        info = take_snapshot(store, proc, set(hot) & proc.present, T0 + k + 1)
        expected[info.id] = proc.content()
    with store.lock():
        rep = store.gc(keep_last=1)
    assert rep.bytes_freed > 20 * 64 * P // 2, rep.to_json()  # ~29 dead copies of the hot set
    (only,) = store.snapshots()
    assert content(only.path) == expected[only.id]


# ---------------------------------------------------------------- planner properties


chains_strategy = st.tuples(
    st.integers(1, 60),  # snapshots in the lineage
    st.integers(1, 4),  # rounds (layers) per snapshot
    st.integers(1, 9),  # max_chain
    st.integers(0, 2**32 - 1),  # seed for the kept subset
)


@settings(max_examples=150, deadline=None)
@given(chains_strategy)
def test_plan_preserves_layer_order_and_is_a_fixpoint(args):
    n, rounds, max_chain, seed = args
    rng = random.Random(seed)
    keys: list[planmod.LayerKey] = []
    snaps = []
    for i in range(n):
        for r in range(1 if i == 0 else rounds):
            keys.append(planmod.LayerKey(b"L%d" % len(keys), len(keys), 1 if r == 0 else 0))
        snaps.append(planmod.SnapIn(f"s{i:03d}", tuple(keys)))
    kept = [s for s in snaps[:-1] if rng.random() < 0.5] + [snaps[-1]]
    pl = planmod.plan(kept, max_chain)
    # newest-wins is associative: a chain is valid iff its parts, in order, are exactly
    # the original layers in order (each part = a run of consecutive layers)
    for s in kept:
        flat = [k.ident for part in pl.chains[s.id] for k in part.sources]
        assert flat == [k.ident for k in s.chain]
        assert len(pl.chains[s.id]) <= max(1, max_chain)
    # apply the plan (new layers get new identities), plan again: nothing changes
    realized: dict[tuple[int, int], planmod.LayerKey] = {}
    again = []
    for s in kept:
        chain = []
        for pos, part in enumerate(pl.chains[s.id]):
            key = part.existing_at(pos)
            if key is None:
                key = realized.setdefault(
                    (id(part), pos),
                    planmod.LayerKey(b"N%d.%d" % (id(part), pos), pos, part.weight),
                )
            chain.append(key)
        again.append(planmod.SnapIn(s.id, tuple(chain)))
    assert planmod.plan(again, max_chain).changed == []


def test_plan_cost_is_logarithmic():
    """Compacting 50 one-layer snapshots rewrites each increment a few times, not 50;
    chains that are short enough are left alone."""
    keys = [planmod.LayerKey(b"%d" % i, i) for i in range(50)]
    snaps = [planmod.SnapIn(f"s{i}", tuple(keys[: i + 1])) for i in range(50)]
    pl = planmod.plan(snaps, 8)
    built = {
        (id(p), pos): len(p.sources)
        for sid in pl.changed
        for pos, p in enumerate(pl.chains[sid])
        if p.existing_at(pos) is None
    }
    assert sum(built.values()) < 50 * 3
    assert max(len(c) for c in pl.chains.values()) == 8
    assert pl.changed[0] == "s8"  # the first chain longer than 8
    assert planmod.plan(snaps[:8], 8).changed == []


# ---------------------------------------------------------------- crash safety


GC_ARGS = ("--keep-last", "5", "--keep-hourly", "6", "--keep-daily", "2")
FAULTS = [
    "gc-plan",
    "gc-build",
    "gc-built",
    "gc-journal",
    "gc-swap",
    "gc-swapped",
    "gc-remove",
    "gc-cleanup",
]


def assert_intact_after_crash(store: Store, expected, want: set[str], what: str) -> None:
    with store.lock():
        pass  # the next writer (the exclusive lock) finishes what the killed gc left
    have = {s.id for s in store.snapshots()}
    assert want <= have, f"kept snapshots lost ({what}): {sorted(want - have)}"
    v = store.verify(deep=True)
    assert v.ok, f"verify after {what}: {v.first_error()}"
    assert_contents(store, expected, ids=want)
    assert (
        os.listdir(Path(store.root) / "tmp") == []
        and not (Path(store.root) / "journal.json").exists()
    )


@pytest.fixture(scope="module")
def kill_base(pristine):
    root, expected, _ = pristine
    store = Store.open(root)
    want = reference_keep(store.snapshots(), 5, 6, 2)
    return root, expected, want


@pytest.mark.parametrize("point", FAULTS)
def test_gc_killed_at_fault_point(kill_base, tmp_path, point):
    root, expected, want = kill_base
    store = copy_store(root, tmp_path / "S")
    res = store_cli("gc", store.root, *GC_ARGS, env={"CKPT_FAULT": point})
    assert res.returncode == -signal.SIGKILL, f"gc did not stop at {point}\n{res.stderr}"
    journal = (Path(store.root) / "journal.json").exists()
    assert journal == (point in ("gc-journal", "gc-swap", "gc-swapped", "gc-remove"))
    assert_intact_after_crash(store, expected, want, f"kill at {point}")
    if point in ("gc-journal", "gc-swap", "gc-swapped", "gc-remove", "gc-cleanup"):
        assert {s.id for s in store.snapshots()} == want  # rolled forward
    res = store_cli("gc", store.root, *GC_ARGS)
    assert res.returncode == 0, res.stderr
    assert {s.id for s in store.snapshots()} == want
    assert_contents(store, expected)


def test_gc_killed_at_random_times(kill_base, tmp_path):
    """SIGKILL at random instants of the gc's own work (after interpreter start-up)."""
    root, expected, want = kill_base
    t = time.monotonic()
    ref = copy_store(root, tmp_path / "ref")
    res = store_cli("gc", ref.root, *GC_ARGS, "--json")
    assert res.returncode == 0, res.stderr
    full = time.monotonic() - t
    work = json.loads(res.stdout)["seconds"]
    rng = random.Random(2026)
    outcomes = []
    for i in range(6):
        store = copy_store(root, tmp_path / f"S{i}")
        e = dict(os.environ)
        e.pop("CKPT_FAULT", None)
        proc = subprocess.Popen(
            STORE_CLI + ["gc", store.root, *GC_ARGS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=e,
        )
        time.sleep(rng.uniform(max(0.0, full - work - 0.1), full))
        proc.kill()  # SIGKILL (or it already finished: also fine)
        proc.wait()
        journal = (Path(store.root) / "journal.json").exists()
        leftovers = bool(os.listdir(Path(store.root) / "tmp"))
        outcomes.append((proc.returncode, journal, leftovers))
        assert_intact_after_crash(store, expected, want, f"random kill {i}")
    print("random kills (returncode, journal left, tmp leftovers):", outcomes)


# ---------------------------------------------------------------- concurrency


def test_busy_store_fails_or_waits(pristine, tmp_path):
    root, _, _ = pristine
    store = copy_store(root, tmp_path / "S")
    holder = Store.open(store.root)
    with holder.lock(op="snapshot"):
        res = store_cli("gc", store.root, "--keep-last", "3")
        one_error_line(res, 14, "busy", f"pid {os.getpid()}", "--wait")
        res = store_cli("compact", store.root)
        one_error_line(res, 14, "busy")
        # readers wait (default --wait 10 for listing); with --wait 0 they fail too
        one_error_line(store_cli("verify", store.root, "--wait", "0"), 14, "busy")
    assert len(store.snapshots()) == 53  # nothing happened

    release = threading.Event()

    def hold():
        with holder.lock(op="snapshot"):
            release.wait(10)
            time.sleep(0.5)

    th = threading.Thread(target=hold)
    th.start()
    try:
        time.sleep(0.2)
        release.set()
        t = time.monotonic()
        res = store_cli("gc", store.root, "--keep-last", "3", "--wait", "20")
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t >= 0.3  # it did wait for the holder
    finally:
        release.set()
        th.join()
    assert len(store.snapshots()) == 3


def test_two_gc_at_once(pristine, tmp_path):
    root, expected, _ = pristine
    store = copy_store(root, tmp_path / "S")
    e = dict(os.environ)
    e.pop("CKPT_FAULT", None)
    procs = [
        subprocess.Popen(
            STORE_CLI + ["gc", store.root, "--keep-last", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=e,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 14]), outs
    if codes == [0, 14]:
        err = next(o[1] for p, o in zip(procs, outs) if p.returncode == 14)
        assert "busy" in err and "Traceback" not in err
    assert len(store.snapshots()) == 4
    assert store.verify(deep=True).ok
    assert_contents(store, expected)


def test_reader_lock_blocks_gc_but_not_readers(pristine, tmp_path):
    root, _, _ = pristine
    store = copy_store(root, tmp_path / "S")
    reader = Store.open(store.root)
    with reader.lock(shared=True):
        assert len(store.snapshots()) == 53  # a second reader is fine
        with pytest.raises(StoreBusy, match="busy"), store.lock():
            pass


# ---------------------------------------------------------------- corruption


def test_corrupt_chunk_in_the_middle_of_a_chain(tmp_path):
    """Layer 5's only chunk is damaged (the file every later snapshot hard-links): verify
    names each affected snapshot and the chunk, reading them fails with ImageCorrupt,
    the older snapshots still read, and gc refuses to touch the store."""
    store = Store.open(tmp_path / "S", create=True)
    proc = FakeProc(random.Random(11), 256, 7)
    expected, ids = {}, []
    for k in range(10):
        written = None if k == 0 else set(range(k * 20, k * 20 + 20))  # disjoint: all stay needed
        for p in written or ():
            proc.mem[p] = struct.pack("<QQ", p, k) * 256
        info = take_snapshot(store, proc, written, T0 + k)
        expected[info.id] = proc.content()
        ids.append(info.id)
    victim = Path(store.root) / "snapshots" / ids[5]
    with ImageReader(victim) as r:
        lr = r.layers[5]
        assert len(lr.index.chunks) == 1
        off, clen, _, _ = lr.index.chunks[0]
        pages = lr.pages_path
    with open(pages, "r+b") as f:
        f.seek(64 + off + clen // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))

    rep = store.verify(deep=True)
    bad = {c.id: c for c in rep.failed}
    assert set(bad) == set(ids[5:])
    for sid in ids[5:]:
        assert not bad[sid].restorable
        assert any("layer 5" in e and "chunk 0" in e and "checksum" in e for e in bad[sid].errors)
    assert store.verify(deep=False).ok  # the cheap check does not read chunk data

    for sid in ids[:5]:
        assert content(str(Path(store.root) / "snapshots" / sid)) == expected[sid]
    for sid in ids[5:]:
        with pytest.raises(ImageCorrupt, match="layer 5 chunk 0"):
            content(str(Path(store.root) / "snapshots" / sid))

    res = store_cli("verify", store.root, "--deep")
    line = one_error_line(res, 6, "verify failed", ids[5], "chunk 0")
    assert "5 of 10" in line
    assert f"{ids[9]}  FAILED, not restorable" in res.stdout
    assert f"{ids[4]}  ok" in res.stdout

    listing = sorted(os.listdir(Path(store.root) / "snapshots"))
    res = store_cli("compact", store.root, "--max-chain", "2")
    one_error_line(res, 6, "layer 5 chunk 0")
    assert sorted(os.listdir(Path(store.root) / "snapshots")) == listing
    assert os.listdir(Path(store.root) / "tmp") == []
    for sid in ids[:5]:
        assert content(str(Path(store.root) / "snapshots" / sid)) == expected[sid]


def test_verify_reports_a_missing_layer_file(pristine, tmp_path):
    root, _, _ = pristine
    store = copy_store(root, tmp_path / "S")
    victim = store.snapshots()[20]
    os.unlink(Path(victim.path) / "layer-0003.index.bin")  # only this snapshot's link
    rep = store.verify()
    assert [c.id for c in rep.failed] == [victim.id]
    assert "layer-0003.index.bin" in rep.failed[0].errors[0]


# ---------------------------------------------------------------- a real process


def test_real_process_snapshots_gc_restore(e2e):
    if store_cli("--help").returncode != 0:
        pytest.skip("store CLI unavailable")
    help_ = subprocess.run(
        [sys.executable, "-m", "ckpt", "snapshot", "--help"], capture_output=True, text=True
    )
    if help_.returncode != 0:
        pytest.skip("`ckpt snapshot` is not there yet")
    w = e2e.spawn("writer", "mib=8", "rate=300", "report=0")
    store_path = e2e.path("store")
    for _ in range(5):
        res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store_path))
        assert res.returncode == 0, str(res)
        time.sleep(0.1)
    store = Store.open(store_path)
    snaps = store.snapshots()
    assert len(snaps) == 5 and snaps[0].full and not any(s.full for s in snaps[1:])
    assert all(s.pid == w.pid for s in snaps)
    res = store_cli("gc", store_path, "--keep-last", "3", "--max-chain", "2")
    assert res.returncode == 0, res.stderr
    kept = store.snapshots()
    assert [s.id for s in kept] == [s.id for s in snaps[2:]]
    assert all(s.layers <= 2 for s in kept)
    assert store_cli("verify", store_path, "--deep").returncode == 0
    # the chain continues from the compacted newest snapshot: still incremental
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store_path))
    assert res.returncode == 0, str(res)
    assert not store.latest().full, "gc must not break the tracking chain"
    # restore a compacted middle snapshot as a copy; it must verify its own memory
    bg = e2e.ckpt_bg("restore", "--store", str(store_path), "--at", kept[1].id, "--new-pid")
    copy = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    v = e2e.verify(w, copy)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_gc_never_changes_what_a_snapshot_reads(tmp_path):
    """gc must preserve what every kept snapshot reads, even where the capture side's
    invariant is broken (pages present again without being reported as written, so an
    older layer supplies them): a layer built for a snapshot keeps the pages its
    descendants can ask for, not only its own present ones."""
    store = Store.open(tmp_path / "S", create=True)
    proc = FakeProc(random.Random(21), 128, 7)
    take_snapshot(store, proc, None, T0)
    hidden = set(range(40, 48))
    for k in range(12):
        written = proc.step(4, ndrop=0, nback=0) - hidden
        if k == 1:
            written |= hidden  # new data, in an increment layer
            for p in hidden:
                proc.mem[p] = struct.pack("<QQ", p, 999) * 256
        if k == 2:
            proc.present -= hidden  # dropped...
        if k == 4:
            proc.present |= hidden  # ...and back, unreported: read from k == 1's layer
        take_snapshot(store, proc, written, T0 + k + 1)
    before = {s.id: content(s.path) for s in store.snapshots()}
    assert all(before[s.id][40] == struct.pack("<QQ", 40, 999) * 256 for s in store.snapshots()[5:])
    with store.lock():
        # snapshot 5 is the first with > 4 layers: its merged layer is shared by 6, 7 …
        rep = store.compact(max_chain=4)
    assert len(rep.compacted) > 6
    for s in store.snapshots():
        assert content(s.path) == before[s.id]
