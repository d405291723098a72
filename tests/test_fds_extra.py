"""End to end: fds that dump and restore refused until issue 14 — pidfds, unlinked
files (open and mapped), /proc files of the dumped processes, pipes reopened through
/proc, FIFOs between processes and deleted FIFOs, unix sockets whose name was deleted.

Each workload sets its fds up with state worth keeping and proves after the restore,
from inside, that they are the same objects (VERIFY OK / VERIFY FAIL with reasons).
What still cannot be exact fails with one line naming the process and the fd.
"""

from __future__ import annotations

import os
import signal
import tempfile

import pytest
from helpers import (
    assert_error,
    assert_no_process,
    assert_refused_unharmed,
    dump_restore_verify,
    untraced_and_running,
    wait_until,
)
from test_tree import reap_orphans


def kids(w) -> list[int]:
    return [int(k) for k in w.ready["kids"].split(",") if int(k) > 0]


# --------------------------------------------------------------- pidfds


def test_pidfds_restored(e2e):
    """pidfds of itself (plain and PIDFD_THREAD), of children (clone3 CLONE_PIDFD, and
    PIDFD_NONBLOCK), of a zombie, of a reaped child, of a process outside the tree, and
    a child's pidfd of its parent: waitid(P_PIDFD), poll, epoll and pidfd_send_signal
    work on them after the restore."""
    w = e2e.spawn("pidfds")
    dump_restore_verify(e2e, w, after_dump=lambda _image: reap_orphans(kids(w)))


def test_pidfds_new_pid(e2e):
    """--new-pid beside the running original: each pidfd of a process of the tree names
    the restored copy of it (the copy's own children, its own parent)."""
    w = e2e.spawn("pidfds")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    new = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    v = e2e.verify(w, new)
    assert v.ok, v.line
    assert bg.wait().returncode == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, f"the original broke after dump --leave-running: {v0.line}"


def test_pidfd_of_a_process_gone_refused_at_restore(e2e):
    """The process outside the tree a pidfd names is gone at restore: exit 11 naming the
    fd and that process, before anything is built."""
    w = e2e.spawn("pidfds")
    outside = int(w.ready["outside"])
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    reap_orphans(kids(w))
    os.kill(outside, signal.SIGKILL)
    os.waitpid(outside, 0)  # the test is a subreaper: the double-forked peer is ours
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 11, "pidfd of process", str(outside), "no longer runs")
    assert_no_process(w.pid)


def test_pidfd_of_own_thread_refused(e2e):
    """A PIDFD_THREAD pidfd of a thread other than the leader: one line, exit 5, the
    target runs on."""
    w = e2e.spawn("pidfds", "thread")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, f"fd {w.ready['fd']} ", "pidfd of thread", f"process {w.pid}")
    assert_refused_unharmed(e2e, w, image)


# --------------------------------------------------------------- unlinked files


def test_unlinked_files_restored(e2e):
    """Files unlinked while open or mapped come back as unnamed files of the same
    directory with the same content, mode, owner, flags and offsets; every fd and
    mapping of one file shares one inode again (shared and private mappings, a file
    only a mapping holds, O_APPEND, O_PATH)."""
    w = e2e.spawn("unlinked")
    dump_restore_verify(e2e, w)


def test_unlinked_files_in_a_tree(e2e):
    """A child that inherited the fds and mappings and opened a description of its own
    through /proc: after the restore they are all one inode with the parent's."""
    w = e2e.spawn("unlinked", "tree")
    dump_restore_verify(e2e, w, after_dump=lambda _image: reap_orphans([int(w.ready["child"])]))


def test_unlinked_file_directory_gone_at_restore(e2e):
    """The directory an unlinked file is made again in is gone at restore: exit 11
    naming the process, the fd and the directory; nothing is left."""
    w = e2e.spawn("unlinked", "sub")
    image = e2e.path("img")
    e2e.dump_ok(w, image)
    os.rmdir(os.path.join(w.cwd, "sub"))
    res = e2e.ckpt("restore", "-D", str(image))
    assert_error(res, 11, f"fd {w.ready['fd']}", "sub/f.dat", "directory")
    assert_no_process(w.pid)
    os.mkdir(os.path.join(w.cwd, "sub"))  # back: the same image restores
    dump_restored = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, dump_restored)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert dump_restored.wait().returncode == 0
    assert os.listdir(os.path.join(w.cwd, "sub")) == [], "the file got a name"


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("big", ["unlinked file", "64 MiB"]),
        ("links", ["name was deleted", "other links"]),
        ("nodir", ["unlinked file", "directory is gone"]),
        ("aio", ["AIO ring"]),
    ],
)
def test_unlinked_refused_and_left_running(e2e, mode, needles):
    """What cannot be made exact is refused at the dump with one line naming the
    process and the fd or mapping (exit 5); the target runs on."""
    w = e2e.spawn("unlinked", mode)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    fd = int(w.ready["fd"])
    assert_error(res, 5, f"process {w.pid}", *([f"fd {fd} "] if fd >= 0 else []), *needles)
    assert_refused_unharmed(e2e, w, image)


# --------------------------------------------------------------- /proc files


def test_proc_files_restored(e2e):
    """/proc/self/status read part way, a child's /proc/PID/stat, /proc/self/fd read
    part way (readdir goes on), the main thread's task/PID/comm, /proc/self/mem, an
    O_PATH /proc/self: reopened for the restored processes, flags and offsets kept."""
    w = e2e.spawn("procfiles")
    dump_restore_verify(e2e, w, after_dump=lambda _image: reap_orphans([int(w.ready["child"])]))


def test_proc_files_new_pid(e2e):
    """With --new-pid beside the original, each /proc path names the restored copy."""
    w = e2e.spawn("procfiles")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")
    bg = e2e.ckpt_bg("restore", "-D", str(image), "--new-pid")
    new = e2e.find_restored(w.ident, exclude=w.pid, bg=bg)
    v = e2e.verify(w, new)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


@pytest.mark.parametrize(
    ("mode", "needles"),
    [
        ("outside", ["/proc/1/stat", "process 1", "not part of the dump"]),
        ("thread", ["/proc file of thread", "threads are made after the fds"]),
    ],
)
def test_proc_files_refused(e2e, mode, needles):
    w = e2e.spawn("procfiles", mode)
    image = e2e.path("img")
    res = e2e.dump(w.pid, image)
    assert_error(res, 5, f"process {w.pid}", f"fd {w.ready['fd']} ", *needles)
    assert_refused_unharmed(e2e, w, image)


# --------------------------------------------------------------- pipes and FIFOs


@pytest.mark.parametrize("mode", ["pipes", "fifos"])
def test_pipe_descriptions_restored(e2e, mode):
    """pipes: descriptions opened again through /proc/self/fd (a second reader and
    writer, O_RDWR; one whose two ends were closed; one whose read end was closed), in
    one process and across a tree. fifos: a FIFO opened by path in a parent and its
    child, and a FIFO whose path was deleted (restored as a pipe: the name stays gone).
    Each description keeps its own flags; all are one pipe again; bytes kept."""
    w = e2e.spawn("reopen", mode)
    dump_restore_verify(e2e, w, after_dump=lambda _image: reap_orphans([int(w.ready["child"])]))


# --------------------------------------------------------------- unix socket names


def test_unix_socket_deleted_names(e2e):
    """Unix sockets bound to a path that was deleted (relative and absolute; one whose
    directory is gone; one whose name another file took since): each is bound to the
    same name again and the path does not come back; connections through the listener
    (accepted, queued) and a dgram message to the deleted name are rebuilt; ckpt's
    private directory is gone afterwards."""
    tmp = tempfile.gettempdir()
    before = {p for p in os.listdir(tmp) if p.startswith("ckpt-names-")}
    w = e2e.spawn("unixnames")
    dump_restore_verify(e2e, w)
    after = {p for p in os.listdir(tmp) if p.startswith("ckpt-names-")}
    assert after <= before, f"ckpt left its private directory: {sorted(after - before)}"
