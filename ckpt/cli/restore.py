"""`ckpt restore`: rebuild a process from an image directory or a snapshot store."""

from __future__ import annotations

import os
import sys

import click

from .app import app
from .options import json_option, quiet_option


def restore_document(r, *, image: str | None, store: str | None, snapshot: str | None,
                     detached: bool) -> dict:  # fmt: skip
    """`ckpt restore --json`: a Restored, once the process runs (docs/CLI.md lists the keys)."""
    return {
        "pid": r.pid,
        "seconds": r.seconds,
        "pages": r.pages,
        "pages_filled": r.pages_filled,
        "image": os.path.abspath(image) if image is not None else None,
        "store": os.path.abspath(store) if store is not None else None,
        "snapshot": snapshot,
        "detached": detached,
        "externals": [
            {"pid": pid, "fd": fd, "what": what, "fd_here": mine}
            for pid, fd, what, mine in r.externals
        ],
    }


def inherit_fds(specs: tuple[str, ...]) -> dict[int, int]:
    """restore --inherit-fd N=FD|PATH → {N: an fd of this process}. A PATH is opened here
    for appending (created 0600 if missing; its last component not followed)."""
    from ..errors import UsageError

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


@click.command()
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
    "--reattach-tty",
    is_flag=True,
    help="A session of the image had a terminal outside it (a shell's terminal window, "
    "an sshd pty): make that same terminal its controlling terminal again, if it is still "
    "open, unchanged and no other session has it.",
)
@click.option(
    "--inherit-fd",
    "inherit",
    multiple=True,
    metavar="N=FD|PATH",
    help="fd N of the image led outside the dump (a log pipe, journald's socket): give it "
    "this ckpt's fd FD, or PATH opened for appending, instead of ckpt's own fd N.",
)
@json_option
@quiet_option
def restore(
    directory: str | None,
    store: str | None,
    at: str | None,
    detach: bool,
    new_pid: bool,
    shell_job: bool,
    reattach_tty: bool,
    inherit: tuple[str, ...],
    as_json: bool,
) -> None:
    """Restore a process (-D DIR or --store S); wait for it and exit with its status unless --detach."""
    from .. import api
    from ..errors import UsageError

    if (directory is None) == (store is None):
        raise UsageError("give exactly one of -D DIR or --store S")
    if at is not None and store is None:
        raise UsageError("--at needs --store")
    fds = inherit_fds(inherit)
    sid = None
    if store is not None:
        r, sid = api.restore_snapshot(
            store, at, new_pid=new_pid, shell_job=shell_job, detach=detach, inherit_fds=fds,
            reattach_tty=reattach_tty,
        )  # fmt: skip
        app.status(f"restored snapshot {sid} of {store}")
    else:
        r = api.restore(
            directory, new_pid=new_pid, shell_job=shell_job, detach=detach, inherit_fds=fds,
            reattach_tty=reattach_tty,
        )  # fmt: skip
    for pid, fd, what, mine in r.externals:
        app.status(f"fd {fd} of {pid} led outside the dump ({what}): now this ckpt's fd {mine}")
    if as_json:
        app.result(restore_document(r, image=directory, store=store, snapshot=sid, detached=detach))
        if detach:
            return
    elif detach:
        app.echo(r.pid)
        app.status(f"restored {r.pid} in {r.seconds:.2f} s")
        return
    else:
        app.status(f"restored {r.pid} in {r.seconds:.2f} s; waiting for it to exit")
    sys.stdout.flush()
    app.exit(api.wait_exit_status(r.pid, r.terminal))
