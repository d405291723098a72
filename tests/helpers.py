"""Helpers for the end-to-end tests: build the workloads, run ckpt, watch logs, clean up.

The end-to-end tests drive the real CLI (`python -m ckpt ...`) against real
processes. Every process a test creates is registered with an `E2E` object, and
`E2E.cleanup()` (run by the fixture's finalizer, even when the test fails)
SIGKILLs and reaps all of them: the workloads (our children), background ckpt
commands, and restored processes (children of ckpt, or ours once ckpt exits:
the test process is made a child subreaper so orphans come back to it).

A process is only ever killed if it is provably ours: its working directory is
inside this test's private temporary directory (every workload runs there, and
so does every ckpt we start), or it is a Popen child we hold.

Workload protocol (see tests/workloads/*.c and pywork.py): stdout+stderr go to a
regular log file opened O_APPEND; lines are `WORD [WORD] key=value ...`
(`READY pid=...`, `VERIFY OK pid=...`, `VERIFY FAIL pid=... reason=...`).
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = REPO / "tests" / "workloads"
BIN_CACHE = WORKLOADS / "bin"
PYWORK = WORKLOADS / "pywork.py"
CKPT = [sys.executable, "-m", "ckpt"]
CFLAGS = ["-O1", "-g", "-Wall", "-pthread"]

DEADLINE = 60.0  # generous: waits poll until this, nothing asserts on time
POLL = 0.02

PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------- building


def build_workloads() -> dict[str, Path]:
    """Compile every tests/workloads/*.c (once; cached by content hash) → {stem: binary}."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the test workloads (apt-get install gcc)")
    BIN_CACHE.mkdir(parents=True, exist_ok=True)
    common = b"".join(p.read_bytes() for p in sorted(WORKLOADS.glob("*.h")))
    bins = {}
    for src in sorted(WORKLOADS.glob("*.c")):
        key = hashlib.sha256(src.read_bytes() + common + " ".join(CFLAGS).encode()).hexdigest()
        out = BIN_CACHE / f"{src.stem}-{key[:12]}"
        if not out.exists():
            tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
            res = subprocess.run(
                [gcc, *CFLAGS, "-o", str(tmp), str(src)],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed:\n{res.stderr}")
            os.replace(tmp, out)
        bins[src.stem] = out
    return bins


# ---------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, str] | None:
    """/proc/PID/status as a dict, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_state(pid: int) -> str | None:
    """One-letter state (R, S, T, t, Z...) or None."""
    st = proc_status(pid)
    return st["State"][:1] if st else None


def proc_alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    s = proc_state(pid)
    return s is not None and s != "Z"


def read_link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def signal_state(pid: int) -> dict[str, str]:
    """The signal-related /proc/PID/status fields.

    `pending` is the thread and shared queues together, limited to blocked
    signals (an unblocked one, e.g. a timer tick, is only pending for an instant).
    """
    st = proc_status(pid)
    assert st is not None, f"process {pid} is gone"
    pending = (int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)) & int(st["SigBlk"], 16)
    return {
        "SigBlk": st["SigBlk"],
        "SigIgn": st["SigIgn"],
        "SigCgt": st["SigCgt"],
        "pending": f"{pending:016x}",
    }


def settled_signal_state(pid: int, expected: dict[str, str], timeout: float = 10) -> dict:
    """signal_state(pid), polled until it equals `expected` or `timeout` passes.

    A thread restarted into sigsuspend shows its own mask until it is back in
    the call (/proc then shows the call's temporary mask), so poll.
    """
    end = time.monotonic() + timeout
    while (now := signal_state(pid)) != expected and time.monotonic() < end:
        time.sleep(POLL)
    return now


NR_RT_SIGSUSPEND = 130


def resting_signal_state(pid: int, nr: int = NR_RT_SIGSUSPEND, timeout: float = 20) -> dict:
    """signal_state(pid) read while pid waits in syscall `nr` (its idle wait).

    A workload prints READY just before it enters sigsuspend, and until it is in
    the call /proc shows its own mask (SIGUSR2 blocked), not the call's temporary
    one. A state read in that window never comes back once the workload waits:
    a test comparing against it fails although nothing changed (on a loaded
    machine the workload can be preempted right after its READY write).
    """
    end = time.monotonic() + timeout
    while True:
        if current_syscall(pid) == nr:
            st = signal_state(pid)
            if current_syscall(pid) == nr:  # still (or again) in the wait: st is its state
                return st
        if time.monotonic() > end:
            raise AssertionError(f"process {pid} did not wait in syscall {nr} within {timeout}s")
        time.sleep(POLL)


def waiting_signal_state(pid: int, timeout: float = 5) -> dict:
    """signal_state(pid) read while pid is blocked in a syscall (the same one before and
    after the read): the state it comes back to whenever it waits again. Right after
    READY a workload may still be on its way into sigsuspend, whose temporary mask
    /proc shows only once it is in the call (see resting_signal_state). A process that
    never blocks within `timeout` is read as it is."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        nr = current_syscall(pid)
        if nr is not None:
            st = signal_state(pid)
            if current_syscall(pid) == nr:
                return st
        time.sleep(POLL)
    return signal_state(pid)


def current_syscall(pid: int) -> int | None:
    """Number of the syscall PID is blocked in (from /proc/PID/syscall), or None."""
    raw = read_bytes(f"/proc/{pid}/syscall")
    if not raw:
        return None
    first = raw.split()[0]
    return int(first) if first.lstrip(b"-").isdigit() else None


def maps_normalized(pid: int) -> list[str]:
    """/proc/PID/smaps as `range perms offset dev inode path [VmFlags]` lines, with
    adjacent compatible areas merged (so only real changes show).

    A restore may map two adjacent areas that the kernel had kept apart (e.g.
    different anon_vma) as one; that is not a difference that matters.
    """
    out: list[list] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("VmFlags:"):
            out[-1][7] = line.split(":", 1)[1].strip()
            continue
        parts = line.split(maxsplit=5)
        if "-" not in parts[0] or len(parts) < 5 or parts[1][:1] not in "r-":
            continue  # a smaps field line
        start, end = (int(x, 16) for x in parts[0].split("-"))
        perms, off, dev, inode = parts[1], int(parts[2], 16), parts[3], parts[4]
        out.append([start, end, perms, off, dev, inode, parts[5] if len(parts) > 5 else "", ""])
    merged: list[list] = []
    for vma in out:
        if merged:
            p = merged[-1]
            contiguous_off = vma[5] == "0" or p[3] + (p[1] - p[0]) == vma[3]
            if p[1] == vma[0] and p[2] == vma[2] and p[4:] == vma[4:] and contiguous_off:
                p[1] = vma[1]
                continue
        merged.append(vma)
    return [f"{s:x}-{e:x} {pr} {o:08x} {d} {i} {p} [{f}]" for s, e, pr, o, d, i, p, f in merged]


def dir_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below path (to prove an image unchanged)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def free_pid() -> int:
    """A PID that no process has right now (from the top of the PID space)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free pid")


def kernel_thread_pid() -> int | None:
    """PID 2 if it is kthreadd, else any visible kernel thread, else None."""

    def is_kthread(pid: int) -> bool:
        raw = read_bytes(f"/proc/{pid}/stat")
        if not raw:
            return False
        fields = raw[raw.rfind(b")") + 2 :].split()
        return bool(int(fields[6]) & 0x00200000)  # field 9: flags, PF_KTHREAD

    if is_kthread(2):
        return 2
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_kthread(int(entry)):
            return int(entry)
    return None


def become_subreaper() -> None:
    """Orphaned descendants (restored processes after ckpt exits) come back to us."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


# ---------------------------------------------------------------- ckpt runs


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"`ckpt {' '.join(self.args)}` exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}---"
        )


def assert_error(res: Result, code: int, *needles: str) -> None:
    """ckpt failed with `code`: one `ckpt: error:` line mentioning each needle, no traceback."""
    assert res.returncode == code, f"expected exit {code}\n{res}"
    assert "Traceback" not in res.stderr, f"traceback on stderr\n{res}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ckpt: error:")]
    assert len(errors) == 1, f"want exactly one 'ckpt: error:' line\n{res}"
    assert lines[-1] == errors[0], f"the error line must be the last line on stderr\n{res}"
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"error line should mention {needle!r}\n{res}"


class Background:
    """A ckpt command running in the background, output to files (never pipes)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None):
        self.args = args
        self._out = tempfile.TemporaryFile(dir=cwd)  # noqa: SIM115 - closed in cleanup()
        self._err = tempfile.TemporaryFile(dir=cwd)  # noqa: SIM115
        self.popen = subprocess.Popen(
            CKPT + args,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            cwd=cwd,
            env=env,
        )
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = DEADLINE) -> Result:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(
                f"`ckpt {' '.join(self.args)}` still running after {timeout}s"
            ) from None
        return self.result()

    def result(self) -> Result:
        def read(f) -> str:
            f.seek(0)
            return f.read().decode(errors="replace")

        rc = self.popen.returncode
        return Result(self.args, rc if rc is not None else -999, read(self._out), read(self._err))

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


# ---------------------------------------------------------------- workloads


def parse_line(line: str) -> tuple[list[str], dict[str, str]]:
    """'VERIFY FAIL pid=3 reason=a b' -> (['VERIFY', 'FAIL'], {'pid': '3', 'reason': 'a b'})."""
    words: list[str] = []
    fields: dict[str, str] = {}
    tokens = line.split(" ")
    for i, tok in enumerate(tokens):
        if tok.startswith("reason="):
            fields["reason"] = " ".join(tokens[i:])[len("reason=") :]
            break
        key, eq, value = tok.partition("=")
        if eq:
            fields[key] = value
        elif tok and not fields:
            words.append(tok)
    return words, fields


@dataclass(frozen=True)
class Ident:
    """What makes a process one of ours: same cmdline, exe and cwd as the workload."""

    cmdline: bytes
    exe: str
    cwd: str

    def matches(self, pid: int) -> bool:
        return (
            read_bytes(f"/proc/{pid}/cmdline") == self.cmdline
            and read_link(f"/proc/{pid}/exe") == self.exe
            and read_link(f"/proc/{pid}/cwd") == self.cwd
        )


@dataclass
class Verify:
    ok: bool
    pid: int
    fields: dict[str, str]
    line: str


@dataclass
class Workload:
    name: str
    popen: subprocess.Popen
    log: Path
    cwd: Path
    ready: dict[str, str] = field(default_factory=dict)
    ident: Ident | None = None

    @property
    def pid(self) -> int:
        """The original process's PID (the one READY reported; see traced.c for a grandchild)."""
        return int(self.ready["pid"]) if self.ready else self.popen.pid

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.lines()[-n:])

    def find(self, word: str, pid: int | None = None) -> list[tuple[list[str], dict[str, str]]]:
        out = []
        for line in self.lines():
            words, fields = parse_line(line)
            if words[:1] == [word] and (pid is None or fields.get("pid") == str(pid)):
                out.append((words, fields))
        return out

    def wait_for(
        self,
        word: str,
        pid: int | None = None,
        timeout: float = DEADLINE,
        watch: Background | None = None,
    ) -> tuple[list[str], dict[str, str]]:
        """Wait for a `word ...` line (from pid, if given); fail early if the writer died."""
        end = time.monotonic() + timeout
        while True:
            found = self.find(word, pid)
            if found:
                return found[-1]
            if any(line.startswith("SETUP") for line in self.lines()):
                raise AssertionError(f"{self.name} failed to set up:\n{self.tail()}")
            who = pid if pid is not None else self.popen.pid
            if not proc_alive(who) and not self.find(word, pid):
                time.sleep(0.2)  # the line may be in flight
                if not self.find(word, pid):
                    raise AssertionError(
                        f"{self.name} (pid {who}) died before printing {word}:\n{self.tail()}"
                    )
            if watch is not None and watch.poll() is not None and watch.popen.returncode != 0:
                raise AssertionError(f"ckpt failed while waiting for {word}:\n{watch.result()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"no {word} line from {self.name} in {timeout}s:\n{self.tail()}"
                )
            time.sleep(POLL)

    def reap(self, timeout: float = DEADLINE) -> int:
        """Wait for the original (our child) to exit; its Popen returncode."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.popen.pid}) did not exit") from None


class E2E:
    """One test's processes and scratch space; `cleanup()` kills and reaps all of them."""

    def __init__(self, base: Path, bins: dict[str, Path]):
        become_subreaper()
        self.base = base.resolve()
        self.bins = bins
        self.workloads: list[Workload] = []
        self.background: list[Background] = []
        self.adopted: set[int] = set()
        self.hooks: list[RoundHook] = []  # pre-copy round hooks, closed at cleanup
        self._n = 0

    # -- scratch space
    def path(self, name: str) -> Path:
        """A fresh path (not created) under this test's directory."""
        self._n += 1
        return self.base / f"{name}-{self._n}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CKPT_FAULT", None)
        env.pop("CKPT_TEST_ROUND_SOCKET", None)
        env.update(extra)
        return env

    # -- workloads
    def spawn(
        self,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = DEADLINE,
        wrapper: list[str] | None = None,
    ) -> Workload:
        """Start a workload in its own session and wait for its READY line.

        wrapper: a command that execs the workload, e.g. setpriv to run it as another user."""
        if (WORKLOADS / f"{name}.py").exists():
            argv = [sys.executable, str(WORKLOADS / f"{name}.py"), *args]
        else:
            argv = [str(self.bins[name]), *args]
        argv = [*(wrapper or []), *argv]
        cwd = self.path(name)
        cwd.mkdir()
        log = cwd.with_suffix(".log")
        with open(log, "ab") as out:  # O_APPEND: restored copies append too
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env if env is not None else self.env(),
                start_new_session=True,
            )
        w = Workload(name, popen, log, cwd)
        self.workloads.append(w)
        _, w.ready = w.wait_for("READY", pid=None, timeout=timeout)
        pid = w.pid
        w.ident = Ident(
            read_bytes(f"/proc/{pid}/cmdline") or b"",
            read_link(f"/proc/{pid}/exe") or "",
            read_link(f"/proc/{pid}/cwd") or "",
        )
        assert w.ident.cwd == str(cwd), (w.ident, cwd)
        return w

    # -- ckpt
    def ckpt(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        """Run ckpt to completion (cwd = this test's directory)."""
        bg = self.ckpt_bg(*args, env=env)
        return bg.wait(timeout)

    def ckpt_bg(self, *args: str, env: dict[str, str] | None = None) -> Background:
        bg = Background([str(a) for a in args], self.base, env if env is not None else self.env())
        self.background.append(bg)
        return bg

    def dump(self, pid: int, image: Path, *extra: str, env=None, timeout=120) -> Result:
        return self.ckpt("dump", str(pid), "-D", str(image), *extra, env=env, timeout=timeout)

    def dump_ok(self, w: Workload, image: Path, *extra: str) -> Result:
        """Dump w (default mode: ckpt kills it) and reap the original so its PID is free."""
        res = self.dump(w.pid, image, *extra)
        assert res.returncode == 0, str(res)
        if "--leave-running" not in extra:
            rc = w.reap()
            assert rc == -signal.SIGKILL, f"after dump the original exited {rc}, not SIGKILL"
        return res

    # -- restored processes
    def adopt(self, pid: int) -> None:
        """Track a restored process (not our child) for cleanup."""
        self.adopted.add(pid)

    def wait_restored(
        self,
        pid: int,
        ident: Ident,
        bg: Background | None = None,
        timeout: float = DEADLINE,
        finished=None,
    ) -> bool:
        """Wait until pid is the restored workload, fully rebuilt and no longer traced.

        Returns True once seen. A workload that verifies on its own may come and
        go before we look: if ckpt has exited and finished() is true (e.g. its
        VERIFY line is in the log), return False instead of failing.
        """
        self.adopt(pid)
        end = time.monotonic() + timeout
        while True:
            st = proc_status(pid)
            if st and st["State"][:1] != "Z" and st["TracerPid"] == "0" and ident.matches(pid):
                return True
            if bg is not None and bg.poll() is not None:
                if finished is not None and finished():
                    return False
                raise AssertionError(f"ckpt exited before pid {pid} came back:\n{bg.result()}")
            if time.monotonic() > end:
                raise AssertionError(
                    f"pid {pid} was not restored within {timeout}s (status: {st and st['State']})"
                )
            time.sleep(POLL)

    def find_restored(
        self, ident: Ident, exclude: int, bg: Background, timeout: float = DEADLINE
    ) -> int:
        """PID of the restored copy (--new-pid): matches ident, is not `exclude`, not traced."""
        end = time.monotonic() + timeout
        while True:
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in (exclude, os.getpid()):
                    continue
                pid = int(entry)
                st = proc_status(pid)
                if st and st["State"][:1] != "Z" and st["TracerPid"] == "0" and ident.matches(pid):
                    self.adopt(pid)
                    return pid
            if bg.poll() is not None:
                raise AssertionError(f"ckpt exited before the copy came back:\n{bg.result()}")
            if time.monotonic() > end:
                raise AssertionError(f"no restored copy appeared within {timeout}s")
            time.sleep(POLL)

    def verify(
        self,
        w: Workload,
        pid: int,
        sig: int | None = signal.SIGUSR2,
        timeout: float = DEADLINE,
    ) -> Verify:
        """Make pid (running w's program) verify itself; return its VERIFY line.

        The signal is re-sent every 2 s while the process lives (a workload may
        miss one sent just before it re-enters pause()). sig=None: just wait.
        """
        assert w.ident is not None
        end = time.monotonic() + timeout
        next_kick = 0.0
        while True:
            found = w.find("VERIFY", pid)
            if found:
                words, fields = found[-1]
                line = " ".join(words) + " " + " ".join(f"{k}={v}" for k, v in fields.items())
                return Verify(words[1:2] == ["OK"], pid, fields, line)
            alive = proc_alive(pid) and w.ident.matches(pid)
            if not alive:
                time.sleep(0.2)
                if not w.find("VERIFY", pid):
                    raise AssertionError(
                        f"pid {pid} ({w.name}) is gone without a VERIFY line:\n{w.tail()}"
                    )
                continue
            now = time.monotonic()
            if sig is not None and now >= next_kick:
                os.kill(pid, sig)
                next_kick = now + 2.0
            if now > end:
                raise AssertionError(f"pid {pid} ({w.name}) did not verify in {timeout}s")
            time.sleep(POLL)

    def reap_adopted(self, pid: int, timeout: float = DEADLINE) -> int | None:
        """Wait for an adopted process to exit; its exit status if it was our child."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                if not os.path.exists(f"/proc/{pid}"):
                    return None
            else:
                if got == pid:
                    return os.waitstatus_to_exitcode(status)
            time.sleep(POLL)
        raise AssertionError(f"pid {pid} did not exit")

    # -- teardown
    def remove_images(self) -> None:
        """Delete image directories (img-*, and their .tmp-* leftovers): they are big."""
        for p in self.base.glob("img-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _ours(self) -> list[int]:
        """Live processes whose cwd is inside this test's directory (never pytest itself)."""
        mine = []
        prefix = str(self.base) + os.sep
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            cwd = read_link(f"/proc/{entry}/cwd")
            if cwd and (cwd == str(self.base) or cwd.startswith(prefix)):
                mine.append(int(entry))
        return mine

    def cleanup(self) -> None:
        for hook in self.hooks:
            hook.close()
        popen_pids = {w.popen.pid for w in self.workloads} | {b.pid for b in self.background}
        victims = set(self._ours())
        seen = set(victims)
        for pid in self.adopted:
            # a restored PID we tracked: kill only if it is still one of our workloads
            if any(w.ident and w.ident.matches(pid) for w in self.workloads):
                victims.add(pid)
        for _ in range(3):  # a background ckpt may spawn a child between rounds
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for b in self.background:
                b.kill()
            for w in self.workloads:
                if w.popen.poll() is None:
                    w.popen.kill()
                w.popen.wait()
            victims = set(self._ours())
            seen |= victims
            if not victims:
                break
        # reap what came back to us (subreaper); never touch our Popen children here
        for pid in (seen | self.adopted) - popen_pids:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                try:
                    got, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if got == pid:
                    break
                time.sleep(POLL)
        for b in self.background:
            _drop_net_locks(b)
            b._out.close()
            b._err.close()


def _drop_net_locks(b: Background) -> None:
    """Delete the network lock tables a dump of this test kept for a restore that did
    not come (a dump of a process with a TCP listener keeps one: its SYN holds)."""
    with contextlib.suppress(OSError, ValueError):
        b._err.seek(0)
        text = b._err.read().decode(errors="replace")
        for name in set(re.findall(r"nftables table inet (ckpt_lock_\w+)", text)):
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


class RoundHook:
    """ckpt's pre-copy round hook: ckpt reports each finished round on a unix socket
    (CKPT_TEST_ROUND_SOCKET, ckpt/precopy.py _round_hook) and waits for the answer;
    fn(round, pid) runs here meanwhile (make the workload mutate, kill it, hold the
    snapshot...). Give ckpt env(); the E2E cleanup closes it."""

    def __init__(self, e2e: E2E, fn):
        self.fn = fn
        d = e2e.path("roundhook")
        d.mkdir()
        self.path = str(d / "round.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()
        e2e.hooks.append(self)

    def env(self) -> dict[str, str]:
        return {"CKPT_TEST_ROUND_SOCKET": self.path}

    def close(self) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    got = conn.recv(64)
                    if not got:
                        break
                    data += got
                try:
                    k, pid = (int(x) for x in data.split())
                    self.fn(k, pid)
                finally:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"k")


def wait_until(pred, timeout: float = DEADLINE, what: str = "condition"):
    """Poll pred() until truthy; return its value."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


def untraced_and_running(pid: int) -> bool:
    st = proc_status(pid)
    return bool(st) and st["TracerPid"] == "0" and st["State"][:1] in "RSD"


def image_complete(e2e: E2E, image: Path) -> bool:
    """Does `ckpt show` accept the image? (False also when it is missing.)"""
    if not image.exists():
        return False
    return e2e.ckpt("show", str(image), "--json").returncode == 0


def assert_refused_unharmed(e2e: E2E, w: Workload, image: Path) -> None:
    """After a dump that refused: no image a restore would take, and the target runs on,
    untraced, and still verifies itself (its VERIFY makes it exit 0)."""
    assert not image_complete(e2e, image)
    wait_until(lambda: untraced_and_running(w.pid), 30, "the target to run untraced")
    v = e2e.verify(w, w.pid)
    assert v.ok, v.line
    assert w.reap() == 0


# ---------------------------------------------------------------- common flows


def maps_for_compare(pid: int) -> list[str]:
    """maps_normalized, with the identity of anonymous shared memory blurred.

    A restored MAP_SHARED|MAP_ANONYMOUS area is a new shmem file (new inode, and
    it may be a memfd), which is not a difference a process can act on.
    """
    out = []
    for line in maps_normalized(pid):
        parts = line.split(maxsplit=5)
        rest = parts[5]
        if rest.startswith("/dev/zero (deleted)") or rest.startswith("/memfd:"):
            parts[4], parts[5] = "*", "<shared anonymous> " + rest[rest.rindex("[") :]
        elif " (deleted) [" in rest and not rest.startswith("/SYSV"):
            # an unlinked file is made again with O_TMPFILE (restore/unlinked.py): a new
            # inode, named <dir>/#<inode> by the kernel; its directory stays
            name = rest[: rest.index(" (deleted) [")]
            parts[4] = "*"
            parts[5] = f"{os.path.dirname(name)}/<unlinked> {rest[rest.rindex('[') :]}"
        out.append(" ".join(parts))
    return out


def assert_same_maps(before: list[str], after: list[str], what: str) -> None:
    if before != after:
        diff = "\n".join(difflib.unified_diff(before, after, "before", what, lineterm=""))
        raise AssertionError(f"/proc/PID/maps differs ({what}):\n{diff}")


def dump_restore_verify(
    e2e: E2E,
    w: Workload,
    *,
    sig: int | None = signal.SIGUSR2,
    after_dump=None,
    image: Path | None = None,
    timeout: float = DEADLINE,
) -> Verify:
    """The standard round trip, asserting every step.

    dump (default mode: ckpt kills the original; we reap it so its PID is free),
    restore in the background (ckpt waits for the restored process), wait until
    the restored process is rebuilt and untraced, compare its maps and signal
    state with the original's, make it verify itself, then check that ckpt
    exited with the workload's status (0) and that the image is unchanged.
    """
    pid = w.pid
    sig_before = waiting_signal_state(pid)
    maps_before = maps_for_compare(pid)
    image = image or e2e.path("img")
    e2e.dump_ok(w, image)
    digest = dir_digest(image)
    assert digest, "the dump wrote no files"
    if after_dump is not None:
        after_dump(image)
    bg = e2e.ckpt_bg("restore", "-D", str(image))
    verified = lambda: bool(w.find("VERIFY", pid))  # noqa: E731
    if e2e.wait_restored(pid, w.ident, bg, timeout, finished=verified if sig is None else None):
        try:
            sig_after = settled_signal_state(pid, sig_before)
            maps_after = maps_for_compare(pid)
        except (AssertionError, OSError):
            # only a workload that verifies on its own (sig=None) may be gone already
            if sig is not None or not verified():
                raise
        else:
            assert sig_after == sig_before, (
                f"signal mask/dispositions/pending set changed: {sig_before} -> {sig_after}"
            )
            assert_same_maps(maps_before, maps_after, "after restore")
    v = e2e.verify(w, pid, sig, timeout)
    res = bg.wait(timeout)
    assert v.ok, f"the restored process failed its own checks: {v.line}"
    assert res.returncode == 0, f"ckpt restore should exit with the workload's status 0\n{res}"
    assert v.pid == pid
    assert dir_digest(image) == digest, "restore modified the image"
    return v


def copies(ident: Ident) -> list[int]:
    """Live processes matching ident."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and proc_alive(int(entry)) and ident.matches(int(entry)):
            out.append(int(entry))
    return out


def assert_no_process(pid: int, timeout: float = 10) -> None:
    """After a failed restore: nothing is left at pid (a zombie handed to us is reaped)."""
    end = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        if proc_state(pid) == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > end:
            st = proc_status(pid) or {}
            raise AssertionError(
                f"a process is left at pid {pid} after a failed restore: "
                f"{st.get('Name')} state {st.get('State')}"
            )
        time.sleep(POLL)
