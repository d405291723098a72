"""End to end: fds that are kernel objects (pipes, FIFOs, eventfd, timerfd, signalfd,
epoll, inotify, memfd, /dev/shm files) survive dump and restore.

The workload (tests/workloads/fdkinds.c) sets each kind up with state worth
keeping — buffered pipe data, counters, armed and expired timers, registrations,
watches, memfd content shared with a mapping — and after restore proves it from
inside: it reads the data back, waits for the events, and prints VERIFY OK or
VERIFY FAIL with the reasons. What is still unsupported fails the dump with one
error line naming the fd, and the target runs on undisturbed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from helpers import (
    assert_error,
    assert_no_process,
    assert_refused_unharmed,
    assert_same_maps,
    dir_digest,
    dump_restore_verify,
    maps_for_compare,
    settled_signal_state,
    signal_state,
)

GROUPS = ["pipes", "events", "epoll", "inotify", "memfd", "shm", "dirs"]


@pytest.fixture
def shm_cleanup():
    """/dev/shm files the shm group creates (the workload unlinks its own on success)."""
    made: list[int] = []
    yield made
    for pid in made:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/ckpt-fdkinds-{pid}")


@pytest.mark.parametrize("group", GROUPS)
def test_fd_kind_restored(e2e, shm_cleanup, group):
    w = e2e.spawn("fdkinds", group)
    shm_cleanup.append(w.pid)
    dump_restore_verify(e2e, w)


def test_show_lists_fd_kinds(e2e, shm_cleanup):
    w = e2e.spawn("fdkinds", "all")
    shm_cleanup.append(w.pid)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    show = e2e.ckpt("show", str(image), "--json")
    assert show.returncode == 0, str(show)
    kinds = {f["kind"] for f in json.loads(show.stdout)["fds"]}
    assert {"pipe", "fifo", "eventfd", "timerfd", "signalfd", "epoll", "inotify", "memfd"} <= kinds
    # the dump read pipe data and memfd content without disturbing the original
    v = e2e.verify(w, w.pid)
    assert v.ok, f"the original broke after dump --leave-running: {v.line}"


def test_all_kinds_iterative(e2e, shm_cleanup):
    """`dump --iterative` shares the capture code: every kind at once, pre-copied."""
    w = e2e.spawn("fdkinds", "all")
    shm_cleanup.append(w.pid)
    pid = w.pid
    sig_before, maps_before = signal_state(pid), maps_for_compare(pid)
    image = e2e.path("img")
    e2e.dump_ok(w, image, "--iterative", "--max-rounds", "2")
    digest = dir_digest(image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(pid, w.ident, bg)
    assert settled_signal_state(pid, sig_before) == sig_before
    assert_same_maps(maps_before, maps_for_compare(pid), "after restore")
    v = e2e.verify(w, pid)
    res = bg.wait()
    assert v.ok, f"the restored process failed its own checks: {v.line}"
    assert res.returncode == 0, str(res)
    assert dir_digest(image) == digest


def test_all_kinds_snapshot(e2e, shm_cleanup):
    """A snapshot (process keeps running) restores beside the original with --new-pid."""
    w = e2e.spawn("fdkinds", "pipes,events,epoll,memfd")
    store = e2e.path("store")
    res = e2e.ckpt("snapshot", str(w.pid), "--store", str(store))
    assert res.returncode == 0, str(res)
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke after the snapshot: {v0.line}"
    assert w.reap() == 0
    bg = e2e.ckpt_bg("restore", "--store", str(store), "--new-pid")
    copy = e2e.find_restored(w.ident, w.pid, bg)
    v = e2e.verify(w, copy)
    assert v.ok, f"the restored copy failed its own checks: {v.line}"
    assert bg.wait().returncode == 0


# --------------------------------------------------------------- still refused


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("sharedpipe", ["pipe", "also open in process"]),
        ("bigmemfd", ["memfd", "64 MiB"]),
        ("inotifyqueued", ["inotify", "unread events"]),
    ],
)
def test_unsupported_fd_refused_and_left_running(e2e, mode, needles):
    """One error line naming the fd and its type, exit 5; the target runs on unharmed
    (for a shared pipe: its buffered bytes are still there)."""
    w = e2e.spawn("fdkinds", mode)
    fd = w.ready["fd"]
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, f"fd {fd} ", *needles)
    if mode == "sharedpipe":
        assert f"process {w.ready['child']}" in res.stderr
    assert_refused_unharmed(e2e, w, image)


def test_restore_refuses_when_fifo_is_gone(e2e):
    """The FIFO is reopened by path: gone at restore → exit 10, nothing left behind."""
    w = e2e.spawn("fdkinds", "pipes")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    Path(w.cwd, "fifo").unlink()
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 10, "fifo")
    assert_no_process(w.pid)


# --------------------------------------------------------------- units


def test_fdinfo_lines_parse_epoll_and_inotify():
    from ckpt.kernel.fdobjs import fdinfo_lines

    raw = (
        b"pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\n"
        b"tfd:        5 events:       19 data:             1111  pos:0 ino:1ab sdev:f\n"
        b"tfd:       12 events: 80000001 data: ffffffffffffffff  pos:0 ino:1ac sdev:f\n"
        b"inotify wd:7 ino:2101e1 sdev:fe00000 mask:80000002 ignored_mask:0 "
        b"fhandle-bytes:8 fhandle-type:1 f_handle:e101210013e686a9\n"
    )
    eps = fdinfo_lines(raw, "tfd:")
    assert [(e["tfd"], e["events"], e["data"]) for e in eps] == [
        ("5", "19", "1111"),
        ("12", "80000001", "ffffffffffffffff"),
    ]
    (w,) = fdinfo_lines(raw, "inotify ")
    assert (w["wd"], w["mask"], w["sdev"], w["f_handle"]) == (
        "7",
        "80000002",
        "fe00000",
        "e101210013e686a9",
    )


def test_read_sparse_keeps_data_and_holes(tmp_path):
    """Extents hold exactly the non-zero pages; a round trip gives the same bytes."""
    from ckpt.kernel.fdobjs import read_sparse, write_sparse

    fd = os.memfd_create("sparse-test")
    try:
        os.ftruncate(fd, 10 << 20)
        os.pwrite(fd, b"a" * 5000, 4096)  # pages 1-2
        os.pwrite(fd, bytes(4096), 8 << 20)  # an allocated page of zeros: stays a hole
        os.pwrite(fd, b"z", (10 << 20) - 1)  # the last byte
        c = read_sparse(f"/proc/self/fd/{fd}", 1 << 20)
        assert c.size == 10 << 20
        assert [(off, len(d)) for off, d in c.extents] == [(4096, 8192), ((10 << 20) - 4096, 4096)]
        with pytest.raises(OSError):
            read_sparse(f"/proc/self/fd/{fd}", 4096)
        fd2 = os.memfd_create("sparse-copy")
        try:
            write_sparse(f"/proc/self/fd/{fd2}", c)
            assert os.pread(fd2, 10 << 20, 0) == os.pread(fd, 10 << 20, 0)
        finally:
            os.close(fd2)
    finally:
        os.close(fd)
