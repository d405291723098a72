"""What dumps and snapshots leave on the host, and what read-only commands change
(issue 11, "should fix").

- A full file system is a clear error with the path and its own exit code (18); the
  target runs on unharmed and nothing is left behind.
- The DIR.tmp-* directories of killed dumps are removed by the next dump into the
  same parent; never one a live writer holds (flock), one whose writer may be an
  older ckpt still running, or one holding anything but image files.
- `ckpt snapshots` and `ckpt verify` change nothing in a store, even with a journal
  an interrupted gc left (they say so; the next writer finishes it).
- `ckpt verify` runs the validation restore runs: a malformed state fails it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_error, proc_alive
from test_image import rewrite_blob
from test_store import GC_ARGS, build_store, copy_store, store_cli

from ckpt.image import header as hdr
from ckpt.image.writer import STATE_NAME
from ckpt.store import Store

# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs, mounted for this test only."""
    d = tmp_path / "small"
    d.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_dump_and_snapshot_on_a_full_disk(e2e, small_fs):
    """8 MiB of incompressible memory into 2 MiB: exit 18 naming the image, nothing
    left there, and the process runs on and verifies its memory."""
    w = e2e.spawn("writer", "mib=8", "rate=0")
    image = small_fs / "img"
    res = e2e.dump(w.pid, image)
    assert_error(res, 18, str(image), "no space left on device")
    assert list(small_fs.iterdir()) == [], "a failed dump must leave nothing behind"
    assert proc_alive(w.pid)
    store = small_fs / "store"
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert_error(res, 18, str(store), "no space left on device")
    assert Store.open(store).snapshots() == []
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line


# ---------------------------------------------------------------- leftovers


HOLD = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n"


def _fake_leftover(parent: Path, name: str, files=("layer-0000.pages.bin",)) -> Path:
    d = parent / name
    d.mkdir(mode=0o700)
    for f in files:
        (d / f).write_bytes(b"x" * 4096)
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_dump_removes_killed_dumps_leftovers(e2e):
    parent = e2e.path("images")
    parent.mkdir(mode=0o700)
    # a real leftover: a dump killed just before its commit
    w1 = e2e.spawn("writer", "mib=4", "rate=0")
    res = e2e.dump(w1.pid, parent / "a", env=e2e.env(CKPT_FAULT="commit"))
    assert res.returncode == -9, str(res)
    killed = [p for p in parent.iterdir() if ".tmp-" in p.name]
    assert len(killed) == 1 and any(killed[0].iterdir()), killed
    dead = _fake_leftover(parent, f"b.tmp-{_dead_pid()}-0badcafe")
    # kept: a live writer's (it holds the lock), an older ckpt's that may be running
    # (no lock, but its PID runs ckpt), one holding foreign files, other names
    live = _fake_leftover(parent, f"c.tmp-{os.getpid()}-00000001")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True
    )
    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "ckpt"])
    try:
        assert holder.stdout.readline().strip() == "held"
        live_named = _fake_leftover(parent, f"d.tmp-{older.pid}-00000002")
        foreign = _fake_leftover(
            parent, f"e.tmp-{_dead_pid()}-00000003", ("layer-0000.pages.bin", "notes.txt")
        )
        other = _fake_leftover(parent, "f.tmp-backup")
        w2 = e2e.spawn("writer", "mib=4", "rate=0")
        e2e.dump_ok(w2, parent / "g")
        assert not killed[0].exists(), "the killed dump's directory is still there"
        assert not dead.exists()
        for kept in (live, live_named, foreign, other):
            assert kept.exists(), f"{kept.name} was removed"
        assert (parent / "g" / STATE_NAME).exists()
    finally:
        for p in (holder, older):
            p.kill()
            p.wait()
        holder.stdout.close()


# ---------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene") / "S"
    build_store(root, n=12, npages=64, nwrite=4, interval=3600)
    return root


def _tree(root: str) -> dict[str, int]:
    """Every name below root with its inode: any rename, removal or new file shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


def test_read_only_commands_leave_an_interrupted_gc_alone(small_store, tmp_path):
    """A gc killed after writing its journal: `snapshots` and `verify` list and check
    what is there, say a gc is unfinished, and change nothing (before, they replayed
    the journal, which deletes snapshots); the next writer finishes it."""
    store = copy_store(small_store, tmp_path / "S")
    res = store_cli("gc", store.root, *GC_ARGS, env={"CKPT_FAULT": "gc-swap"})
    assert res.returncode == -9, res.stderr
    journal = Path(store.root) / "journal.json"
    assert journal.exists()
    before = _tree(store.root)
    for cmd in (["snapshots", store.root], ["verify", store.root, "--deep"]):
        res = store_cli(*cmd)
        assert "journal.json" in res.stderr and "interrupted gc" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        assert _tree(store.root) == before, f"`ckpt {cmd[0]}` changed the store"
    n = len(store.snapshots())
    assert _tree(store.root) == before
    res = store_cli("compact", store.root, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert not journal.exists(), "the next writer finishes the gc"
    assert len(store.snapshots()) < n


def test_verify_runs_restores_validation(small_store, tmp_path):
    """A snapshot whose state is malformed (valid checksums): verify fails it, naming
    the field, as restore refuses it (before: "all ok")."""
    store = copy_store(small_store, tmp_path / "S")
    snap = store.snapshots()[5]
    state = Path(store.path_of(snap)) / STATE_NAME
    rewrite_blob(state, hdr.KIND_STATE, lambda env: env["state"].update(pid="seven"))
    res = store_cli("verify", store.root)
    assert res.returncode == 6, res.stdout + res.stderr
    assert f"{snap.id}  FAILED, not restorable" in res.stdout, res.stdout
    assert "malformed (pid: expected an integer" in res.stdout, res.stdout
    res = store_cli("restore", "--store", store.root, "--at", snap.id, "--detach")
    if res.returncode != 2:  # `ckpt.store` alone has no restore command
        assert res.returncode == 6, res.stderr
        assert "malformed" in res.stderr
