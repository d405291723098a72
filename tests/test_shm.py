"""Shared memory comes back exact in every mode (issue 10).

The workload (tests/workloads/shmstate.c) is a root with two children sharing
MAP_SHARED anonymous memory and a memfd, in which:
- a child that has exited wrote pages no live process has in its page tables;
- two processes bump their own counters in one shared page, forever; each keeps
  the last value it stored in its private memory, so after the restore
  `shared == mine` holds only if the shared page came back with the newest
  content, whichever process wrote it;
- the root only READS pages during the pre-copy rounds (they become present in its
  page tables by reads alone);
- a child writes a memfd through its fd (no mapping sees those writes).

Each mode (plain dump, dump --iterative, snapshots) restores the tree and lets every
process check all of it. Also: `ckpt verify` checks every tree member's pages and
every shared object's, not the root's alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
from helpers import dump_restore_verify, proc_status, wait_until
from test_image import rewrite_blob
from test_tree import reap_orphans, restore_tree, wait_untraced

from ckpt.errors import DumpError
from ckpt.image import ImageReader, ImageWriter
from ckpt.image.header import KIND_STATE
from ckpt.image.writer import STATE_NAME
from ckpt.model import SHM_SPACE0


def kids(w) -> list[int]:
    return [int(w.ready["c1"]), int(w.ready["c2"])]


def restored_ok(e2e, w, bg) -> None:
    wait_untraced(kids(w), "run")
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line
    assert int(v.fields["bumps"]) > 0
    assert bg.wait(60).returncode == 0


def shm_objects(image) -> list[dict]:
    with ImageReader(image) as r:
        return r.state.get("shm") or []


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="plain"),
        pytest.param(
            ("--iterative", "--max-rounds", "4", "--target-downtime-ms", "1"), id="iterative"
        ),
    ],
)
def test_shared_memory_round_trip(e2e, posix_files, extra):
    w = spawn(e2e, posix_files)
    image = e2e.path("img")
    stats = e2e.path("stats.json")
    e2e.dump_ok(w, image, *extra, "--stats-json", str(stats))
    objs = shm_objects(image)
    # the MAP_SHARED anonymous area is one object, stored once for the three processes
    shmem = [o for o in objs if o["kind"] == "shmem"]
    assert len(shmem) == 1, objs
    assert [o["name"] for o in objs if o["kind"] == "file"] == [posix_path(w.pid)]
    # the exited child's and the read-only pages are in it (1024 pages mapped, >= 513 data)
    assert sum(n for _, n in shmem[0]["present"]) >= 513
    if extra:
        rounds = json.loads(stats.read_text())["rounds"]
        assert len(rounds) >= 2, rounds
    bg = restore_tree(e2e, w, kids(w), "-D", str(image))
    restored_ok(e2e, w, bg)


@pytest.fixture
def posix_files():
    """/dev/shm files of the workloads (shmstate names one after its root PID)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(posix_path(pid))


def posix_path(pid: int) -> str:
    return f"/dev/shm/ckpt-shmstate-{pid}"


def spawn(e2e, posix_files):
    w = e2e.spawn("shmstate")
    posix_files.append(w.pid)
    return w


@pytest.mark.parametrize("gone", [False, True], ids=["file-kept", "file-gone"])
def test_shared_memory_snapshots(e2e, posix_files, gone):
    """Three snapshots while the counters run; the last restores exact (the
    incremental ones store only shared pages whose content changed). The original
    keeps writing its /dev/shm file after the last snapshot: the restore brings back
    the snapshot's content, and makes the file again when it is gone."""
    w = spawn(e2e, posix_files)
    store = e2e.path("store")
    for _ in range(3):
        res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
        assert res.returncode == 0, str(res)
    res = e2e.ckpt("verify", str(store))
    assert res.returncode == 0, str(res)
    listed = json.loads(e2e.ckpt("snapshots", str(store), "--json").stdout)["snapshots"]
    # the shared object alone holds 513 data pages: incremental snapshots store only
    # what changed (the counters' page and the members' own few pages)
    assert listed[0]["pages_written"] > 513
    assert all(s["pages_written"] < 200 for s in listed[1:]), listed
    wait_untraced([w.pid, *kids(w)])
    for pid in [w.pid, *kids(w)]:
        os.kill(pid, signal.SIGKILL)
    assert w.reap() == -signal.SIGKILL
    reap_orphans(kids(w))
    if gone:
        os.unlink(posix_path(w.pid))
    bg = restore_tree(e2e, w, kids(w), "--store", str(store))
    st = os.stat(posix_path(w.pid))
    assert (st.st_mode & 0o777, st.st_uid) == (0o640, 0)
    restored_ok(e2e, w, bg)


def test_file_in_use_with_other_content_is_not_overwritten(e2e, posix_files):
    """--new-pid next to the running original: its /dev/shm file has moved on since the
    dump, so the restore refuses (exit 11) instead of writing the old content into it."""
    w = spawn(e2e, posix_files)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_untraced([w.pid, *kids(w)])
    res = e2e.ckpt("restore", "-D", str(image), "--new-pid", "--detach")
    assert res.returncode == 11, str(res)
    assert "in use by process" in res.stderr, res.stderr
    v = e2e.verify(w, w.pid, signal.SIGUSR2)
    assert v.ok, v.line


def test_commit_refuses_an_incomplete_image(tmp_path):
    """The completeness check restore runs also runs before any image is published, so
    a dump (which commits before it kills its target) cannot report success for an
    image restore would refuse; the half-written image is removed."""
    path = tmp_path / "img"
    w = ImageWriter(path)
    lw = w.begin_layer()
    lw.add_run(0x7F0000000000, b"x" * 4096)
    lw.close()
    state = {"pid": 1, "vmas": [{"present": [[0x7F0000000000, 2]]}]}
    with pytest.raises(DumpError, match="1 page"):
        w.commit(state, {})
    assert not path.exists()
    assert not list(tmp_path.iterdir())
    # the tree members' and the shared objects' pages count as well
    for state in (
        {"pid": 1, "tree": [{"space": 3, "vmas": [{"present": [[0x1000, 1]]}]}]},
        {"pid": 1, "shm": [{"space": SHM_SPACE0, "present": [[0, 1]]}]},
    ):
        w = ImageWriter(path)
        w.begin_layer().close()
        with pytest.raises(DumpError, match="incomplete"):
            w.commit(state, {})


@pytest.mark.parametrize("where", ["member", "object"])
def test_verify_checks_members_and_objects(e2e, posix_files, where):
    """A snapshot whose tree member (or shared object) needs pages no layer holds is
    reported by `ckpt verify`, which used to look at the root's VMAs only."""
    w = spawn(e2e, posix_files)
    store = e2e.path("store")
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert res.returncode == 0, str(res)
    assert e2e.ckpt("verify", str(store)).returncode == 0
    (snap,) = [p for p in (store / "snapshots").iterdir() if p.is_dir()]

    def change(state):
        if where == "member":
            vma = next(v for v in state["tree"][0]["vmas"] if v["kind"] == "anon")
            vma["present"].append([vma["end"] - 4096, 1])
            vma["present"] = [list(r) for r in sorted(map(tuple, vma["present"]))]
        else:
            obj = next(o for o in state["shm"] if o["kind"] == "shmem")
            held = {a // 4096 + i for a, n in obj["present"] for i in range(n)}
            gap = next(p for p in range(obj["size"] // 4096) if p not in held)
            runs = sorted([*map(tuple, obj["present"]), (gap * 4096, 1)])
            obj["present"] = [list(r) for r in runs]
            obj["digest"] = b"\1" * 8 * len(held | {gap})

    rewrite_blob(snap / STATE_NAME, KIND_STATE, lambda env: change(env["state"]), major=3)
    res = e2e.ckpt("verify", str(store))
    assert res.returncode != 0, str(res)
    assert "no layer" in (res.stdout + res.stderr) or "missing" in (res.stdout + res.stderr), str(
        res
    )
    wait_until(lambda: (proc_status(w.pid) or {}).get("TracerPid") == "0", 30, "untraced")


def test_objects_whose_inodes_collide(e2e):
    """A SysV segment's inode number is its shmid, on the internal shmem mount that
    anonymous MAP_SHARED memory and memfds share, whose inode numbers count on their
    own: the workload (shmcollide.c) gives its two segments (kernel.shm_next_id) the
    inode numbers of its anonymous mapping and of its memfd, so /proc/PID/maps names
    two objects by one (dev, ino) twice, and maps a /dev/shm file too. Each comes
    back as an object of its own with its own content."""
    w = e2e.spawn("shmcollide")
    try:
        dump_restore_verify(e2e, w)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.ready["shm"])


def test_object_key_tells_sysv_apart():
    """The key of a mapped object (capture/shm.py ident_of) is (dev, ino, sysv): a
    segment and an anonymous object with the same inode on one mount are two keys;
    a parent snapshot's records (any format) are keyed the same way."""
    from ckpt.capture.shm import SharedMemory, ident_of
    from ckpt.kernel.procfs import Mapping

    def mapping(name: str, ino: int = 84598, minor: int = 1) -> Mapping:
        return Mapping(0x1000, 0x2000, "rw-s", 0, 0, minor, ino, name, deleted=True)

    sysv, anon = mapping("/SYSV00000000"), mapping("/dev/zero")
    assert ident_of(sysv)[:2] == ident_of(anon)[:2]
    assert ident_of(sysv) != ident_of(anon)
    assert ident_of(mapping("/dev/zero", minor=2)) != ident_of(anon)
    prior = [{"kind": "sysv", "dev": 1, "ino": 84598, "space": SHM_SPACE0},
             {"kind": "shmem", "dev": 1, "ino": 84598, "space": SHM_SPACE0 + 1}]  # fmt: skip
    keys = SharedMemory(prior).prior
    assert keys[ident_of(sysv)]["kind"] == "sysv" and keys[ident_of(anon)]["kind"] == "shmem"
