"""`--json` on dump, restore, snapshot, snapshots and show (docs/CLI.md, "JSON output"):
one JSON document on stdout whose values are the real ones (the dumped PID, pages,
the restored process alive and verifying), and on failure the one `ckpt: error:`
line on stderr plus `{"error", "exit_code"}` on stdout. migrate and receive: in
test_migrate.py (they need the two simulated hosts)."""

from __future__ import annotations

import json
import os
import signal
import time

from helpers import (
    DEADLINE,
    POLL,
    Background,
    Result,
    assert_error,
    free_pid,
    proc_alive,
    proc_status,
    untraced_and_running,
    wait_until,
)

PAGE = os.sysconf("SC_PAGE_SIZE")

DUMP_KEYS = {
    "pid", "image", "processes", "killed", "vmas", "pages", "bytes_raw", "bytes_stored",
    "layers", "freeze_ms", "final_pages", "seconds", "iterative", "precopy", "precopy_skipped",
    "tracker", "stop_reason", "rounds", "net_lock", "unlocked_tcp", "held_listeners", "unheld_listeners", "zombie_parent",
}  # fmt: skip
ROUND_KEYS = {
    "round", "pages_written", "pages_copied", "bytes_copied", "seconds",
    "dirty_rate_pages_s", "est_freeze_ms",
}  # fmt: skip
RESTORE_KEYS = {
    "pid", "seconds", "pages", "pages_filled", "image", "store", "snapshot", "detached",
    "externals",
}  # fmt: skip
SNAPSHOT_KEYS = {
    "id", "pid", "full", "reason", "freeze_ms", "seconds", "pages_written", "bytes_stored",
    "tracker",
}  # fmt: skip


def document(res: Result) -> dict:
    """The one JSON document of a successful command (stdout holds nothing else)."""
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)
    try:
        return json.loads(res.stdout)
    except ValueError as exc:
        raise AssertionError(f"stdout is not one JSON document ({exc})\n{res}") from None


def early_document(bg: Background, timeout: float = DEADLINE) -> dict:
    """The document a still-running ckpt (restore without --detach) printed."""
    end = time.monotonic() + timeout
    while True:
        out = bg.result().stdout
        try:
            return json.loads(out)
        except ValueError:
            pass
        if bg.poll() is not None or time.monotonic() > end:
            raise AssertionError(f"no JSON document on stdout:\n{bg.result()}")
        time.sleep(POLL)


def assert_json_error(res: Result, code: int, *needles: str) -> dict:
    """Failed with `code`: the usual one error line on stderr, and stdout's error object
    carries that line's message and the exit code."""
    assert_error(res, code, *needles)
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("ckpt: error:"))
    doc = json.loads(res.stdout)
    assert doc == {"error": line.removeprefix("ckpt: error: "), "exit_code": code}, res
    return doc


def test_dump_and_restore_json(e2e):
    """dump --json: the dumped PID, its pages and sizes, the image path; restore --json
    (waiting for the process): printed while the process runs, which then verifies,
    and ckpt still exits with its status."""
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    res = e2e.dump(w.pid, image, "--json")
    d = document(res)
    assert w.reap() == -signal.SIGKILL
    assert set(d) == DUMP_KEYS, sorted(d)
    assert d["pid"] == w.pid and d["image"] == str(image) and d["killed"] is True
    assert d["processes"] == 1 and d["vmas"] > 0 and d["layers"] == 1
    assert d["pages"] >= 16 * 2**20 // PAGE, "the workload's 16 MiB are not in the image"
    assert d["bytes_raw"] == d["pages"] * PAGE and d["bytes_stored"] > 0
    assert d["freeze_ms"] > 0 and d["seconds"] > 0
    assert d["iterative"] is False and d["rounds"] == [] and d["net_lock"] is None
    assert d["precopy"] == "none" and d["precopy_skipped"] is None, "16 MiB: copied frozen"
    assert "dumped" not in res.stderr, "--json replaces the summary line"
    shown = document(e2e.ckpt("show", str(image), "--json"))
    assert shown["process"]["pid"] == w.pid and shown["image"] == d["image"]

    bg = e2e.ckpt_bg("restore", "-D", str(image), "--json")
    e2e.wait_restored(w.pid, w.ident, bg)
    r = early_document(bg)
    assert set(r) == RESTORE_KEYS, sorted(r)
    assert r["pid"] == w.pid and r["detached"] is False and r["image"] == str(image)
    assert r["store"] is None and r["snapshot"] is None and r["externals"] == []
    assert r["pages"] > 0 and r["seconds"] > 0
    # the 16 MiB malloc'd block is anonymous memory: placed by UFFDIO_COPY; the private
    # file mapping's pages, the MADV_HUGEPAGE area's and the .data's are written
    assert 16 * 2**20 // PAGE <= r["pages_filled"] < r["pages"], r
    assert proc_status(r["pid"])["PPid"] == str(bg.pid), "ckpt waits as the process's parent"
    v = e2e.verify(w, r["pid"])
    assert v.ok and v.fields["sum"] == w.ready["sum"], v.line
    done = bg.wait()
    assert done.returncode == 0, f"ckpt exits with the process's status\n{done}"
    assert json.loads(done.stdout) == r, "one document, nothing after it"


def test_iterative_dump_json_rounds_and_detached_restore(e2e):
    """dump --iterative --leave-running --json: the pre-copy rounds with their pages;
    restore --new-pid --detach --json: a new PID that is alive and verifies while the
    original runs on."""
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    d = document(e2e.dump(w.pid, image, "--iterative", "--leave-running", "--json"))
    assert d["pid"] == w.pid and d["killed"] is False and d["iterative"] is True
    assert d["rounds"] and d["layers"] == len(d["rounds"]) + 1
    assert all(set(r) == ROUND_KEYS for r in d["rounds"]), d["rounds"]
    assert [r["round"] for r in d["rounds"]] == list(range(len(d["rounds"])))
    assert d["rounds"][0]["pages_copied"] >= 16 * 2**20 // PAGE
    assert d["rounds"][0]["bytes_copied"] == d["rounds"][0]["pages_copied"] * PAGE
    assert d["tracker"] in ("uffd-wp", "soft-dirty", "full")
    assert d["stop_reason"] in ("converged", "not-shrinking", "max-rounds", "max-time")
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")

    r = document(e2e.ckpt("restore", "-D", str(image), "--new-pid", "--detach", "--json"))
    e2e.adopt(r["pid"])
    assert r["detached"] is True and r["pid"] != w.pid
    e2e.wait_restored(r["pid"], w.ident)
    assert proc_alive(r["pid"])
    v = e2e.verify(w, r["pid"])
    assert v.ok and v.fields["sum"] == w.ready["sum"], v.line
    assert e2e.reap_adopted(r["pid"]) == 0
    v0 = e2e.verify(w, w.pid)
    assert v0.ok, v0.line
    assert w.reap() == 0


def test_snapshot_json_and_restore_from_store(e2e):
    """snapshot --json: the snapshot's id and pages; snapshots --json lists it;
    restore --store --json names the snapshot it restored, which verifies."""
    w = e2e.spawn("memory", "16")
    store = e2e.path("store")
    s = document(e2e.ckpt("snapshot", str(w.pid), "--store", str(store), "--json"))
    assert set(s) == SNAPSHOT_KEYS, sorted(s)
    assert s["pid"] == w.pid and s["full"] is True
    assert s["pages_written"] >= 16 * 2**20 // PAGE and s["bytes_stored"] > 0
    listed = document(e2e.ckpt("snapshots", str(store), "--json"))
    assert [x["id"] for x in listed["snapshots"]] == [s["id"]]

    os.kill(w.pid, signal.SIGKILL)
    assert w.reap() == -signal.SIGKILL
    res = e2e.ckpt("restore", "--store", str(store), "--at", s["id"], "--detach", "--json")
    r = document(res)
    e2e.adopt(r["pid"])
    assert r["pid"] == w.pid and r["snapshot"] == s["id"] and r["store"] == str(store)
    assert r["image"] is None and r["detached"] is True
    e2e.wait_restored(r["pid"], w.ident)
    v = e2e.verify(w, r["pid"])
    assert v.ok and v.fields["sum"] == w.ready["sum"], v.line
    assert e2e.reap_adopted(r["pid"]) == 0


def test_json_errors_are_objects_beside_the_error_line(e2e):
    """Each failing command keeps its exit code and single error line; stdout holds the
    error object (a usage error found by ckpt included)."""
    pid = free_pid()
    assert_json_error(e2e.dump(pid, e2e.path("img"), "--json"), 3, str(pid))
    assert_json_error(e2e.ckpt("restore", "--json"), 2, "exactly one of")
    missing = e2e.path("missing")
    assert_json_error(
        e2e.ckpt("restore", "-D", str(missing), "--detach", "--json"), 8, "no such image"
    )
    assert_json_error(e2e.ckpt("show", str(missing), "--json"), 8, "no such image")
    res = e2e.ckpt("snapshot", str(pid), "--store", str(e2e.path("store")), "--json")
    assert_json_error(res, 3)
    # without --json, stdout stays empty on failure
    res = e2e.dump(pid, e2e.path("img"))
    assert_error(res, 3)
    assert res.stdout == ""
