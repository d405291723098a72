"""Snapshot stores: `ckpt snapshot` takes one, `snapshots`, `verify`, `gc` and
`compact` list, check and trim them.

The store commands also run alone as `python -m ckpt.store ...` (`store_group`, same
output and exit codes). Failures raise CkptError subclasses (verify failing → 6,
busy → 14).
"""

from __future__ import annotations

import time

import click

from ..errors import ImageCorrupt, UsageError
from .app import app, human
from .options import (
    json_option,
    quiet_option,
    shell_job_option,
    tcp_established_option,
    tree_option,
)


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _wait_option(default: float):
    return click.option(
        "--wait",
        "wait_s",
        type=click.FloatRange(0),
        default=default,
        show_default=True,
        help="Seconds to wait for a busy store before failing (exit 14).",
    )


_store_arg = click.argument("store", type=click.Path())


def _open(path: str):
    from ..store import Store

    return Store.open(path)


def snapshot_document(r) -> dict:
    """`ckpt snapshot --json`: a SnapshotResult (docs/CLI.md lists the keys)."""
    return {
        "id": r.id,
        "pid": r.pid,
        "full": r.full,
        "reason": r.reason,
        "freeze_ms": r.freeze_ms,
        "seconds": r.seconds,
        "pages_written": r.pages_written,
        "bytes_stored": r.bytes_stored,
        "tracker": r.tracker,
    }


@click.command()
@click.argument("pid", type=int)
@click.option(
    "--store", required=True, type=click.Path(), help="Snapshot store (created if missing)."
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=0.0,
    help="Wait up to this many seconds for a busy store.",
)
@json_option
@quiet_option
@tree_option
@tcp_established_option
@shell_job_option
def snapshot(
    pid: int, store: str, wait_s: float, as_json: bool, tree: bool, tcp_established: bool,
    shell_job: bool,
) -> None:  # fmt: skip
    """Take one point-in-time snapshot of PID into store S (incremental after the first)."""
    from .. import api

    r = api.snapshot(
        pid, store, wait=wait_s, on_status=app.status, tree=tree,
        tcp_established=tcp_established, shell_job=shell_job,
    )  # fmt: skip
    if as_json:
        app.result(snapshot_document(r))
        return
    app.echo(r.id)
    app.status(
        f"snapshot {r.id} of {r.pid}: {'full' if r.full else 'incremental'}, "
        f"{r.pages_written} pages ({human(r.bytes_stored)} stored), freeze {r.freeze_ms:.1f} ms, "
        f"total {r.seconds:.2f} s"
    )


@click.command()
@_store_arg
@click.option("--pid", type=int, default=None, help="Only snapshots of this process.")
@_wait_option(10.0)
@json_option
@quiet_option
def snapshots(store: str, pid: int | None, wait_s: float, as_json: bool) -> None:
    """List the snapshots in STORE, oldest first."""
    from ..store.layout import disk_usage

    st = _open(store)
    with st.lock(wait_s, shared=True, op="list"):
        every = st.snapshots()
        used = disk_usage(st.root)
        if st.unfinished_gc:
            app.status(f"note: {st.unfinished_gc_note()}")
    snaps = [s for s in every if pid is None or s.pid == pid]
    if as_json:
        out = {"store": st.root, "bytes_on_disk": used, "snapshots": [s.to_json() for s in snaps]}
        app.result(out)
        return
    app.echo(
        f"{'ID':<22} {'TIME':<19} {'PID':>7} {'KIND':<4} {'PAGES':>9} {'STORED':>10} "
        f"{'FREEZE':>8} {'LAYERS':>6}  PARENT"
    )
    ids = {s.id for s in every}
    for s in snaps:
        parent = s.parent or "-"
        if s.parent and s.parent not in ids:
            parent += " (removed)"
        if s.error:
            app.echo(f"{s.id:<22} {_local(s.time):<19} {'?':>7}  damaged: {s.error}")
            continue
        app.echo(
            f"{s.id:<22} {_local(s.time):<19} {s.pid if s.pid is not None else '-':>7} "
            f"{'full' if s.full else 'incr':<4} {s.pages_written:>9} {human(s.bytes):>10} "
            f"{s.freeze_ms:>6.1f}ms {s.layers:>6}  {parent}"
        )
    app.status(f"{len(snaps)} snapshot(s) in {st.root}, {human(used)} on disk")


@click.command()
@_store_arg
@click.option("--deep", is_flag=True, help="Also read and checksum every chunk of every layer.")
@_wait_option(10.0)
@json_option
@quiet_option
def verify(store: str, deep: bool, wait_s: float, as_json: bool) -> None:
    """Check that every snapshot in STORE is restorable (exit 6 if not)."""
    st = _open(store)
    with st.lock(wait_s, shared=True, op="verify"):
        rep = st.verify(deep=deep)
    if as_json:
        app.result(rep.to_json())
    else:
        for c in rep.snapshots:
            if c.ok:
                app.echo(f"{c.id}  ok  ({c.layers} layers)")
                continue
            state = "DAMAGED, restorable" if c.restorable else "FAILED, not restorable"
            app.echo(f"{c.id}  {state}")
            for e in c.errors:
                app.echo(f"    {e}")
        for p in rep.problems:
            app.echo(f"store: {p}")
    for n in rep.notes:
        app.status(f"note: {n}")
    what = f"{len(rep.snapshots)} snapshot(s)"
    if deep:
        what += f", {rep.layers_checked} layer files, {rep.chunks_checked} chunks"
    if rep.ok:
        app.status(f"verified {what} in {rep.seconds:.2f} s: all ok")
        return
    bad = len(rep.failed)
    raise ImageCorrupt(
        f"verify failed: {bad} of {len(rep.snapshots)} snapshot(s) damaged"
        + (f", {len(rep.problems)} store problem(s)" if rep.problems else "")
        + f"; first: {rep.first_error()}"
    )


def _gc_output(rep, as_json: bool, verb: str) -> None:
    if as_json:
        app.result(rep.to_json())
    else:
        would = "would " if rep.dry_run else ""
        for sid in rep.removed:
            app.echo(f"{would}remove   {sid}")
        for sid in rep.compacted:
            app.echo(
                f"{would}compact  {sid}  {rep.chain_before[sid]} → {rep.chain_after[sid]} layers"
            )
    tail = (
        " (dry run: nothing changed)"
        if rep.dry_run
        else f"; wrote {human(rep.bytes_written)}, disk {human(rep.bytes_before)} → "
        f"{human(rep.bytes_after)}"
    )
    app.status(
        f"{verb}: kept {len(rep.kept)}, removed {len(rep.removed)}, compacted "
        f"{len(rep.compacted)} (longest chain {rep.max_chain_before} → {rep.max_chain_after} "
        f"layers){tail} in {rep.seconds:.2f} s"
    )


_max_chain_option = click.option(
    "--max-chain",
    type=click.IntRange(1, 1000),
    default=8,
    show_default=True,
    help="Longest layer chain a kept snapshot may have afterwards.",
)
_dry_run_option = click.option("--dry-run", is_flag=True, help="Only say what would be done.")


@click.command()
@_store_arg
@click.option("--keep-last", type=click.IntRange(0), default=None, help="Keep the N newest.")
@click.option(
    "--keep-hourly", type=click.IntRange(0), default=None, help="Keep the newest of N hours."
)
@click.option(
    "--keep-daily", type=click.IntRange(0), default=None, help="Keep the newest of N days."
)
@_max_chain_option
@_wait_option(0.0)
@_dry_run_option
@json_option
@quiet_option
def gc(
    store: str,
    keep_last: int | None,
    keep_hourly: int | None,
    keep_daily: int | None,
    max_chain: int,
    wait_s: float,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove snapshots outside the retention policy, then compact the rest.

    The newest snapshot, and the newest of every process still tracked, are
    always kept.
    """
    if keep_last is None and keep_hourly is None and keep_daily is None:
        raise UsageError(
            "gc needs a retention policy (--keep-last/--keep-hourly/--keep-daily); "
            "`compact` compacts without removing anything"
        )
    st = _open(store)
    with st.lock(wait_s, op="gc"):
        rep = st.gc(keep_last, keep_hourly, keep_daily, max_chain, dry_run=dry_run)
    _gc_output(rep, as_json, "gc")


@click.command()
@_store_arg
@_max_chain_option
@_wait_option(0.0)
@_dry_run_option
@json_option
@quiet_option
def compact(store: str, max_chain: int, wait_s: float, dry_run: bool, as_json: bool) -> None:
    """Rewrite snapshots whose layer chains are long; remove nothing."""
    st = _open(store)
    with st.lock(wait_s, op="compact"):
        rep = st.compact(max_chain, dry_run=dry_run)
    _gc_output(rep, as_json, "compact")


COMMANDS = (snapshot, snapshots, verify, gc, compact)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def store_group() -> None:
    """Snapshot store maintenance (the same commands as `ckpt snapshots|verify|gc|compact`)."""


for _cmd in (snapshots, verify, gc, compact):
    store_group.add_command(_cmd)


def main() -> None:
    """`python -m ckpt.store`: one error line and the error's exit code, like ckpt's main."""
    app.run(store_group)
