"""`ckpt check` and `ckpt show`: what this kernel offers, what an image holds."""

from __future__ import annotations

import click

from .app import app, human
from .options import json_option


@click.command()
@json_option
def check(as_json: bool) -> None:
    """Show what this kernel offers and which dirty-tracking backend ckpt would use."""
    from ..kernel import features

    f = features.probe()
    if as_json:
        app.result(features.to_json(f))
        return
    app.echo(features.render_text(f))


@click.command()
@click.argument("directory", type=click.Path())
@json_option
def show(directory: str, as_json: bool) -> None:
    """Show what an image (DIR, or snapshot STORE[@ID]) holds: process, VMAs, fds, sizes."""
    from .. import api

    info = api.show(directory)
    if as_json:
        app.result(info)
        return
    echo = app.echo
    p, m = info["process"], info["meta"]
    echo(f"image    {info['image']}")
    echo(f"process  {p['pid']} {p['comm']!r}  exe {p['exe']}  cwd {p['cwd']}")
    echo(f"cmdline  {' '.join(p['cmdline'])}")
    echo(
        f"dumped   {m.get('host', '?')} kernel {m.get('kernel', '?')}  freeze "
        f"{m.get('freeze_ms', 0):.0f} ms  ckpt {m.get('ckpt_version', '?')}"
    )
    echo(
        f"signals  {p['sigactions']} handlers, mask {p['sigmask']}; timers {p['posix_timers']} posix, {p['itimers']} itimer"
    )
    echo(f"threads  {p['threads']}")
    for d in p["descendants"]:
        echo(
            f"child    {d['pid']} {d['comm']!r} (parent {d['ppid']}): {d['threads']} threads, "
            f"{d['fds']} fds"
        )
    for z in p.get("zombies", ()):
        echo(
            f"zombie   {z['pid']} {z['comm']!r} (parent {z['ppid']}): wait status {z['status']:#x}"
        )
    if p["net_lock"]:
        echo(f"netlock  nftables table inet {p['net_lock']} (deleted by the restore)")
    echo("")
    echo(f"{'start':>14} {'end':>14} perms {'pages':>8}  kind     name")
    for v in info["vmas"]:
        echo(
            f"{v['start']:>14x} {v['end']:>14x} {v['perms']}  {v['pages']:>8}  {v['kind']:<8} {v['name']}"
        )
    for o in info["shm"]:
        what = f"SysV shmid {o['sysv']['shmid']}" if "sysv" in o else "shared anonymous memory"
        echo(
            f"shm {o['index']:>4}  {what}, {human(o['size'])}, {o['pages']} pages, "
            f"mapped by {', '.join(map(str, o['mapped_by']))}"
        )
    echo("")
    for f in info["fds"]:
        echo(f"fd {f['fd']:>4}  {f['kind']:<4} pos {f['pos']:<10} {f['path']}")
    lay = info["layers"]
    echo("")
    for layer in lay.get("layers", []):
        echo(
            f"layer {layer['layer']:>3}  {layer['data_pages']:>9} data pages, {layer['zero_pages']:>7} zero pages, "
            f"{human(layer['bytes_raw'])} → {human(layer['bytes_stored'])} in {layer['chunks']} chunks"
        )
    tot = lay.get("total", {})
    if tot:
        echo(
            f"total      {human(tot['bytes_raw'])} of pages → {human(tot['bytes_stored'])} stored, format {lay.get('format', '?')}"
        )
