"""Click options shared by several commands, and the one place that turns the pre-copy
options into a Policy.

One definition each, so `ckpt dump --iterative` and `ckpt migrate` accept the same
spellings and ranges; only their defaults differ (a migration may need more rounds
for its throttle to bite).
"""

from __future__ import annotations

import click

from ..precopy import DEFAULT_MAX_ROUNDS, DEFAULT_MAX_TIME, DEFAULT_TARGET_DOWNTIME_MS, Policy
from .app import app

TRACKERS = ["auto", "uffd-wp", "soft-dirty", "full"]

# `ckpt migrate`'s budget: rounds that let the throttle slow a busy writer down
MIGRATE_MAX_ROUNDS = 20
MIGRATE_MAX_TIME = 120.0


def precopy_policy(
    max_rounds: int | None,
    target_downtime_ms: float | None,
    max_time: float | None,
    *,
    default_rounds: int = DEFAULT_MAX_ROUNDS,
    default_time: float = DEFAULT_MAX_TIME,
) -> Policy:
    """The pre-copy Policy of --max-rounds/--target-downtime-ms/--max-time (None: the default)."""
    return Policy(
        max_rounds=default_rounds if max_rounds is None else max_rounds,
        target_downtime_ms=(
            DEFAULT_TARGET_DOWNTIME_MS if target_downtime_ms is None else target_downtime_ms
        ),
        max_time=default_time if max_time is None else max_time,
    )


tracker_option = click.option(
    "--tracker",
    type=click.Choice(TRACKERS),
    default="auto",
    show_default=True,
    help="Dirty-page tracking backend (auto: the best one `ckpt check` finds).",
)


def max_rounds_option(default: int = DEFAULT_MAX_ROUNDS):
    return click.option(
        "--max-rounds",
        type=click.IntRange(1, 1000),
        default=None,
        help=f"Pre-copy rounds at most [default: {default}].",
    )


target_downtime_option = click.option(
    "--target-downtime-ms",
    type=click.FloatRange(0),
    default=None,
    help=f"Stop pre-copying once the final freeze is estimated below this [default: {DEFAULT_TARGET_DOWNTIME_MS:g}].",
)


def max_time_option(default: float = DEFAULT_MAX_TIME):
    return click.option(
        "--max-time",
        type=click.FloatRange(0),
        default=None,
        help=f"Seconds of pre-copy at most [default: {default:g}].",
    )


level_option = click.option(
    "--level",
    type=click.IntRange(0, 19),
    default=None,
    help="zstd level 1-19, or 0 to store pages uncompressed [default: 1].",
)
tcp_established_option = click.option(
    "--tcp-established",
    is_flag=True,
    help="Also checkpoint TCP connections (established or closing) to peers outside the "
    "process (TCP_REPAIR; the peer must stay quiet until the restore). Connections between two "
    "sockets of the process are always checkpointed.",
)
tree_option = click.option(
    "--tree/--no-tree",
    default=True,
    show_default=True,
    help="Take the process's descendants too (restored as its children, same PIDs).",
)


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    app.json = app.json or value
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_set_json,
    help="Print one JSON document on stdout (docs/CLI.md); errors too.",
)


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    app.quiet = app.quiet or value
    return value


quiet_option = click.option(
    "-q",
    "--quiet",
    is_flag=True,
    expose_value=False,
    callback=_set_quiet,
    help="No status lines and no progress on stderr; warnings, notes and errors still print.",
)


shell_job_option = click.option(
    "--shell-job",
    is_flag=True,
    help="The process is a job started from a shell: take its fds on its controlling "
    "terminal (restore with `ckpt restore --shell-job` on any terminal).",
)
