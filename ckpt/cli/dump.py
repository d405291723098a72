"""`ckpt dump`: checkpoint a process (and its descendants) into an image directory."""

from __future__ import annotations

import os

import click

from .app import app, human
from .options import (
    json_option,
    level_option,
    max_rounds_option,
    max_time_option,
    precopy_policy,
    quiet_option,
    shell_job_option,
    target_downtime_option,
    tcp_established_option,
    tracker_option,
    tree_option,
)


def tree_note(r) -> str:
    """ " and N descendants" of a DumpResult or SnapshotResult with more than one process."""
    return f" and {r.processes - 1} descendants" if r.processes > 1 else ""


def dump_document(r, *, iterative: bool, leave_running: bool) -> dict:
    """`ckpt dump --json`: a DumpResult (docs/CLI.md lists the keys)."""
    return {
        "pid": r.pid,
        "image": os.path.abspath(r.image),
        "processes": r.processes,
        "killed": not leave_running,
        "vmas": r.vmas,
        "pages": r.pages,
        "bytes_raw": r.bytes_raw,
        "bytes_stored": r.bytes_stored,
        "layers": r.layers,
        "freeze_ms": r.freeze_ms,
        "final_pages": r.final_pages,
        "seconds": r.seconds,
        "iterative": iterative,
        "precopy": r.precopy,
        "precopy_skipped": r.precopy_skipped or None,
        "tracker": r.tracker,
        "stop_reason": r.stop_reason,
        "rounds": [dict(x) for x in r.rounds],
        "net_lock": r.net_lock or None,
        "unlocked_tcp": r.unlocked_tcp,
        "held_listeners": r.held_listeners,
        "unheld_listeners": r.unheld_listeners,
        "zombie_parent": r.zombie_parent or None,
    }


def round_line(r) -> str:
    """One finished pre-copy round (precopy.RoundStats) as a status line."""
    return (
        f"round {r.round:>2}: {r.pages_written:>9} pages written, {r.bytes_copied / 2**20:>8.1f} MiB copied "
        f"in {r.seconds * 1000:>6.0f} ms, dirty {r.dirty_rate_pages_s:>9.0f} pages/s, "
        f"est. freeze {r.est_freeze_ms:>6.1f} ms"
    )


@click.command()
@click.argument("pid", type=int)
@click.option(
    "-D",
    "--images-dir",
    "directory",
    required=True,
    type=click.Path(),
    help="Image directory to create.",
)
@click.option("--leave-running", is_flag=True, help="Let the process run on after the dump.")
@click.option(
    "--iterative",
    is_flag=True,
    help="Pre-copy memory while the process runs; freeze only for the last round.",
)
@click.option(
    "--no-precopy",
    is_flag=True,
    help="Copy every page while the process is frozen. (Without --iterative, a process "
    "with more than 64 MiB of private memory is copied once while it runs, then frozen "
    "for what changed.)",
)
@tracker_option
@max_rounds_option()
@target_downtime_option
@max_time_option()
@click.option(
    "--stats-json", type=click.Path(), default=None, help="Write per-round statistics as JSON here."
)
@level_option
@tcp_established_option
@tree_option
@shell_job_option
@json_option
@quiet_option
def dump(
    pid: int,
    directory: str,
    leave_running: bool,
    iterative: bool,
    no_precopy: bool,
    tracker: str,
    max_rounds: int | None,
    target_downtime_ms: float | None,
    max_time: float | None,
    stats_json: str | None,
    level: int | None,
    tcp_established: bool,
    tree: bool,
    shell_job: bool,
    as_json: bool,
) -> None:
    """Checkpoint process PID into DIR (then kill it, unless --leave-running)."""
    from .. import api

    policy = precopy_policy(max_rounds, target_downtime_ms, max_time)

    with app.progress(f"dump {pid}") as progress:

        def on_round(r) -> None:
            app.status(round_line(r))
            if progress is not None:
                progress.on_round(r)

        r = api.dump(
            pid, directory, leave_running=leave_running, level=level, iterative=iterative,
            no_precopy=no_precopy, tracker=tracker, policy=policy, on_round=on_round, stats_json=stats_json,
            tcp_established=tcp_established, tree=tree, shell_job=shell_job,
        )  # fmt: skip
    if as_json:
        app.result(dump_document(r, iterative=iterative, leave_running=leave_running))
    else:
        _summary(r, iterative, leave_running)
    if r.net_lock:
        held = ["TCP peers outside the dump"] if r.locked_tcp else []
        if r.held_listeners:
            held.append(f"new connections to {r.held_listeners} listening address(es)")
        app.warn(
            f"{' and '.join(held) or 'TCP peers'} are held (nftables table inet {r.net_lock}) "
            f"until `ckpt restore` deletes it; without a restore: nft delete table inet {r.net_lock}"
        )
    if r.zombie_parent:
        app.status(
            f"note: PID {r.pid} stays a zombie until its parent {r.zombie_parent} reaps it; "
            "a restore at that PID waits for that (--new-pid does not)"
        )
    if r.unlocked_tcp:
        app.status(
            f"warning: {r.unlocked_tcp} TCP connection(s) to outside peers without a network "
            "lock (no `nft`): whatever the peers send before the restore resets them"
        )
    if r.unheld_listeners and not leave_running:
        app.status(
            f"note: new connections to {r.unheld_listeners} listening address(es) could not "
            "be held (no `nft`): a client connecting before the restore is refused"
        )


def _summary(r, iterative: bool, leave_running: bool) -> None:
    if iterative:
        extra = f"; tracker {r.tracker}, {len(r.rounds)} pre-copy rounds ({r.stop_reason})"
    elif r.precopy == "once":
        extra = f"; copied once while running (tracker {r.tracker})"
    else:
        extra = ""
    if r.precopy_skipped:
        app.status(f"note: no copy while running ({r.precopy_skipped}): every page copied frozen")
    app.status(
        f"dumped {r.pid}{tree_note(r)} to {r.image}: {r.vmas} VMAs, {human(r.bytes_raw)} of pages "
        f"→ {human(r.bytes_stored)} stored, freeze {r.freeze_ms:.0f} ms"
        f" ({r.final_pages} pages in the final round), total {r.seconds:.2f} s{extra}"
        + ("; left running" if leave_running else "; process killed")
    )
