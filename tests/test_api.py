"""The Python API (docs/API.md), used as a program embedding ckpt would: a separate
Python process imports ckpt.api, dumps (with pre-copy) or snapshots a workload,
restores it detached, and reports JSON; the restored workload proves its memory
with its own checksum, as in the CLI tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import DEADLINE, assert_no_process

EMBED = textwrap.dedent(
    """
    import json, sys
    from ckpt import api
    from ckpt.errors import CkptError
    from ckpt.precopy import Policy

    mode, pid, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = {}
    try:
        if mode == "dump":
            opts = api.DumpOptions(iterative=True, policy=Policy(max_rounds=3),
                                   stats_json=where + ".stats.json")
            r = api.dump(pid, where, opts)
            out["dump"] = {"rounds": len(r.rounds), "freeze_ms": r.freeze_ms, "pages": r.pages}
            restored = api.restore(where, new_pid=True, detach=True)
        else:
            first = api.snapshot(pid, where)
            second = api.snapshot(pid, where, api.SnapshotOptions(tree=False))
            out["snapshots"] = [[s.id, s.full] for s in (first, second)]
            restored, sid = api.restore_snapshot(where, None, new_pid=True, detach=True)
            out["restored_id"] = sid
        out["pid"] = restored.pid
    except CkptError as exc:
        out = {"error": str(exc), "exit_code": exc.exit_code}
    try:
        api.dump(pid, where + "-x", no_such_option=True)
    except TypeError:
        out["unknown_option"] = "TypeError"
    print(json.dumps(out))
    """
)


def embed(e2e, mode: str, pid: int, where) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", EMBED, mode, str(pid), str(where)],
        capture_output=True, text=True, timeout=DEADLINE * 4, cwd=e2e.base, env=e2e.env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def test_dump_and_restore_from_python(e2e):
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    out = embed(e2e, "dump", w.pid, image)
    assert "error" not in out, out
    assert out["dump"]["rounds"] >= 1 and out["dump"]["pages"] > 0, out
    assert out["unknown_option"] == "TypeError"
    stats = json.loads(Path(f"{image}.stats.json").read_text())
    assert stats["outcome"] == "dumped" and len(stats["rounds"]) == out["dump"]["rounds"]
    w.reap()
    pid = out["pid"]
    e2e.adopt(pid)
    v = e2e.verify(w, pid)
    assert v.ok, v.line
    assert v.fields["sum"] == w.ready["sum"], "memory checksum differs from the one at READY"


def test_snapshot_and_restore_from_python(e2e):
    w = e2e.spawn("memory", "16")
    out = embed(e2e, "snapshot", w.pid, e2e.path("store"))
    assert "error" not in out, out
    (id1, full1), (id2, full2) = out["snapshots"]
    assert not full2, "the second snapshot should be incremental"
    assert full1 and id1 != id2 and out["restored_id"] == id2, out
    pid = out["pid"]
    e2e.adopt(pid)
    assert pid != w.pid
    v = e2e.verify(w, pid)
    assert v.ok, v.line
    assert v.fields["sum"] == w.ready["sum"]
    v0 = e2e.verify(w, w.pid)  # the original ran on through both snapshots
    assert v0.ok, v0.line


def test_refusal_is_an_exception_with_its_exit_code(e2e):
    out = embed(e2e, "dump", 999999999, e2e.path("img"))
    assert out["exit_code"] == 3 and "999999999" in out["error"], out
    assert_no_process(999999999, timeout=1)
