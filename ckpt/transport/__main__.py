"""`python -m ckpt.transport migrate|receive ...`: the two commands without ckpt's main CLI.

Useful before (or without) their registration in ckpt/cli.py; errors print and
exit exactly like `ckpt` (one `ckpt: error:` line, the error's exit code).
"""

from __future__ import annotations

import click

from .cli import migrate, receive


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main_group() -> None:
    """Live migration commands."""


main_group.add_command(receive)
main_group.add_command(migrate)


def main() -> None:
    from ..cli_run import run

    run(main_group)


if __name__ == "__main__":
    main()
