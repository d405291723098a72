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

from .errors import CkptError


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
@click.option("-D", "--images-dir", "directory", required=True, type=click.Path(), help="Image directory to create.")
@click.option("--leave-running", is_flag=True, help="Let the process run on after the dump.")
@click.option("--level", type=click.IntRange(1, 19), default=None, help="zstd level (default: fast).")
def dump(pid: int, directory: str, leave_running: bool, level: int | None) -> None:
    """Checkpoint process PID into DIR (then kill it, unless --leave-running)."""
    from . import api

    r = api.dump(pid, directory, leave_running=leave_running, level=level)
    status(
        f"dumped {r.pid} to {r.image}: {r.vmas} VMAs, {_human(r.bytes_raw)} of pages "
        f"→ {_human(r.bytes_stored)} stored, freeze {r.freeze_ms:.0f} ms, total {r.seconds:.2f} s"
        + ("; left running" if leave_running else "; process killed")
    )


@cli.command()
@click.option("-D", "--images-dir", "directory", required=True, type=click.Path(), help="Image directory.")
@click.option("--detach", is_flag=True, help="Print the PID and return while the process runs on.")
@click.option("--new-pid", is_flag=True, help="Let the kernel pick a new PID instead of the dumped one.")
def restore(directory: str, detach: bool, new_pid: bool) -> None:
    """Restore the process in DIR; wait for it and exit with its status unless --detach."""
    from . import api

    r = api.restore(directory, new_pid=new_pid)
    if detach:
        click.echo(r.pid)
        status(f"restored {r.pid} in {r.seconds:.2f} s")
        return
    status(f"restored {r.pid} in {r.seconds:.2f} s; waiting for it to exit")
    sys.stdout.flush()
    code = api.wait_exit_status(r.pid)
    sys.exit(code)


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def show(directory: str, as_json: bool) -> None:
    """Show what an image holds: process, VMAs, fds, sizes."""
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
    click.echo(f"signals  {p['sigactions']} handlers, mask {p['sigmask']}; timers {p['posix_timers']} posix, {p['itimers']} itimer")
    click.echo("")
    click.echo(f"{'start':>14} {'end':>14} perms {'pages':>8}  kind     name")
    for v in info["vmas"]:
        click.echo(
            f"{v['start']:>14x} {v['end']:>14x} {v['perms']}  {v['pages']:>8}  {v['kind']:<8} {v['name']}"
        )
    click.echo("")
    for f in info["fds"]:
        click.echo(f"fd {f['fd']:>4}  {f['kind']:<4} pos {f['pos']:<10} {f['path']}")
    lay = info["layers"]
    click.echo("")
    click.echo(f"layers   {json.dumps(lay, default=str)}")


def main() -> None:
    try:
        cli.main(standalone_mode=False, prog_name="ckpt")
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
    except Exception as e:  # noqa: BLE001 - the last line of defence: no tracebacks for users
        if os.environ.get("CKPT_DEBUG"):
            raise
        click.echo(f"ckpt: internal error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
