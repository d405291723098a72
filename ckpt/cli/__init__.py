"""The `ckpt` command line: argument handling and output only (all of ckpt's click code).

Data goes to stdout, status and progress to stderr; every failure is one line
`ckpt: error: ...` with the exit code of its CkptError class (README lists them;
app.py prints it). Heavy imports happen inside the commands.

    app.py       the App: status on stderr, data on stdout, errors → exit codes
    options.py   options shared by several commands; the pre-copy Policy from them
    dump.py, restore.py, show.py (check, show), store.py (snapshot and the store
    commands), migrate.py (migrate, receive)
"""

from __future__ import annotations

import click

from .app import app
from .dump import dump
from .migrate import migrate, receive
from .restore import restore
from .show import check, show
from .store import COMMANDS as STORE_COMMANDS

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt")
def cli() -> None:
    """Checkpoint and restore running Linux processes."""


for _cmd in (check, dump, restore, *STORE_COMMANDS, show, receive, migrate):
    cli.add_command(_cmd)


def main() -> None:
    """The `ckpt` console script and `python -m ckpt`."""
    app.run(cli)
