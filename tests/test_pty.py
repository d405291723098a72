"""Pseudo-terminal pairs inside the dumped tree (issue 14: "a session leader holding its
controlling terminal, and the master side of a pty, as a shell job or tmux-like program
has them").

tests/workloads/pty.c is the tmux shape: P holds the master, its child C made a session
with the slave as controlling terminal on fds 0-2, and C's child G is the terminal's
foreground group, reading lines. The restore makes a new pair: P writes a line to its
master and G's answer arrives; P, G and C each check from inside their master, terminal,
session, group, foreground group, modes (ECHO off, VINTR ^G) and window size (33x101).
Output G wrote that P had not read at the dump is read by P after the restore, once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import DEADLINE, POLL, Workload, assert_error, image_complete, untraced_and_running


def command(w: Workload, pid: int, text: str) -> None:
    """A command for P (pty.c): the file "cmd" in its directory, then SIGUSR2."""
    tmp = w.cwd / "cmd.tmp"
    tmp.write_text(text + "\n")
    tmp.rename(w.cwd / "cmd")
    os.kill(pid, signal.SIGUSR2)


def count(w: Workload, word: str, pid: int | None = None, **want: str) -> int:
    return sum(
        all(f.get(k) == v for k, v in want.items()) for _, f in w.find(word, pid)
    )  # fmt: skip


def wait_new(w: Workload, word: str, pid: int, before: int) -> tuple[list[str], dict[str, str]]:
    """The first `word` line of pid after the `before` it had printed."""
    end = time.monotonic() + DEADLINE
    while True:
        found = w.find(word, pid)
        if len(found) > before:
            return found[before]
        if time.monotonic() > end:
            raise AssertionError(f"no new {word} line from {pid}:\n{w.tail()}")
        time.sleep(POLL)


class Mux:
    """The three processes of pty.c and what they report."""

    def __init__(self, w: Workload):
        self.w = w
        self.p = w.pid
        self.c = int(w.ready["child"])
        self.g = int(w.ready["gchild"])

    def ping(self, token: str) -> None:
        command(self.w, self.p, f"ping {token}")
        end = time.monotonic() + DEADLINE
        while not count(self.w, "PONG", self.g, got=token):
            assert time.monotonic() < end, f"no PONG {token}:\n{self.w.tail()}"
            time.sleep(POLL)

    def verify(self, token: str) -> str:
        """Every process checks itself; returns the terminal's name they agree on."""
        n = {w: len(self.w.find(w, pid)) for w, pid in
             (("MVERIFY", self.p), ("VERIFY", self.g), ("LVERIFY", self.c))}  # fmt: skip
        command(self.w, self.p, f"verify {token}")
        words, m = wait_new(self.w, "MVERIFY", self.p, n["MVERIFY"])
        assert words[1:2] == ["OK"], m
        words, v = wait_new(self.w, "VERIFY", self.g, n["VERIFY"])
        assert words[1:2] == ["OK"], v
        words, lv = wait_new(self.w, "LVERIFY", self.c, n["LVERIFY"])
        assert words[1:2] == ["OK"], lv
        assert v["got"] == token
        assert v["tty"] == m["tty"] == lv["tty"], (m, v, lv)  # the pair's slave, by its name
        assert v["sid"] == lv["sid"] == str(self.c), (v, lv)  # C leads G's session
        assert v["pgid"] == lv["fg"] == str(self.g), (v, lv)  # G's group in the foreground
        return m["tty"]

    def hold(self, token: str) -> None:
        """G writes a line P does not read: it stays queued for the master."""
        n = len(self.w.find("HOLDING", self.p))
        command(self.w, self.p, f"hold {token}")
        _, h = wait_new(self.w, "HOLDING", self.p, n)
        assert int(h["n"]) == len(f"SAID got={token}\r\n"), h

    def resume(self) -> None:
        n = len(self.w.find("RESUMED", self.p))
        command(self.w, self.p, "resume")
        wait_new(self.w, "RESUMED", self.p, n)

    def said(self, token: str, times: int) -> None:
        end = time.monotonic() + DEADLINE
        while count(self.w, "SAID", got=token) < times:
            assert time.monotonic() < end, f"SAID {token} not {times}x:\n{self.w.tail()}"
            time.sleep(POLL)
        time.sleep(0.3)  # nothing more comes
        assert count(self.w, "SAID", got=token) == times, self.w.tail()


def reap_tree(e2e, mux: Mux) -> None:
    """C and G, killed with P, come back to us (the subreaper): their PIDs must be free."""
    for pid in (mux.c, mux.g):
        e2e.adopt(pid)
        e2e.reap_adopted(pid)


def restore(e2e, mux: Mux, image) -> None:
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    for pid in (mux.p, mux.c, mux.g):
        e2e.wait_restored(pid, mux.w.ident, bg)


@pytest.mark.parametrize(
    "extra,mode",
    [((), ()), (("--iterative",), ()), ((), ("packet",))],
    ids=["plain", "iterative", "packet"],
)
def test_pty_pair_in_the_tree(e2e, extra, mode):
    w = e2e.spawn("pty", "mux", *mode)
    mux = Mux(w)
    mux.ping("a1")
    before = mux.verify("v1")
    assert before == w.ready["tty"]
    mux.hold("q1")  # queued for the master at the dump
    image = e2e.path("img")
    e2e.dump_ok(w, image, *extra)
    reap_tree(e2e, mux)
    restore(e2e, mux, image)
    mux.resume()
    mux.said("q1", 1)  # read once, after the restore: kept exactly
    after = mux.verify("v2")  # a new pair, maybe another number
    assert os.path.exists(after)
    mux.ping("z9")  # P writes to its master, G reads it and answers
    for pid in (mux.c, mux.g):  # the kernel agrees with what they report
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[4]) == os.stat(after).st_rdev, (pid, stat[:8])
        assert int(stat[5]) == mux.g, stat[:8]  # tpgid: G's group in the foreground


def test_pty_pair_left_running(e2e):
    """--leave-running: the queued output is read and queued again at once, so the
    original reads it as if nothing happened; the image has it too."""
    w = e2e.spawn("pty", "mux")
    mux = Mux(w)
    mux.hold("q2")
    image = e2e.path("img")
    res = e2e.dump(mux.p, image, "--leave-running")
    assert res.returncode == 0, str(res)
    for pid in (mux.p, mux.c, mux.g):
        assert untraced_and_running(pid) or os.path.exists(f"/proc/{pid}")
    mux.resume()
    mux.said("q2", 1)
    mux.verify("v3")
    for pid in (mux.g, mux.c, mux.p):
        os.kill(pid, signal.SIGKILL)
    w.reap()
    reap_tree(e2e, mux)
    restore(e2e, mux, image)
    mux.resume()
    mux.said("q2", 2)  # once from the original, once from the restored copy
    mux.verify("v4")
    mux.ping("z8")


def test_pty_refused(e2e):
    """Input typed into the pty that its slave side has not read, another line
    discipline, and a slave open outside the tree: refused in one line, the tree runs on."""
    w = e2e.spawn("pty", "mux")
    mux = Mux(w)
    slave = os.open(w.ready["tty"], os.O_RDWR | os.O_NOCTTY)
    try:
        for extra in ((), ("--iterative",)):  # the preflight refuses before any round
            res = e2e.dump(mux.p, e2e.path("img"), *extra)
            assert_error(res, 5, w.ready["tty"], f"also open in process {os.getpid()}")
            assert "round" not in res.stderr, res.stderr
    finally:
        os.close(slave)
    mux.ping("b1")

    w2 = e2e.spawn("pty", "mux")
    mux2 = Mux(w2)
    command(w2, mux2.p, "ldisc")
    _, ld = w2.wait_for("LDISC", mux2.p)
    assert ld["ok"] == "1", ld
    res = e2e.dump(mux2.p, e2e.path("img"))
    assert_error(res, 5, "fd 3", "line discipline 27, not N_TTY")
    assert untraced_and_running(mux2.p)

    command(w, mux.p, "nap n1")  # G stops reading; "pending n1" waits for the slave side
    w.wait_for("NAPPING", mux.p)
    image = e2e.path("img")
    res = e2e.dump(mux.p, image)
    assert_error(res, 5, "fd 3", "wait to be read by its slave side")
    assert not image_complete(e2e, image)
    for pid in (mux.p, mux.c, mux.g):
        assert untraced_and_running(pid), pid


def test_pty_image_format(e2e):
    """The new kinds make the state 6.0 (a 5.x reader refuses the major; a 6.0 reader
    from before them refuses the kinds), and the schema checks them before anything is
    built: a slave naming a pair the image lacks, a controlling terminal on a process
    that leads no session, a struct termios of another size."""
    import copy

    from ckpt.image import ImageReader
    from ckpt.model import fd_needs_v6, state_version
    from ckpt.schema import SchemaError, build_state

    w = e2e.spawn("pty", "mux")
    mux = Mux(w)
    image = e2e.path("img")
    res = e2e.dump(mux.p, image, "--leave-running")
    assert res.returncode == 0, str(res)
    with ImageReader(str(image)) as r:
        state = r.state
    procs = [state, *state["tree"]]
    kinds = {f["kind"] for p in procs for f in p["fds"]}
    assert {"ptmx", "pts", "ctty"} <= kinds, kinds
    assert all(fd_needs_v6({"kind": k}) for k in ("ptmx", "pts", "ctty"))
    assert state_version(state) == (6, 0)
    build_state(state)
    c = next(p for p in procs if p["pid"] == mux.c)
    ctty = next(i for i, f in enumerate(c["fds"]) if f["kind"] == "ctty")
    pts = next(i for i, f in enumerate(c["fds"]) if f["kind"] == "pts")
    master = next(f for f in state["fds"] if f["kind"] == "ptmx")
    assert c["fds"][ctty]["tty"]["pgid"] == mux.g  # the foreground group
    assert master["pty"]["winsize"][:4] == bytes([33, 0, 101, 0])

    def broken(change) -> None:
        s = copy.deepcopy(state)
        change(s, next(p for p in [s, *s["tree"]] if p["pid"] == mux.c))
        with pytest.raises(SchemaError):
            build_state(s)

    broken(lambda s, c: c["fds"][pts].update(obj_id=99))
    broken(lambda s, c: c["fds"][ctty].update(fd=7))
    broken(lambda s, c: c.update(sid=mux.p))  # a ctty, but no session leader
    broken(lambda s, c: next(f for f in s["fds"] if f["kind"] == "ptmx")["pty"].update(
        termios=b"\0" * 35))  # fmt: skip
    mux.ping("f1")  # the original runs on
