"""`ckpt migrate` and `ckpt receive`: live migration between two hosts (docs/MIGRATION.md).

Data goes to stdout (the PID the process runs as on the destination), status and
progress to stderr; failures are CkptError subclasses (ckpt/transport/errors.py: 20+).
They also run alone as `python -m ckpt.transport ...` (`transport_group`).
"""

from __future__ import annotations

import sys

import click

from .app import app, human
from .options import (
    MIGRATE_MAX_ROUNDS,
    MIGRATE_MAX_TIME,
    json_option,
    level_option,
    max_rounds_option,
    max_time_option,
    precopy_policy,
    quiet_option,
    target_downtime_option,
    tcp_established_option,
    tracker_option,
    tree_option,
)

TOKEN_HELP = (
    "Shared secret: owned by us, mode 0600, at least 128 bits of entropy (make one with "
    "`head -c 32 /dev/urandom | base64 > F`); the same file on both hosts."
)
CLEARTEXT_WARNING = (
    "warning: --insecure-cleartext: the process's memory and state cross the network "
    "unencrypted (anyone on the path can read them); frames are only authenticated"
)


def _cleartext_option(f):
    return click.option(
        "--insecure-cleartext",
        is_flag=True,
        help="Do not encrypt the stream (frames are still authenticated by the token); "
        "both sides must say so. Default: AES-256-GCM with keys derived from the token.",
    )(f)


def _cipher(insecure_cleartext: bool) -> str:
    from ..transport.protocol import CIPHER_AEAD, CIPHER_CLEAR

    if insecure_cleartext:
        app.status(CLEARTEXT_WARNING)
        return CIPHER_CLEAR
    return CIPHER_AEAD


def _tls_options(f):
    for opt in reversed(
        [
            click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                         help="Our TLS certificate (PEM); on receive it turns TLS on."),
            click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                         help="The certificate's private key (PEM), if not in --tls-cert."),
            click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                         help="CA certificates to verify the peer with (receive: require "
                              "client certificates signed by it)."),
        ]
    ):  # fmt: skip
        f = opt(f)
    return f


@click.command()
@click.option(
    "--listen",
    "listen_addr",
    required=True,
    metavar="ADDR:PORT",
    help="Address to accept the source on (:PORT for every address).",
)
@click.option(
    "--token-file",
    required=True,
    type=click.Path(dir_okay=False),
    help=TOKEN_HELP,
)
@click.option(
    "-D",
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the incoming image is assembled (default: $TMPDIR); removed afterwards.",
)
@click.option(
    "--keep-images",
    type=click.Path(),
    default=None,
    help="Keep the received image here (a normal image: `ckpt restore -D DIR`).",
)
@click.option("--new-pid", is_flag=True, help="Let the kernel pick a new PID.")
@click.option(
    "--detach",
    is_flag=True,
    help="Return once the process runs (default: wait, exit with its status).",
)
@click.option(
    "--io-timeout",
    type=click.FloatRange(0.5),
    default=20.0,
    show_default=True,
    help="Seconds without data from the source before giving up.",
)
@click.option(
    "--accept-timeout",
    type=click.FloatRange(0.1),
    default=None,
    help="Seconds to wait for a source to authenticate (default: forever).",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(0.5),
    default=10.0,
    show_default=True,
    help="Seconds a connection may take to authenticate (TLS included) before it is closed.",
)
@_cleartext_option
@click.option(
    "--level",
    type=click.IntRange(1, 19),
    default=None,
    help="Unused (kept images store the chunks as they arrive); accepted for compatibility.",
)
@click.option(
    "--no-stage",
    is_flag=True,
    help="Do not build the process while the rounds arrive: assemble an image and "
    "restore it after the final round (slower; for comparison).",
)
@_tls_options
@json_option
@quiet_option
def receive(
    listen_addr: str, token_file: str, work_dir: str | None, keep_images: str | None,
    new_pid: bool, detach: bool, io_timeout: float, accept_timeout: float | None,
    handshake_timeout: float, insecure_cleartext: bool, level: int | None, no_stage: bool,
    tls_cert: str | None, tls_key: str | None, tls_ca: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Receive a migrating process and run it here."""
    from ..api import wait_exit_status
    from ..api.receive import ReceiveOptions
    from ..api.receive import receive as do_receive
    from ..transport.auth import load_token
    from ..transport.net import parse_address
    from ..transport.tls import TlsOptions

    opts = ReceiveOptions(
        listen=parse_address(listen_addr, listen=True), token=load_token(token_file),
        work_dir=work_dir, keep_images=keep_images, new_pid=new_pid, io_timeout=io_timeout,
        accept_timeout=accept_timeout, tls=TlsOptions(tls_cert, tls_key, tls_ca), level=level,
        stage=not no_stage, cipher=_cipher(insecure_cleartext),
        handshake_timeout=handshake_timeout,
    )  # fmt: skip

    def on_running(pid: int) -> None:
        if not as_json:  # --json: the PID is in the document, once the handover is done
            app.echo(pid)
            sys.stdout.flush()

    r = do_receive(opts, app.status, on_running)
    if as_json:
        app.result(receive_document(r, detached=detach))
    else:
        _receive_summary(r)
    if detach:
        return
    sys.stdout.flush()
    app.exit(wait_exit_status(r.pid))


def receive_document(r, *, detached: bool) -> dict:
    """`ckpt receive --json`: a ReceiveResult (docs/CLI.md lists the keys)."""
    return {
        "pid": r.pid,
        "source_pid": r.source_pid,
        "peer": r.peer,
        "layers": r.layers,
        "bytes_received": r.bytes_received,
        "seconds": r.seconds,
        "downtime_ms": r.downtime_ms,
        "source_frozen_ms": r.source_frozen_ms,
        "destination_ms": r.destination_ms,
        "commit_ms": r.commit_ms,
        "restore_ms": r.restore_ms,
        "staged": r.staged,
        "parts": r.parts,
        "image": r.image,
        "confirmed": r.confirmed,
        "detached": detached,
    }


def _receive_summary(r) -> None:
    if r.staged:
        p = r.parts
        here = (
            f"final round in place at {p.get('final_end_at_ms', 0):.0f}, state at "
            f"{p.get('state_at_ms', 0):.0f}, then zap {p.get('zap_ms', 0):.0f} + "
            f"process state {p.get('state_ms', 0):.0f}; staged restore"
        )
    else:
        here = f"commit {r.commit_ms:.0f}, restore {r.restore_ms:.0f}"
    app.status(
        f"received process {r.source_pid} from {r.peer}: {r.layers} layers, "
        f"{human(r.bytes_received)} on the wire in {r.seconds:.2f} s; running as PID {r.pid}; "
        f"downtime {r.downtime_ms:.0f} ms (source freeze→marker {r.source_frozen_ms:.0f} ms "
        f"+ here {r.destination_ms:.0f} ms: {here})"
        + (f"; image kept in {r.image}" if r.image else "")
        + ("" if r.confirmed else "; the source did not confirm the handover")
    )


@click.command()
@click.argument("pid", type=int)
@click.option(
    "--to", "to", required=True, metavar="HOST:PORT", help="The `ckpt receive` to send to."
)
@click.option(
    "--token-file",
    required=True,
    type=click.Path(dir_okay=False),
    help=TOKEN_HELP,
)
@target_downtime_option
@click.option(
    "--max-bandwidth",
    type=click.FloatRange(0.01),
    default=None,
    metavar="MIB/S",
    help="Cap on the bytes put on the wire, in MiB/s.",
)
@tracker_option
@click.option(
    "--stats-json",
    type=click.Path(),
    default=None,
    help="Write per-round statistics, downtime and outcome as JSON here.",
)
@max_rounds_option(MIGRATE_MAX_ROUNDS)
@max_time_option(MIGRATE_MAX_TIME)
@click.option(
    "--throttle",
    type=click.Choice(["auto", "cgroup", "signal", "off"]),
    default="auto",
    show_default=True,
    help="How to slow the process down when pre-copy does not converge.",
)
@level_option
@click.option(
    "--io-timeout",
    type=click.FloatRange(0.5),
    default=20.0,
    show_default=True,
    help="Seconds the destination may stay silent (or accept nothing).",
)
@click.option(
    "--restore-timeout",
    type=click.FloatRange(1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for the destination to report the process running.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds to keep retrying a refused connection.",
)
@_cleartext_option
@click.option("--tls", "use_tls", is_flag=True, help="Use TLS (implied by --tls-ca/--tls-cert).")
@click.option(
    "--tls-server-name",
    default=None,
    help="Name the destination's certificate must carry (default: HOST).",
)
@_tls_options
@tree_option
@tcp_established_option
@json_option
@quiet_option
def migrate(
    pid: int, to: str, token_file: str, target_downtime_ms: float | None,
    max_bandwidth: float | None, tracker: str, stats_json: str | None, max_rounds: int | None,
    max_time: float | None, throttle: str, level: int | None, io_timeout: float,
    restore_timeout: float, connect_timeout: float, insecure_cleartext: bool, use_tls: bool,
    tls_server_name: str | None,
    tls_cert: str | None, tls_key: str | None, tls_ca: str | None, tree: bool,
    tcp_established: bool, as_json: bool,
) -> None:  # fmt: skip
    """Move process PID to another host running `ckpt receive`; it keeps running here
    unless the destination reports it running there."""
    from ..api.migrate import MigrateOptions, MigrationStats
    from ..api.migrate import migrate as do_migrate
    from ..errors import CkptError
    from ..transport.auth import load_token
    from ..transport.net import parse_address
    from ..transport.tls import TlsOptions

    policy = precopy_policy(
        max_rounds, target_downtime_ms, max_time,
        default_rounds=MIGRATE_MAX_ROUNDS, default_time=MIGRATE_MAX_TIME,
    )  # fmt: skip
    opts = MigrateOptions(
        pid=pid, to=parse_address(to), token=load_token(token_file), policy=policy,
        tracker=tracker, tls=TlsOptions(tls_cert, tls_key, tls_ca, tls_server_name, use_tls),
        max_bandwidth=max_bandwidth, throttle=throttle, level=level, io_timeout=io_timeout,
        restore_timeout=restore_timeout, connect_timeout=connect_timeout, tree=tree,
        tcp_established=tcp_established, cipher=_cipher(insecure_cleartext),
    )  # fmt: skip
    stats = MigrationStats()
    try:
        with app.progress(f"migrate {pid} to {to}") as progress:
            on_round = progress.migrate_round if progress is not None else None
            do_migrate(opts, app.status, stats, on_round)
    except CkptError:
        if as_json and stats.error is not None:
            app.result(stats.to_dict())  # outcome "failed", with error and exit_code
        raise
    finally:
        if stats_json:
            stats.write(stats_json)
    if as_json:
        app.result(stats.to_dict())
        return
    d = stats.downtime
    app.status(
        f"migrated process {pid} to {stats.destination} (PID {stats.remote_pid} there) in "
        f"{stats.total_seconds:.2f} s: {len(stats.rounds)} pre-copy rounds ({stats.stop_reason}), "
        f"{human(stats.bytes_raw)} of pages, {human(stats.bytes_wire)} on the wire; "
        f"downtime {stats.downtime_ms:.0f} ms (source freeze→marker "
        f"{d['source_freeze_to_marker_ms']:.0f} ms + destination {d['destination_ms']:.0f} ms"
        + (
            f": staged, {d['destination_restore_ms']:.0f} after the state arrived); "
            if d.get("staged")
            else f": commit {d['destination_commit_ms']:.0f}, "
            f"restore {d['destination_restore_ms']:.0f}); "
        )
        + f"max throttle {stats.throttle['max_level'] * 100:.0f}%"
        + ("" if stats.handover_confirmed else "; the destination did not hear our confirmation")
    )
    app.echo(stats.remote_pid)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def transport_group() -> None:
    """Live migration commands."""


transport_group.add_command(receive)
transport_group.add_command(migrate)


def main() -> None:
    """`python -m ckpt.transport`: fails like ckpt's main (one error line, the exit code)."""
    app.run(transport_group)
