"""Click options shared by the commands that run the pre-copy loop (dump, migrate).

One definition each, so `ckpt dump --iterative` and `ckpt migrate` accept the
same spellings, ranges and defaults.
"""

from __future__ import annotations

import click

from .precopy import DEFAULT_MAX_ROUNDS, DEFAULT_MAX_TIME, DEFAULT_TARGET_DOWNTIME_MS

TRACKERS = ["auto", "uffd-wp", "soft-dirty", "full"]

tracker_option = click.option(
    "--tracker",
    type=click.Choice(TRACKERS),
    default="auto",
    show_default=True,
    help="Dirty-page tracking backend (auto: the best one `ckpt check` finds).",
)
max_rounds_option = click.option(
    "--max-rounds",
    type=click.IntRange(1, 1000),
    default=None,
    help=f"Pre-copy rounds at most [default: {DEFAULT_MAX_ROUNDS}].",
)
target_downtime_option = click.option(
    "--target-downtime-ms",
    type=click.FloatRange(0),
    default=None,
    help=f"Stop pre-copying once the final freeze is estimated below this [default: {DEFAULT_TARGET_DOWNTIME_MS:g}].",
)
max_time_option = click.option(
    "--max-time",
    type=click.FloatRange(0),
    default=None,
    help=f"Seconds of pre-copy at most [default: {DEFAULT_MAX_TIME:g}].",
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
    help="Also checkpoint established TCP connections to peers outside the process "
    "(TCP_REPAIR; the peer must stay quiet until the restore). Connections between two "
    "sockets of the process are always checkpointed.",
)
tree_option = click.option(
    "--tree/--no-tree",
    default=True,
    show_default=True,
    help="Take the process's descendants too (restored as its children, same PIDs).",
)
