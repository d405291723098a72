"""What every ckpt command shares: where its output goes and how a failure ends it.

Data goes to stdout, status to stderr. Every failure is one line `ckpt: error: ...` on
stderr and the exit code of its CkptError class (README lists them); `run()` is the
one place that turns an exception into that line, for `ckpt` itself and for the
`python -m ckpt.store` / `python -m ckpt.transport` entry points alike.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import CkptError


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
    """One command's output. A process runs one command, so there is one App (`app`)."""

    def status(self, msg: str) -> None:
        """A status line on stderr."""
        click.echo(msg, err=True)

    def echo(self, data: object) -> None:
        """Data on stdout."""
        click.echo(data)

    def exit(self, code: int) -> None:
        """End the command with `code` (a restored process's exit status), stdout flushed."""
        sys.stdout.flush()
        sys.exit(code)

    def run(self, group: click.Group) -> None:
        """Run a click group the ckpt way: one `ckpt: error:` line and a distinct exit code."""
        try:
            group.main(standalone_mode=False, prog_name="ckpt")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("ckpt: aborted", err=True)
            sys.exit(130)
        except CkptError as e:
            click.echo(f"ckpt: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("ckpt: interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if os.environ.get("CKPT_DEBUG"):
                raise
            click.echo(f"ckpt: internal error: {type(e).__name__}: {e}", err=True)
            sys.exit(1)


app = App()
