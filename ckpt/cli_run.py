"""Run a click group the ckpt way: one `ckpt: error:` line and a distinct exit code.

Shared by `ckpt` itself and the `python -m ckpt.store` / `python -m
ckpt.transport` entry points, so every command fails the same way.
"""

from __future__ import annotations

import os
import sys

import click

from .errors import CkptError


def run(group: click.Group) -> None:
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
