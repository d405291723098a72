"""End to end: files in flight (SCM_RIGHTS) in the receive queues of unix stream, dgram
and seqpacket sockets, dumped and restored exactly (issue 14; capture/inflight.py,
restore/inflight.py).

The workload (tests/workloads/scm.c) sends, without receiving them before the dump: a
regular file through an fd it keeps (one open file description), the same file opened
again (in flight only), the write end of a pipe holding bytes whose read end it keeps,
the read end of a pipe only the message holds, a memfd, an eventfd, one end of a
socketpair holding bytes (the other end kept), a directory and the receiving socket
itself; the receiver has SO_PASSCRED. After the restore it receives them and checks from
inside: each read returns the bytes and number of files the same sends gave on a scratch
socketpair before the dump, the credentials name the sender, the offset of the kept
description is shared, and every file works (pipe data, EOF, memfd content, eventfd
count, the socket talks both ways, the directory and the socket are the same).
"""

from __future__ import annotations

import copy
import json

import pytest
from helpers import assert_error, dump_restore_verify, untraced_and_running, wait_until
from test_tree import reap_orphans

from ckpt.image import ImageReader

TYPES = ["stream", "dgram", "seqpacket"]


def _child(w) -> int:
    return int(w.ready["child"])


@pytest.mark.parametrize("where", ["self", "child"])
@pytest.mark.parametrize("kind", TYPES)
def test_files_in_flight_restored(e2e, kind, where):
    """self: the process sent them to itself; child: the parent sent them to its child
    and closed its copies (the kept descriptions and the pipe and socketpair ends live
    in the child, a later member: sent once every member has its fds)."""
    w = e2e.spawn("scm", kind, where)
    child = _child(w)
    v = dump_restore_verify(e2e, w, after_dump=lambda _i: child and reap_orphans([child]))
    assert v.fields.get("kind") == kind


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_files_in_flight_peer_closed(e2e, kind):
    """The sending end was closed after the sends: the receiver reads every message with
    its files, then EOF (the restore keeps the other end of its pair until the data is
    in); a seqpacket queue's EOF is not taken for messages."""
    w = e2e.spawn("scm", kind, "closed")
    dump_restore_verify(e2e, w)


@pytest.mark.parametrize("kind", TYPES)
def test_files_in_flight_after_iterative_dump(e2e, kind):
    """The pre-copy dump captures the queues at the final freeze the same way."""
    w = e2e.spawn("scm", kind, "child")
    image = e2e.path("img")
    e2e.dump_ok(w, image, "--iterative")
    reap_orphans([_child(w)])
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(w.pid, w.ident, bg)
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert bg.wait().returncode == 0


def test_files_in_flight_left_running(e2e):
    """Peeking takes nothing: after dump --leave-running the original receives every
    message and file itself; the image is 6.0 and passes the schema."""
    from ckpt.schema import build_state

    w = e2e.spawn("scm", "stream", "child")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")
    v = e2e.verify(w, w.pid)
    assert v.ok, f"the original broke after dump --leave-running: {v.line}"
    with ImageReader(str(image)) as r:
        assert r.version == (6, 0)
        build_state(r.state)


def test_file_kind_in_flight_refused_before_any_round(e2e):
    """A kind ckpt does not send again (a timerfd) is refused in one line naming the
    process, the fd and the kind, at the start of an iterative dump (no pre-copy round);
    the process runs on untraced and still receives it."""
    w = e2e.spawn("scm", "refuse")
    stats = e2e.path("stats.json")
    res = e2e.dump(w.pid, e2e.path("img"), "--iterative", "--stats-json", str(stats))
    assert_error(res, 5, f"process {w.pid} (scm", "): fd ", "unix dgram socket",
                 "in flight (SCM_RIGHTS) a timerfd")  # fmt: skip
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    doc = json.loads(stats.read_text())
    assert doc["outcome"] == "failed" and doc["rounds"] == [], doc
    res = e2e.dump(w.pid, e2e.path("img"))
    assert_error(res, 5, "a timerfd")
    wait_until(lambda: untraced_and_running(w.pid), 30, "the process to run untraced")


# ---------------------------------------------------------------- format and schema


def _state(queue: list, inflight: list | None = None) -> dict:
    sock = {"ino": 5, "family": 1, "type": 2, "protocol": 0, "state": "connected",
            "queue": queue, "inflight": inflight or []}  # fmt: skip
    fd = {"fd": 3, "kind": "socket", "path": "socket:[5]", "flags": 2, "cloexec": False,
          "pos": 0, "socket": sock}  # fmt: skip
    return {"pid": 10, "fds": [fd]}


def test_state_version_of_files_in_flight():
    """Files in flight or kept credentials make the state 6.0; a queue without them keeps
    its older major (an image without files in flight is read as before)."""
    from ckpt.model import state_version

    plain = [{"data": b"x", "source": None, "fds": [], "creds": []}]
    assert state_version(_state(plain))[0] < 6
    entry = {"fd": 0, "kind": "eventfd", "path": "anon_inode:[eventfd]", "flags": 2,
             "cloexec": False, "pos": 0}  # fmt: skip
    assert state_version(_state([{"data": b"x", "fds": [0]}], [entry])) == (6, 0)
    assert state_version(_state([{"data": b"x", "creds": [10, 0, 0]}])) == (6, 0)


def test_schema_checks_files_in_flight(e2e):
    """A real state passes the schema; an index beyond the table, a kind ckpt does not
    make, a "peer" naming no open fd, a "socket" naming no socket in flight, credentials
    that are not [pid, uid, gid], files with no byte of a stream, and a socket in flight
    that itself holds files in flight are refused (before anything is restored)."""
    from ckpt.model import Fd as FdModel
    from ckpt.model import flying_socket, from_dict
    from ckpt.schema import SchemaError, build_state

    w = e2e.spawn("scm", "stream", "self")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--leave-running")
    assert res.returncode == 0, str(res)
    with ImageReader(str(image)) as r:
        state = r.state
    build_state(state)
    (i,) = [i for i, f in enumerate(state["fds"]) if (f.get("socket") or {}).get("inflight")]
    table = state["fds"][i]["socket"]["inflight"]
    kinds = [e["kind"] for e in table]
    assert kinds == ["peer", "file", "pipe", "pipe", "memfd", "eventfd", "socket", "dir",
                     "peer"], kinds  # fmt: skip
    (j,) = [j for j, f in enumerate(state["fds"]) if flying_socket(from_dict(FdModel, f))]

    def bad(change) -> None:
        s = copy.deepcopy(state)
        change(s["fds"][i]["socket"], s)
        with pytest.raises(SchemaError):
            build_state(s)

    bad(lambda sk, s: sk["queue"][0]["fds"].append(len(sk["inflight"])))
    bad(lambda sk, s: sk["inflight"][5].update(kind="timerfd"))
    bad(lambda sk, s: sk["inflight"][0].update(peer_fd=999))
    bad(lambda sk, s: sk["inflight"][6].update(obj_id=12345))
    bad(lambda sk, s: sk["queue"][0].update(creds=[1, 2]))
    bad(lambda sk, s: sk["queue"][0].update(data=b""))
    bad(lambda sk, s: s["fds"][j]["socket"].update(inflight=[dict(sk["inflight"][5], fd=0)]))
