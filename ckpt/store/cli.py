"""Click commands for snapshot stores: `snapshots`, `verify`, `gc`, `compact`.

Registered in ckpt/cli.py (`cli.add_command(...)`, or `register(cli)`); also
runnable alone as `python -m ckpt.store ...` (same output and exit codes).
Data goes to stdout, status to stderr; failures raise CkptError subclasses
(one `ckpt: error:` line, the class's exit code: verify failing → 6, busy → 14).
"""

from __future__ import annotations

import json
import time

import click

from ..errors import ImageCorrupt, UsageError


def _human(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _status(msg: str) -> None:
    click.echo(msg, err=True)


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


_json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
_store_arg = click.argument("store", type=click.Path())


def _open(path: str):
    from . import Store

    return Store.open(path)


@click.command()
@_store_arg
@click.option("--pid", type=int, default=None, help="Only snapshots of this process.")
@_wait_option(10.0)
@_json_option
def snapshots(store: str, pid: int | None, wait_s: float, as_json: bool) -> None:
    """List the snapshots in STORE, oldest first."""
    from .layout import disk_usage

    st = _open(store)
    with st.lock(wait_s, shared=True, op="list"):
        every = st.snapshots()
        used = disk_usage(st.root)
        if st.unfinished_gc:
            _status(f"note: {st.unfinished_gc_note()}")
    snaps = [s for s in every if pid is None or s.pid == pid]
    if as_json:
        out = {"store": st.root, "bytes_on_disk": used, "snapshots": [s.to_json() for s in snaps]}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"{'ID':<22} {'TIME':<19} {'PID':>7} {'KIND':<4} {'PAGES':>9} {'STORED':>10} "
        f"{'FREEZE':>8} {'LAYERS':>6}  PARENT"
    )
    ids = {s.id for s in every}
    for s in snaps:
        parent = s.parent or "-"
        if s.parent and s.parent not in ids:
            parent += " (removed)"
        if s.error:
            click.echo(f"{s.id:<22} {_local(s.time):<19} {'?':>7}  damaged: {s.error}")
            continue
        click.echo(
            f"{s.id:<22} {_local(s.time):<19} {s.pid if s.pid is not None else '-':>7} "
            f"{'full' if s.full else 'incr':<4} {s.pages_written:>9} {_human(s.bytes):>10} "
            f"{s.freeze_ms:>6.1f}ms {s.layers:>6}  {parent}"
        )
    _status(f"{len(snaps)} snapshot(s) in {st.root}, {_human(used)} on disk")


@click.command()
@_store_arg
@click.option("--deep", is_flag=True, help="Also read and checksum every chunk of every layer.")
@_wait_option(10.0)
@_json_option
def verify(store: str, deep: bool, wait_s: float, as_json: bool) -> None:
    """Check that every snapshot in STORE is restorable (exit 6 if not)."""
    st = _open(store)
    with st.lock(wait_s, shared=True, op="verify"):
        rep = st.verify(deep=deep)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        for c in rep.snapshots:
            if c.ok:
                click.echo(f"{c.id}  ok  ({c.layers} layers)")
                continue
            state = "DAMAGED, restorable" if c.restorable else "FAILED, not restorable"
            click.echo(f"{c.id}  {state}")
            for e in c.errors:
                click.echo(f"    {e}")
        for p in rep.problems:
            click.echo(f"store: {p}")
    for n in rep.notes:
        _status(f"note: {n}")
    what = f"{len(rep.snapshots)} snapshot(s)"
    if deep:
        what += f", {rep.layers_checked} layer files, {rep.chunks_checked} chunks"
    if rep.ok:
        _status(f"verified {what} in {rep.seconds:.2f} s: all ok")
        return
    bad = len(rep.failed)
    raise ImageCorrupt(
        f"verify failed: {bad} of {len(rep.snapshots)} snapshot(s) damaged"
        + (f", {len(rep.problems)} store problem(s)" if rep.problems else "")
        + f"; first: {rep.first_error()}"
    )


def _gc_output(rep, as_json: bool, verb: str) -> None:
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        would = "would " if rep.dry_run else ""
        for sid in rep.removed:
            click.echo(f"{would}remove   {sid}")
        for sid in rep.compacted:
            click.echo(
                f"{would}compact  {sid}  {rep.chain_before[sid]} → {rep.chain_after[sid]} layers"
            )
    tail = (
        " (dry run: nothing changed)"
        if rep.dry_run
        else f"; wrote {_human(rep.bytes_written)}, disk {_human(rep.bytes_before)} → "
        f"{_human(rep.bytes_after)}"
    )
    _status(
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
@_json_option
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
@_json_option
def compact(store: str, max_chain: int, wait_s: float, dry_run: bool, as_json: bool) -> None:
    """Rewrite snapshots whose layer chains are long; remove nothing."""
    st = _open(store)
    with st.lock(wait_s, op="compact"):
        rep = st.compact(max_chain, dry_run=dry_run)
    _gc_output(rep, as_json, "compact")


COMMANDS = (snapshots, verify, gc, compact)


def register(group: click.Group) -> None:
    """Add the store commands to a click group (ckpt/cli.py's `cli`)."""
    for cmd in COMMANDS:
        group.add_command(cmd)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def store_cli() -> None:
    """Snapshot store maintenance (the same commands as `ckpt snapshots|verify|gc|compact`)."""


register(store_cli)


def main() -> None:
    """`python -m ckpt.store`: one error line and the error's exit code, like ckpt's main."""
    from ..cli_run import run

    run(store_cli)
