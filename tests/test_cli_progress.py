"""The live progress line (ckpt/cli/progress.py, docs/CLI.md "Progress"): drawn in place
on a terminal while a dump runs, fed by each pre-copy round, always erased at the end
(the screen then holds exactly the status lines a pipe gets); never drawn to a pipe,
with --json or with --quiet (which also drops the status lines)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import threading

from helpers import CKPT, DEADLINE, untraced_and_running, wait_until

from ckpt.api.converge import RoundRecord
from ckpt.cli.progress import ERASE, Progress

MIB = 1 << 20


def on_pty(e2e, *args: str) -> tuple[int, str, str]:
    """ckpt with stderr on a fresh pseudo-terminal: (exit code, what the terminal got,
    stdout)."""
    master, slave = os.openpty()
    out = e2e.path("stdout")
    got: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the slave is gone
                return
            if not chunk:
                return
            got.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    with open(out, "wb") as o:
        p = subprocess.Popen(
            [*CKPT, *args], stdin=subprocess.DEVNULL, stdout=o, stderr=slave,
            cwd=e2e.base, env=e2e.env(TERM="xterm"),
        )  # fmt: skip
    os.close(slave)
    reader.start()
    try:
        rc = p.wait(DEADLINE)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        reader.join(10)
        os.close(master)
    return rc, b"".join(got).decode(errors="replace"), out.read_text()


def screen(raw: str) -> tuple[list[str], str]:
    """What a terminal shows after `raw`: (finished lines, the line the cursor is on),
    honouring carriage return and erase-to-end-of-line."""
    lines: list[str] = []
    cur, col = "", 0
    for tok in re.findall(r"\x1b\[K|\r\n|\n|\r|[^\r\n\x1b]+|\x1b", raw):
        if tok in ("\r\n", "\n"):
            lines.append(cur)
            cur, col = "", 0
        elif tok == "\r":
            col = 0
        elif tok == "\x1b[K":
            cur = cur[:col]
        else:
            cur = cur[:col] + tok + cur[col + len(tok) :]
            col += len(tok)
    return lines, cur


def test_iterative_dump_draws_progress_on_a_terminal(e2e):
    """dump --iterative on a terminal: the progress line names the dump and, after a
    round, its number, pages and rate; at the end it is gone and the screen holds the
    round lines and the summary, as on a pipe."""
    w = e2e.spawn("writer", "mib=16", "rate=2000", "report=0")
    rc, raw, stdout = on_pty(
        e2e, "dump", str(w.pid), "-D", str(e2e.path("img")), "--iterative", "--max-rounds", "3"
    )
    assert rc == 0, raw
    assert w.reap() == -signal.SIGKILL
    assert stdout == ""
    assert ERASE in raw, f"no progress line drawn:\n{raw!r}"
    drawn = [seg.split("\r")[0] for seg in raw.split(ERASE)[1:]]
    assert any(d.startswith(f"dump {w.pid}") for d in drawn), drawn
    assert any(re.search(r" s · round 0: \d+ pages at [\d.]+ MiB/s", d) for d in drawn), drawn
    lines, cursor = screen(raw)
    assert cursor == "", f"the progress line was left on the screen: {cursor!r}"
    assert not any(ln.startswith(f"dump {w.pid}") for ln in lines), lines
    rounds = [ln for ln in lines if re.match(r"round +\d+:", ln)]
    rest = [ln for ln in lines if ln not in rounds and not ln.startswith("note: ")]
    assert rounds and lines[: len(rounds)] == rounds, lines
    assert len(rest) == 1 and rest[0].startswith(f"dumped {w.pid}"), f"only status lines:\n{lines}"


def test_no_progress_with_quiet_or_json(e2e):
    """--quiet on a terminal: nothing drawn and no status lines; --json: the status lines
    stay (no summary), nothing drawn."""
    w = e2e.spawn("memory", "16")
    rc, raw, stdout = on_pty(
        e2e, "dump", str(w.pid), "-D", str(e2e.path("img")), "--iterative", "--leave-running",
        "--quiet",
    )  # fmt: skip
    assert rc == 0, raw
    assert raw == "" and stdout == "", f"--quiet printed {raw!r}"
    wait_until(lambda: untraced_and_running(w.pid), 30, "the original to run untraced")
    rc, raw, stdout = on_pty(
        e2e, "dump", str(w.pid), "-D", str(e2e.path("img")), "--iterative", "--json"
    )
    assert rc == 0, raw
    assert w.reap() == -signal.SIGKILL
    assert ERASE not in raw and "\x1b" not in raw, raw
    assert re.search(r"round +0:", raw) and "dumped" not in raw, raw
    assert stdout.lstrip().startswith("{")


def test_errors_erase_the_progress_line(e2e):
    """A dump that fails on a terminal: its error line stays on a clean line, last."""
    w = e2e.spawn("memory", "16")
    image = e2e.path("img")
    image.mkdir()
    (image / "x").write_text("taken")
    rc, raw, _ = on_pty(e2e, "dump", str(w.pid), "-D", str(image), "--iterative")
    assert rc != 0
    lines, cursor = screen(raw)
    assert cursor == "" and lines and lines[-1].startswith("ckpt: error:"), (lines, cursor)


def test_migration_rounds_feed_the_progress_line():
    """The migration's round records (api/converge.py) drive the progress line of
    `ckpt migrate` (Controller hands each to migrate()'s on_round)."""
    rec = RoundRecord(
        round=2, pages_written=1234, pages_copied=1234, bytes_raw=48 * MIB,
        bytes_wire=12 * MIB, seconds=0.25, wire_mib_s=48.4, dirty_rate_pages_s=100.0,
        est_freeze_ms=30.0, throttle=0.2, throttle_next=0.4, last=False,
    )  # fmt: skip
    stream = io.StringIO()
    with Progress("migrate 42 to host:1", stream, width=200) as p:
        p.migrate_round(rec)
        p.migrate_round(rec)
    drawn = [seg for seg in stream.getvalue().split(ERASE) if seg]
    assert re.fullmatch(r"migrate 42 to host:1 · \d+\.\d s", drawn[0]), drawn
    want = (
        "round 2: 1234 pages, 96.0 MiB sent, 24.0 MiB on the wire (48.4 MiB/s), throttle  20% → 40%"
    )
    assert any(d.endswith(f" s · {want}") for d in drawn), drawn
    assert stream.getvalue().endswith(ERASE), "the line is erased at the end"
