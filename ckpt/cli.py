"""The `ckpt` command line: argument handling and output only.

Data goes to stdout, status and progress to stderr; every failure is one line
`ckpt: error: ...` with the exit code of its CkptError class (README lists
them). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import os
import sys

import click

from .cli_options import (
    level_option,
    max_rounds_option,
    max_time_option,
    target_downtime_option,
    tcp_established_option,
    tracker_option,
    tree_option,
)


def _tree_note(r) -> str:
    return f" and {r.processes - 1} descendants" if r.processes > 1 else ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def status(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt")
def cli() -> None:
    """Checkpoint and restore running Linux processes."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def check(as_json: bool) -> None:
    """Show what this kernel offers and which dirty-tracking backend ckpt would use."""
    from .kernel import features

    f = features.probe()
    if as_json:
        click.echo(json.dumps(features.to_json(f), indent=2))
        return
    click.echo(features.render_text(f))


@cli.command()
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
@tracker_option
@max_rounds_option
@target_downtime_option
@max_time_option
@click.option(
    "--stats-json", type=click.Path(), default=None, help="Write per-round statistics as JSON here."
)
@level_option
@tcp_established_option
@tree_option
@click.option(
    "--shell-job",
    is_flag=True,
    help="The process is a job started from a shell: take its fds on its controlling "
    "terminal (restore with `ckpt restore --shell-job` on any terminal).",
)
def dump(
    pid: int,
    directory: str,
    leave_running: bool,
    iterative: bool,
    tracker: str,
    max_rounds: int | None,
    target_downtime_ms: float | None,
    max_time: float | None,
    stats_json: str | None,
    level: int | None,
    tcp_established: bool,
    tree: bool,
    shell_job: bool,
) -> None:
    """Checkpoint process PID into DIR (then kill it, unless --leave-running)."""
    from . import api
    from .precopy import Policy

    policy = Policy()
    if max_rounds is not None:
        policy.max_rounds = max_rounds
    if target_downtime_ms is not None:
        policy.target_downtime_ms = target_downtime_ms
    if max_time is not None:
        policy.max_time = max_time

    def on_round(r) -> None:
        status(
            f"round {r.round:>2}: {r.pages_written:>9} pages written, {r.bytes_copied / 2**20:>8.1f} MiB copied "
            f"in {r.seconds * 1000:>6.0f} ms, dirty {r.dirty_rate_pages_s:>9.0f} pages/s, "
            f"est. freeze {r.est_freeze_ms:>6.1f} ms"
        )

    r = api.dump(
        pid, directory, leave_running=leave_running, level=level, iterative=iterative,
        tracker=tracker, policy=policy, on_round=on_round, stats_json=stats_json,
        tcp_established=tcp_established, tree=tree, shell_job=shell_job,
    )  # fmt: skip
    extra = (
        f"; tracker {r.tracker}, {len(r.rounds)} pre-copy rounds ({r.stop_reason})"
        if iterative
        else ""
    )
    status(
        f"dumped {r.pid}{_tree_note(r)} to {r.image}: {r.vmas} VMAs, {_human(r.bytes_raw)} of pages "
        f"→ {_human(r.bytes_stored)} stored, freeze {r.freeze_ms:.0f} ms"
        f" ({r.final_pages} pages in the final round), total {r.seconds:.2f} s{extra}"
        + ("; left running" if leave_running else "; process killed")
    )
    if r.net_lock:
        status(
            f"TCP peers outside the dump are held (nftables table inet {r.net_lock}) until "
            f"`ckpt restore` deletes it; without a restore: nft delete table inet {r.net_lock}"
        )
    if r.zombie_parent:
        status(
            f"note: PID {r.pid} stays a zombie until its parent {r.zombie_parent} reaps it; "
            "a restore at that PID waits for that (--new-pid does not)"
        )
    if r.unlocked_tcp:
        status(
            f"warning: {r.unlocked_tcp} TCP connection(s) to outside peers without a network "
            "lock (no `nft`): whatever the peers send before the restore resets them"
        )


@cli.command()
@click.option(
    "-D", "--images-dir", "directory", type=click.Path(), default=None, help="Image directory."
)
@click.option(
    "--store", type=click.Path(), default=None, help="Restore from a snapshot store instead."
)
@click.option(
    "--at", default=None, help="Snapshot id, id prefix or time (with --store; default: latest)."
)
@click.option("--detach", is_flag=True, help="Print the PID and return while the process runs on.")
@click.option(
    "--new-pid", is_flag=True, help="Let the kernel pick a new PID instead of the dumped one."
)
@click.option(
    "--shell-job",
    is_flag=True,
    help="Restore a job dumped with --shell-job on the terminal ckpt runs on, in the "
    "foreground; ckpt takes the terminal back when it exits.",
)
@click.option(
    "--inherit-fd",
    "inherit",
    multiple=True,
    metavar="N=FD|PATH",
    help="fd N of the image led outside the dump (a log pipe, journald's socket): give it "
    "this ckpt's fd FD, or PATH opened for appending, instead of ckpt's own fd N.",
)
def restore(
    directory: str | None,
    store: str | None,
    at: str | None,
    detach: bool,
    new_pid: bool,
    shell_job: bool,
    inherit: tuple[str, ...],
) -> None:
    """Restore a process (-D DIR or --store S); wait for it and exit with its status unless --detach."""
    from . import api
    from .errors import UsageError

    if (directory is None) == (store is None):
        raise UsageError("give exactly one of -D DIR or --store S")
    if at is not None and store is None:
        raise UsageError("--at needs --store")
    fds = inherit_fds(inherit)
    if store is not None:
        r, sid = api.restore_snapshot(
            store, at, new_pid=new_pid, shell_job=shell_job, detach=detach, inherit_fds=fds
        )
        status(f"restored snapshot {sid} of {store}")
    else:
        r = api.restore(
            directory, new_pid=new_pid, shell_job=shell_job, detach=detach, inherit_fds=fds
        )
    for pid, fd, what, mine in r.externals:
        status(f"fd {fd} of {pid} led outside the dump ({what}): now this ckpt's fd {mine}")
    if detach:
        click.echo(r.pid)
        status(f"restored {r.pid} in {r.seconds:.2f} s")
        return
    status(f"restored {r.pid} in {r.seconds:.2f} s; waiting for it to exit")
    sys.stdout.flush()
    code = api.wait_exit_status(r.pid, r.terminal)
    sys.exit(code)


def inherit_fds(specs: tuple[str, ...]) -> dict[int, int]:
    """restore --inherit-fd N=FD|PATH → {N: an fd of this process}. A PATH is opened here
    for appending (created 0600 if missing; its last component not followed)."""
    from .errors import UsageError

    out: dict[int, int] = {}
    for spec in specs:
        n, sep, target = spec.partition("=")
        if not sep or not n.isdigit() or not target:
            raise UsageError(f"--inherit-fd {spec!r}: expected N=FD or N=PATH")
        if target.isdigit():
            out[int(n)] = int(target)
            continue
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            out[int(n)] = os.open(target, flags, 0o600)
        except OSError as exc:
            raise UsageError(
                f"--inherit-fd {spec!r}: cannot open {target}: {exc.strerror}"
            ) from None
    return out


@cli.command()
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@tree_option
@tcp_established_option
def snapshot(
    pid: int, store: str, wait_s: float, as_json: bool, tree: bool, tcp_established: bool
) -> None:
    """Take one point-in-time snapshot of PID into store S (incremental after the first)."""
    from . import api

    r = api.snapshot(
        pid, store, wait=wait_s, on_status=status, tree=tree, tcp_established=tcp_established
    )
    if as_json:
        click.echo(json.dumps(r.__dict__, indent=2))
        return
    click.echo(r.id)
    status(
        f"snapshot {r.id} of {r.pid}: {'full' if r.full else 'incremental'}, "
        f"{r.pages_written} pages ({_human(r.bytes_stored)} stored), freeze {r.freeze_ms:.1f} ms, "
        f"total {r.seconds:.2f} s"
    )


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(directory: str, as_json: bool) -> None:
    """Show what an image (DIR, or snapshot STORE[@ID]) holds: process, VMAs, fds, sizes."""
    from . import api

    info = api.show(directory)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    p, m = info["process"], info["meta"]
    click.echo(f"image    {info['image']}")
    click.echo(f"process  {p['pid']} {p['comm']!r}  exe {p['exe']}  cwd {p['cwd']}")
    click.echo(f"cmdline  {' '.join(p['cmdline'])}")
    click.echo(
        f"dumped   {m.get('host', '?')} kernel {m.get('kernel', '?')}  freeze "
        f"{m.get('freeze_ms', 0):.0f} ms  ckpt {m.get('ckpt_version', '?')}"
    )
    click.echo(
        f"signals  {p['sigactions']} handlers, mask {p['sigmask']}; timers {p['posix_timers']} posix, {p['itimers']} itimer"
    )
    click.echo(f"threads  {p['threads']}")
    for d in p["descendants"]:
        click.echo(
            f"child    {d['pid']} {d['comm']!r} (parent {d['ppid']}): {d['threads']} threads, "
            f"{d['fds']} fds"
        )
    for z in p.get("zombies", ()):
        click.echo(
            f"zombie   {z['pid']} {z['comm']!r} (parent {z['ppid']}): wait status {z['status']:#x}"
        )
    if p["net_lock"]:
        click.echo(f"netlock  nftables table inet {p['net_lock']} (deleted by the restore)")
    click.echo("")
    click.echo(f"{'start':>14} {'end':>14} perms {'pages':>8}  kind     name")
    for v in info["vmas"]:
        click.echo(
            f"{v['start']:>14x} {v['end']:>14x} {v['perms']}  {v['pages']:>8}  {v['kind']:<8} {v['name']}"
        )
    for o in info["shm"]:
        what = f"SysV shmid {o['sysv']['shmid']}" if "sysv" in o else "shared anonymous memory"
        click.echo(
            f"shm {o['index']:>4}  {what}, {_human(o['size'])}, {o['pages']} pages, "
            f"mapped by {', '.join(map(str, o['mapped_by']))}"
        )
    click.echo("")
    for f in info["fds"]:
        click.echo(f"fd {f['fd']:>4}  {f['kind']:<4} pos {f['pos']:<10} {f['path']}")
    lay = info["layers"]
    click.echo("")
    for layer in lay.get("layers", []):
        click.echo(
            f"layer {layer['layer']:>3}  {layer['data_pages']:>9} data pages, {layer['zero_pages']:>7} zero pages, "
            f"{_human(layer['bytes_raw'])} → {_human(layer['bytes_stored'])} in {layer['chunks']} chunks"
        )
    tot = lay.get("total", {})
    if tot:
        click.echo(
            f"total      {_human(tot['bytes_raw'])} of pages → {_human(tot['bytes_stored'])} stored, format {lay.get('format', '?')}"
        )


def _register_optional() -> None:
    """Commands that live in their own packages (migration, snapshot store)."""
    from .transport.cli import migrate, receive

    cli.add_command(receive)
    cli.add_command(migrate)
    from .store.cli import register

    register(cli)


_register_optional()


def main() -> None:
    from .cli_run import run

    run(cli)
