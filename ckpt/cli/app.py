"""What every ckpt command shares: where its output goes and how a failure ends it.

Data goes to stdout, status to stderr. Every failure is one line `ckpt: error: ...` on
stderr and the exit code of its CkptError class (README lists them); `run()` is the
one place that turns an exception into that line, for `ckpt` itself and for the
`python -m ckpt.store` / `python -m ckpt.transport` entry points alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from ..errors import CkptError

if TYPE_CHECKING:
    from .progress import Progress


def human(n: float) -> str:
    """A byte count for people: `512 B`, `1.5 MiB`, `-3.0 GiB`."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


class App:
    """One command's output. A process runs one command, so there is one App (`app`).

    With --json (json_option sets `json`), stdout carries exactly one JSON document:
    the command's result, or on failure `{"error": ..., "exit_code": N}` next to the
    usual `ckpt: error:` line on stderr (docs/CLI.md).
    """

    def __init__(self) -> None:
        self.json = False
        self.quiet = False  # --quiet: no status lines but warnings and notes, no progress
        self._emitted = False  # the one JSON document is out
        self._progress: Progress | None = None

    def status(self, msg: str) -> None:
        """A status line on stderr (with --quiet, only warnings and notes)."""
        if self.quiet and not msg.startswith(("warning:", "note:")):
            return
        self._stderr(msg)

    def warn(self, msg: str) -> None:
        """A line on stderr that --quiet keeps (what the user must act on)."""
        self._stderr(msg)

    def _stderr(self, msg: str) -> None:
        p = self._progress
        if p is None:
            click.echo(msg, err=True)
            return
        with p.lock:  # above the progress line, which is redrawn below it
            p.erase_locked()
            click.echo(msg, err=True)
            p.draw_locked()

    @contextlib.contextmanager
    def progress(self, title: str) -> Iterator[Progress | None]:
        """A live progress line while the block runs, if stderr is a terminal and neither
        --json nor --quiet was given (else None: nothing is drawn)."""
        from .progress import Progress, wanted

        if self.json or self.quiet or self._progress is not None or not wanted(sys.stderr):
            yield None
            return
        p = Progress(title, sys.stderr)
        with p:
            self._progress = p
            try:
                yield p
            finally:
                self._progress = None

    def echo(self, data: object) -> None:
        """Data on stdout."""
        click.echo(data)

    def result(self, doc: dict) -> None:
        """The command's one JSON document on stdout, flushed (a restore waits on after it)."""
        click.echo(json.dumps(doc, indent=2, default=str))
        sys.stdout.flush()
        self._emitted = True

    def exit(self, code: int) -> None:
        """End the command with `code` (a restored process's exit status), stdout flushed."""
        sys.stdout.flush()
        sys.exit(code)

    def fail(self, line: str, message: str, code: int) -> None:
        """End the command failed: `line` on stderr (and with --json, unless the result
        is already out, the error object on stdout), exit `code`."""
        self._stderr(line)
        if self.json and not self._emitted:
            self.result({"error": message, "exit_code": code})
        sys.exit(code)

    def run(self, group: click.Group) -> None:
        """Run a click group the ckpt way: one `ckpt: error:` line and a distinct exit code."""
        try:
            group.main(standalone_mode=False, prog_name="ckpt")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            if self.json and not self._emitted:
                self.result({"error": e.format_message(), "exit_code": 2})
            sys.exit(2)
        except click.exceptions.Abort:
            self.fail("ckpt: aborted", "aborted", 130)
        except CkptError as e:
            self.fail(f"ckpt: error: {e}", str(e), e.exit_code)
        except KeyboardInterrupt:
            self.fail("ckpt: interrupted", "interrupted", 130)
        except Exception as e:
            if os.environ.get("CKPT_DEBUG"):
                raise
            what = f"internal error: {type(e).__name__}: {e}"
            self.fail(f"ckpt: {what}", what, 1)


app = App()
