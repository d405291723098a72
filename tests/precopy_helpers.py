"""Helpers for tests/test_precopy.py: trackers, the round hook, iterative dumps,
the "nothing left behind" checks and restore + verify of the writer workload.

Builds on tests/helpers.py (the E2E fixture kills and reaps everything a test
starts; see its docstring). The workload is tests/workloads/writer.c.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    CKPT,
    DEADLINE,
    E2E,
    POLL,
    Result,
    RoundHook,
    Verify,
    Workload,
    maps_for_compare,
    parse_line,
    proc_alive,
    proc_state,
    proc_status,
    signal_state,
)

TRACKERS = ("uffd-wp", "soft-dirty", "full")
STOP_REASONS = {"converged", "not-shrinking", "max-rounds", "max-time", "once"}
ROUND_KEYS = (
    "round",
    "pages_written",
    "pages_copied",
    "bytes_copied",
    "seconds",
    "dirty_rate_pages_s",
    "est_freeze_ms",
)
UFFD_LINK = "anon_inode:[userfaultfd]"

# ---------------------------------------------------------------- trackers


@functools.lru_cache(maxsize=1)
def kernel_features() -> dict:
    """`ckpt check --json` (once per session)."""
    res = subprocess.run(
        [*CKPT, "check", "--json"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, f"ckpt check --json failed ({res.returncode}):\n{res.stderr}"
    return json.loads(res.stdout)


def tracker_unavailable(name: str) -> str | None:
    """Why `name` cannot work on this kernel (a skip reason), or None."""
    f = kernel_features()
    if name == "soft-dirty" and not f.get("soft_dirty"):
        return "kernel lacks soft-dirty (CONFIG_MEM_SOFT_DIRTY off); tests/test_vm_kernel.py runs it on Debian 6.1 in a VM"
    if name == "uffd-wp" and not (
        f.get("uffd_wp_async", f.get("wp_async_anon")) and f.get("pagemap_scan")
    ):
        return "kernel lacks async uffd-wp + PAGEMAP_SCAN (Linux 6.7+)"
    return None


def need_tracker(name: str) -> str:
    reason = tracker_unavailable(name)
    if reason:
        pytest.skip(reason)
    return name


# ---------------------------------------------------------------- the round hook


class Hook:
    """One test's round hook: ckpt reports each finished pre-copy round on a unix
    socket (CKPT_TEST_ROUND_SOCKET, precopy._round_hook) and waits for the answer, so
    the test can act between rounds. Its log says which rounds ran and what it did.

    steps: SIGUSR1 the writer and wait for its `STEP <n> DONE` (n = this call's number);
    kill_at: SIGKILL the target after that round instead; nap: wait that long afterwards
    (seconds; lets the writer dirty pages)."""

    def __init__(
        self,
        e2e: E2E,
        w: Workload,
        *,
        steps: bool = False,
        kill_at: int | None = None,
        nap: float = 0.0,
    ):
        self.dir = e2e.path("hook")
        self.dir.mkdir()
        self.log = self.dir / "hook.log"
        self.log.touch()
        self.wlog = Path(w.log)
        self.steps, self.kill_at, self.nap = steps, kill_at, nap
        self.server = RoundHook(e2e, self._round)

    def env(self) -> dict[str, str]:
        return self.server.env()

    def _note(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def _round(self, k: int, pid: int) -> None:
        self._note(f"HOOK round={k} pid={pid}")
        if any(ln.startswith("KILLED ") for ln in self.lines()):
            return  # killed in an earlier round; ckpt may not have noticed yet
        if self.kill_at == k:
            os.kill(pid, signal.SIGKILL)
            self._note(f"KILLED round={k} pid={pid}")
            return
        if self.steps:
            n = sum(ln.startswith("HOOK ") for ln in self.lines())
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                self._note(f"GONE step={n}")
                return
            done = re.compile(rf"^STEP {n} DONE pid={pid}( |$)", re.M)
            end = time.monotonic() + DEADLINE
            while not done.search(self.wlog.read_text(errors="replace")):
                if (proc_state(pid) or "Z") == "Z":
                    self._note(f"GONE step={n}")
                    return
                if time.monotonic() > end:
                    self._note(f"TIMEOUT step={n}")
                    return
                time.sleep(0.01)
            self._note(f"STEPPED round={k} step={n}")
        if self.nap:
            time.sleep(self.nap)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def rounds(self) -> list[int]:
        return [int(parse_line(ln)[1]["round"]) for ln in self.lines() if ln.startswith("HOOK ")]

    def stepped(self) -> dict[int, int]:
        """{step: the round after which the hook ran it}."""
        out = {}
        for ln in self.lines():
            if ln.startswith("STEPPED "):
                f = parse_line(ln)[1]
                out[int(f["step"])] = int(f["round"])
        return out

    def __str__(self) -> str:
        return "hook log:\n" + "\n".join(self.lines())


# ---------------------------------------------------------------- iterative dumps


def dump_args(
    pid: int,
    image: Path,
    *,
    tracker: str | None = None,
    leave_running: bool = False,
    max_rounds: int | None = None,
    target_downtime_ms: float | None = None,
    max_time: float | None = None,
    stats: Path | None = None,
) -> list[str]:
    args = ["dump", "--iterative", str(pid), "-D", str(image)]
    if leave_running:
        args.append("--leave-running")
    if tracker is not None:
        args += ["--tracker", tracker]
    if max_rounds is not None:
        args += ["--max-rounds", str(max_rounds)]
    if target_downtime_ms is not None:
        args += ["--target-downtime-ms", f"{target_downtime_ms:g}"]
    if max_time is not None:
        args += ["--max-time", f"{max_time:g}"]
    if stats is not None:
        args += ["--stats-json", str(stats)]
    return args


def dump_env(e2e: E2E, hook: Hook | None = None, fault: str | None = None) -> dict[str, str]:
    env = e2e.env()
    env.pop("CKPT_TEST_ROUND_SOCKET", None)
    if hook is not None:
        env.update(hook.env())
    if fault is not None:
        env["CKPT_FAULT"] = fault
    return env


def load_stats(path: Path, res: Result) -> dict:
    assert path.exists(), f"--stats-json wrote no {path}\n{res}"
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise AssertionError(
            f"--stats-json is not JSON ({exc}):\n{path.read_text()[:2000]}"
        ) from None


def check_stats(stats: dict, tracker: str, what: str = "") -> None:
    """The --stats-json contract (DESIGN: the pre-copy loop)."""
    ctx = f"{what}\nstats: {json.dumps(stats, indent=1)[:4000]}"
    assert stats.get("tracker") == tracker, f"stats tracker {stats.get('tracker')!r}{ctx}"
    rounds = stats.get("rounds")
    assert isinstance(rounds, list) and rounds, f"no pre-copy rounds in the stats{ctx}"
    for i, r in enumerate(rounds):
        missing = [k for k in ROUND_KEYS if k not in r]
        assert not missing, f"round {i} lacks {missing}{ctx}"
        assert r["round"] == i, f"rounds are not numbered 0, 1, ...{ctx}"
        assert r["pages_copied"] >= 0 and r["bytes_copied"] >= 0, ctx
    final = stats.get("final")
    assert isinstance(final, dict), f"no final round in the stats{ctx}"
    for k in ("round", "pages_copied", "freeze_ms"):
        assert k in final, f"final lacks {k!r}{ctx}"
    assert final["round"] > rounds[-1]["round"], f"the final round must come last{ctx}"
    assert final["freeze_ms"] >= 0, ctx
    assert stats.get("stop_reason") in STOP_REASONS, f"bad stop_reason{ctx}"
    assert isinstance(stats.get("layers"), int) and stats["layers"] >= 2, (
        f"want >= 2 layers (round 0 + final){ctx}"
    )
    assert stats.get("bytes_stored", 0) > 0, f"bytes_stored{ctx}"
    assert stats.get("total_seconds", 0) > 0, f"total_seconds{ctx}"


def layer_count(show: dict) -> int:
    """Number of layers in `ckpt show --json` output ("layers": n, [..] or {"layers": [..]})."""
    lay = show.get("layers")
    if isinstance(lay, dict):
        lay = lay.get("layers", lay.get("count"))
    if isinstance(lay, list):
        return len(lay)
    if isinstance(lay, int) and not isinstance(lay, bool):
        return lay
    raise AssertionError(f"`ckpt show --json` has no layer list: {str(lay)[:500]}")


def show_json(e2e: E2E, image: Path) -> dict:
    res = e2e.ckpt("show", str(image), "--json")
    assert res.returncode == 0, str(res)
    return json.loads(res.stdout)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- nothing left behind


def maps_without_sd(pid: int) -> list[str]:
    """helpers.maps_for_compare without the `sd` VmFlag: soft-dirty tracking clears
    it (clear_refs) and nothing can set it back; a new mapping has it again."""
    out = []
    for line in maps_for_compare(pid):
        head, _, flags = line.rpartition("[")
        kept = " ".join(f for f in flags.rstrip("]").split() if f != "sd")
        out.append(f"{head}[{kept}]")
    return out


def fd_listing(pid: int) -> dict[int, str]:
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            pass
    return out


def uw_areas(pid: int) -> list[str]:
    """smaps areas whose VmFlags still carry `uw` (uffd-wp registered)."""
    out, area = [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            area = line
        elif line.startswith("VmFlags:") and "uw" in line.split()[1:]:
            out.append(area)
    return out


def leftovers(pid: int, sig_before: dict, fds_before: dict | None) -> list[str]:
    """What a finished or killed dump left in the target (empty list: nothing)."""
    st = proc_status(pid)
    if st is None or st["State"][:1] == "Z":
        return ["the target is gone"]
    problems = []
    if st["TracerPid"] != "0":
        problems.append(f"TracerPid {st['TracerPid']}")
    if st["State"][:1] not in "RSD":
        problems.append(f"state {st['State']}")
    try:
        fds = fd_listing(pid)
        uw = uw_areas(pid)
        sig = signal_state(pid)
    except (FileNotFoundError, ProcessLookupError, AssertionError):
        return ["the target is gone"]
    uffd = [fd for fd, link in fds.items() if link == UFFD_LINK]
    if uffd:
        problems.append(f"userfaultfd fds {uffd}")
    if fds_before is not None and fds != fds_before:
        problems.append(f"fds changed: {fds_before} -> {fds}")
    if uw:
        problems.append(f"{len(uw)} areas still uffd-wp registered (uw), e.g. {uw[0]}")
    if sig != sig_before:
        problems.append(f"signal state {sig_before} -> {sig}")
    return problems


def assert_left_clean(
    pid: int, sig_before: dict, fds_before: dict | None, what: str, timeout: float = 15
) -> None:
    """Poll (the kernel releases a dead ckpt's uffd asynchronously) until the target
    runs untraced with nothing of ckpt's left in it."""
    end = time.monotonic() + timeout
    while True:
        problems = leftovers(pid, sig_before, fds_before)
        if not problems:
            return
        if time.monotonic() > end:
            raise AssertionError(f"the target is not as it was ({what}): " + "; ".join(problems))
        time.sleep(POLL)


# ---------------------------------------------------------------- the writer


def log_len(w: Workload) -> int:
    return len(w.lines())


def find_after(w: Workload, start: int, word: str, pid: int | None = None):
    out = []
    for line in w.lines()[start:]:
        words, fields = parse_line(line)
        if words[:1] == [word] and (pid is None or fields.get("pid") == str(pid)):
            out.append((words, fields, line))
    return out


def last_total(w: Workload, pid: int, end: int | None = None) -> int:
    """The writer's page-write count in its last RATE line (0 if none)."""
    total = 0
    for line in w.lines()[:end]:
        words, fields = parse_line(line)
        if words[:1] == ["RATE"] and fields.get("pid") == str(pid):
            total = int(fields["total"])
    return total


def steps_done(w: Workload, pid: int, end: int | None = None) -> int:
    n = 0
    for line in w.lines()[:end]:
        words, fields = parse_line(line)
        if words[:1] == ["STEP"] and words[2:3] == ["DONE"] and fields.get("pid") == str(pid):
            n = max(n, int(words[1]))
    return n


def verify_after(e2e: E2E, w: Workload, pid: int, start: int, timeout: float = DEADLINE) -> Verify:
    """SIGUSR2 pid until it prints a VERIFY line after log line `start` (a restored
    copy at the same PID as the original must not be taken for it)."""
    assert w.ident is not None
    end = time.monotonic() + timeout
    next_kick = 0.0
    while True:
        found = find_after(w, start, "VERIFY", pid)
        if found:
            words, fields, line = found[-1]
            return Verify(words[1:2] == ["OK"], pid, fields, line)
        if not (proc_alive(pid) and w.ident.matches(pid)):
            time.sleep(0.2)
            if not find_after(w, start, "VERIFY", pid):
                tail = "\n".join(w.lines()[start:][-20:])
                raise AssertionError(f"pid {pid} is gone without a VERIFY line:\n{tail}")
            continue
        now = time.monotonic()
        if now >= next_kick:
            os.kill(pid, signal.SIGUSR2)
            next_kick = now + 2.0
        if now > end:
            raise AssertionError(f"pid {pid} did not verify in {timeout}s")
        time.sleep(POLL)


def restore_and_verify(e2e: E2E, w: Workload, image: Path, pid: int) -> Verify:
    """Restore image (at pid, which must be free) and make the copy verify itself;
    ckpt restore waits for it and must exit 0 with it."""
    start = log_len(w)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    e2e.wait_restored(pid, w.ident, bg)
    v = verify_after(e2e, w, pid, start)
    res = bg.wait()
    assert v.ok, f"the restored writer failed its own checks: {v.line}"
    assert res.returncode == 0, f"ckpt restore should exit with the workload's status 0\n{res}"
    return v
