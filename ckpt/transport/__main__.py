"""`python -m ckpt.transport migrate|receive ...`: the two commands without ckpt's main CLI.

Useful before (or without) their registration in ckpt/cli.py; errors print and
exit exactly like `ckpt` (one `ckpt: error:` line, the error's exit code).
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import CkptError
from .cli import migrate, receive


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_group() -> None:
    """Live migration commands."""


main_group.add_command(receive)
main_group.add_command(migrate)


def main() -> None:
    try:
        main_group.main(standalone_mode=False, prog_name="ckpt")
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


if __name__ == "__main__":
    main()
