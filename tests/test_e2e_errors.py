"""End to end: bad input gives one `ckpt: error:` line, a distinct exit code, no
traceback, and leaves the target and the image as they were.

Exit codes (README): 2 usage, 3 no such process, 4 cannot ptrace, 5 unsupported
process, 6 image corrupt, 7 unknown format version, 8 image not found /
incomplete, 9 PID in use (tests/test_e2e_modes.py), 10 file changed since the
dump, 15 image destination exists. An empty image directory is "not a complete
image" (8); an empty or truncated FILE inside an image is corruption (6).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import (
    CKPT,
    Result,
    assert_error,
    assert_no_process,
    dir_digest,
    free_pid,
    image_complete,
    kernel_thread_pid,
    proc_state,
    proc_status,
    untraced_and_running,
    wait_until,
)

from ckpt.image import ImageReader
from ckpt.image.header import READ_MAJORS

KINDS = {"state": b"STAT", "index": b"INDX", "pages": b"PAGE"}


def image_file(image: Path, kind: str) -> Path:
    """The image's first file of `kind` (its one state file; layer 0's index or pages:
    a plain dump of a process with shared memory has a second layer, the objects'),
    found by its header (docs/FORMAT.md: every file starts with b"CKPT" + a 4-byte
    kind), so file names may change freely."""
    hits = []
    for p in sorted(image.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                if f.read(8) == b"CKPT" + KINDS[kind]:
                    hits.append(p)
    assert hits and (kind != "state" or len(hits) == 1), f"{kind} files in {image}: {hits}"
    return hits[0]


# --------------------------------------------------------------- dump refuses


def test_no_such_process(e2e):
    pid = free_pid()
    image = e2e.path("img")
    res = e2e.dump(pid, image)
    assert_error(res, 3, str(pid))
    assert not image_complete(e2e, image)


def test_kernel_thread_refused_before_touching_it(e2e):
    pid = kernel_thread_pid()
    if pid is None:
        pytest.skip("no kernel thread is visible in this PID namespace")
    image = e2e.path("img")
    res = e2e.dump(pid, image)
    assert_error(res, 5, "kernel")
    assert proc_status(pid)["TracerPid"] == "0"
    assert not image.exists()


def test_own_pid_refused(e2e):
    image = e2e.path("img")
    script = 'exec "$0" -m ckpt dump $$ -D "$1"'
    p = subprocess.run(
        ["sh", "-c", script, sys.executable, str(image)],
        cwd=e2e.base,
        capture_output=True,
        text=True,
        timeout=120,
        env=e2e.env(),
        check=False,
    )
    assert_error(Result(["dump", "$$"], p.returncode, p.stdout, p.stderr), 5)
    assert not image.exists()


def test_already_traced_process(e2e):
    w = e2e.spawn("traced")
    child, tracer = w.pid, int(w.ready["tracer"])
    image = e2e.path("img")
    res = e2e.dump(child, image)
    assert_error(res, 4)
    assert proc_status(child)["TracerPid"] == str(tracer), "ckpt disturbed the existing tracer"
    assert not image_complete(e2e, image)
    v = e2e.verify(w, child)
    assert v.ok, v.line
    assert w.reap() == 0


def test_exited_main_thread_refused_and_left_running(e2e):
    """A process whose main thread called pthread_exit (leader a zombie) is refused."""
    w = e2e.spawn("threads", "leader-exit")
    os.kill(w.pid, signal.SIGUSR1)
    wait_until(lambda: proc_state(w.pid) == "Z", 30, "the main thread to exit")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, "main thread")
    assert not image_complete(e2e, image)
    tids = os.listdir(f"/proc/{w.pid}/task")
    wait_until(
        lambda: all(proc_status(f"{w.pid}/task/{t}")["TracerPid"] == "0" for t in tids),
        30,
        "the threads to run untraced",
    )
    os.kill(w.pid, signal.SIGUSR2)  # the surviving thread takes it and verifies
    wait_until(lambda: w.find("VERIFY", w.pid), 60, "the surviving thread to verify")
    words, fields = w.find("VERIFY", w.pid)[-1]
    assert words[1] == "OK", fields
    assert w.reap() == 0


def test_destination_exists(e2e):
    """A non-empty destination is refused (15) before the target is touched; an
    existing empty directory is fine."""
    w = e2e.spawn("memory", "8")
    image = e2e.path("img")
    image.mkdir()
    (image / "precious").write_text("keep me")
    res = e2e.dump(w.pid, image)
    assert_error(res, 15)
    assert (image / "precious").read_text() == "keep me"
    assert sorted(os.listdir(image)) == ["precious"]
    assert untraced_and_running(w.pid)

    empty = e2e.path("img")
    empty.mkdir()
    res = e2e.dump(w.pid, empty, "--leave-running")
    assert res.returncode == 0, str(res)
    assert image_complete(e2e, empty)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the target to run untraced")
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line


@pytest.mark.parametrize(
    "args",
    [
        ["dump"],
        ["dump", "123"],
        ["dump", "notapid", "-D", "x"],
        ["restore"],
        ["show"],
        ["no-such-command"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors(e2e, args):
    res = e2e.ckpt(*args)
    assert res.returncode == 2, str(res)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip(), "a usage error must say what is wrong"


# --------------------------------------------------------------- bad images


@pytest.fixture(scope="module")
def small_image(module_e2e):
    """One good image of a small memory workload (its original is killed and reaped)."""
    w = module_e2e.spawn("memory", "8")
    image = module_e2e.path("img")
    module_e2e.dump_ok(w, image)
    for kind in KINDS:
        image_file(image, kind)
    return SimpleNamespace(image=image, pid=w.pid, ident=w.ident)


@pytest.fixture
def image_copy(small_image, e2e):
    dst = e2e.path("img")
    shutil.copytree(small_image.image, dst)
    return dst


def restore_fails(e2e, small_image, image, code, *needles):
    """Restore must fail with `code`, leave no process at the PID, not touch the image."""
    digest = dir_digest(image) if image.exists() else None
    res = e2e.ckpt("restore", "-D", str(image), "--detach", timeout=120)
    if res.returncode == 0:  # a wrongly successful restore: do not leave it running
        pid = small_image.pid
        if small_image.ident.matches(pid):
            os.kill(pid, 9)
            time.sleep(0.2)
    assert_error(res, code, *needles)
    assert_no_process(small_image.pid)
    if digest is not None:
        assert dir_digest(image) == digest, "a failed restore modified the image"


def test_missing_image_dir(e2e, small_image):
    restore_fails(e2e, small_image, e2e.path("nothing-here"), 8)


def test_empty_image_dir(e2e, small_image):
    image = e2e.path("img")
    image.mkdir()
    restore_fails(e2e, small_image, image, 8)
    assert_error(e2e.ckpt("show", str(image), "--json"), 8)


def test_missing_state_file(e2e, small_image, image_copy):
    image_file(image_copy, "state").unlink()
    restore_fails(e2e, small_image, image_copy, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_file(e2e, small_image, image_copy, kind):
    image_file(image_copy, kind).write_bytes(b"")
    restore_fails(e2e, small_image, image_copy, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_file(e2e, small_image, image_copy, kind):
    path = image_file(image_copy, kind)
    os.truncate(path, path.stat().st_size // 2)
    restore_fails(e2e, small_image, image_copy, 6)


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("state", "middle"),
        ("state", "last"),
        ("state", "header"),
        ("index", "middle"),
        ("index", "last"),
        ("pages", "middle"),
        ("pages", "last"),
    ],
)
def test_bit_flip(e2e, small_image, image_copy, kind, where):
    path = image_file(image_copy, kind)
    data = bytearray(path.read_bytes())
    # header: a byte past the frozen magic/kind/major/minor prefix (offsets 0..11)
    pos = {"middle": len(data) // 2, "last": len(data) - 1, "header": 16}[where]
    if kind == "pages" and where != "header":
        pos = chunk_byte(image_copy, path, pos)
    assert len(data) > 64, f"{path} is only {len(data)} bytes"
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    restore_fails(e2e, small_image, image_copy, 6)


def chunk_byte(image: Path, path: Path, near: int) -> int:
    """The byte of chunk data nearest to `near` in a pages file: a large layer's chunks
    are written with O_DIRECT at aligned offsets, and the zero padding between and
    after them holds nothing a flip could corrupt."""
    with ImageReader(image) as r:
        lr = next(x for x in r.layers if Path(x.pages_path).name == path.name)
        spans = [(lr._data_offset + off, lr._data_offset + off + clen)
                 for off, clen, _, _ in lr.index.chunks]  # fmt: skip
    a, b = min(
        spans,
        key=lambda s: 0 if s[0] <= near < s[1] else min(abs(near - s[0]), abs(near - s[1] + 1)),
    )
    return min(max(near, a), b - 1)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_major_version(e2e, small_image, image_copy, kind):
    """docs/FORMAT.md: magic(4) kind(4) u16 major u16 minor, frozen for every major."""
    path = image_file(image_copy, kind)
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, max(READ_MAJORS) + 1)  # a major no reader knows yet
    path.write_bytes(bytes(data))
    restore_fails(e2e, small_image, image_copy, 7)


# --------------------------------------------------------------- files changed


@pytest.mark.parametrize("change", ["mapped-file-grew", "mapped-file-vanished", "open-file-mtime"])
def test_file_changed_since_dump(e2e, change):
    """A file that a mapping or an fd refers to changed: exit 10 naming it, no
    process left at the PID, image byte-identical."""
    if change == "open-file-mtime":
        w = e2e.spawn("files")
        target = w.cwd / "ro.dat"
    else:
        w = e2e.spawn("memory", "8")
        target = w.cwd / ("private.dat" if change == "mapped-file-grew" else "shared.dat")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)

    if change == "mapped-file-grew":
        with open(target, "ab") as f:
            f.write(b"x" * 4096)
    elif change == "mapped-file-vanished":
        target.unlink()
    else:
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    res = e2e.ckpt("restore", "-D", str(image), "--detach", timeout=120)
    if res.returncode == 0 and w.ident.matches(w.pid):
        os.kill(w.pid, 9)
    assert_error(res, 10, target.name)
    assert_no_process(w.pid)
    assert dir_digest(image) == digest, "a failed restore modified the image"


def test_ckpt_module_runs():
    """Sanity: the CLI entry point exists (every other test here depends on it)."""
    res = subprocess.run([*CKPT, "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
