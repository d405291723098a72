"""A live progress line at the bottom of the terminal while a dump or a migration runs.

Only when stderr is a terminal (and neither --json nor --quiet): the line is redrawn in
place (carriage return, erase line) every TICK seconds with the elapsed time, and after
each pre-copy round with its numbers. Status lines printed meanwhile go above it (the
App erases the line, prints, redraws), and it is erased when the work ends, so what
stays on the screen is exactly what a pipe gets. Nothing of it reaches a file or pipe.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from .app import human

TICK = 0.2
ERASE = "\r\x1b[K"
MIB = float(1 << 20)


def wanted(stream: TextIO) -> bool:
    """Is `stream` a terminal that can take a line redrawn in place?"""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def _width(stream: TextIO) -> int:
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        cols = 0
    return cols if cols > 0 else 80


class Progress:
    """The progress line of one piece of work, `title` first. Use as a context manager
    (App.progress), feed it with on_round() / migrate_line(); all writes hold `lock`."""

    def __init__(self, title: str, stream: TextIO | None = None, width: int = 0) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.width = width  # 0: the terminal's (80 if it does not say)
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.detail = ""
        self.copied = 0.0  # bytes pre-copied so far
        self.wire = 0.0  # of which on the wire (a migration)
        self._shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- feeding
    def on_round(self, r) -> None:
        """A finished pre-copy round of a dump (precopy.RoundStats)."""
        self.copied += r.bytes_copied
        rate = r.bytes_copied / MIB / r.seconds if r.seconds > 0 else 0.0
        self.set(
            f"round {r.round}: {r.pages_copied} pages at {rate:.1f} MiB/s, "
            f"{human(self.copied)} copied, est. freeze {r.est_freeze_ms:.1f} ms"
        )

    def migrate_round(self, rec) -> None:
        """A finished pre-copy round of a migration (api/converge.py RoundRecord)."""
        self.copied += rec.bytes_raw
        self.wire += rec.bytes_wire
        thr = f"throttle {rec.throttle * 100:3.0f}%"
        if rec.throttle_next != rec.throttle:
            thr += f" → {rec.throttle_next * 100:.0f}%"
        self.set(
            f"round {rec.round}: {rec.pages_written} pages, {human(self.copied)} sent, "
            f"{human(self.wire)} on the wire ({rec.wire_mib_s:.1f} MiB/s), {thr}"
        )

    def set(self, detail: str) -> None:
        with self.lock:
            self.detail = detail
            self.draw_locked()

    # -- drawing (the caller holds self.lock)
    def line(self) -> str:
        """Title and elapsed time first, so a narrow terminal cuts only the numbers."""
        text = f"{self.title} · {time.monotonic() - self.t0:.1f} s"
        if self.detail:
            text += f" · {self.detail}"
        return text[: (self.width or _width(self.stream)) - 1]

    def draw_locked(self) -> None:
        if self._stop.is_set():
            return
        self.stream.write(ERASE + self.line())
        self.stream.flush()
        self._shown = True

    def erase_locked(self) -> None:
        if self._shown:
            self.stream.write(ERASE)
            self.stream.flush()
            self._shown = False

    # -- lifetime
    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self.lock:
                self.draw_locked()

    def __enter__(self) -> Progress:
        with self.lock:
            self.draw_locked()
        self._thread = threading.Thread(target=self._tick, name="ckpt-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.lock:
            self.erase_locked()


# api/converge.py Controller._line: "round  3:     1234 pages written,     48.0 MiB sent
# (12.1 MiB on the wire) in   250 ms,   48.4 MiB/s, throttle  20% → 40%, est. freeze ..."
