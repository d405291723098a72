"""The source side of a live migration, in order.

    check the target → connect → (TLS) → authenticate      nothing touched the target yet
    dump(iterative, sink=NetSink, on_round=controller,      rounds stream while it runs;
         after_commit=wait for RUNNING)                      the final round is frozen
    RUNNING received → dump() kills our copy → DONE          the handover
    any failure → dump() thaws our copy; throttle lifted    it keeps running here

The one ambiguous case is a connection lost after the final state was sent
and before RUNNING arrived: the destination may have started its copy. The
error says so (docs/MIGRATION.md, failure matrix).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..capture.shm import SHM_KINDS, shm_kind
from ..capture.target import Target
from ..capture.tree import descendants
from ..capture.tty import TerminalFd, outside_terminal
from ..capture.validate import check_target
from ..capture.vmas import classify, unlinked_mapping
from ..errors import CkptError, DumpError, UnsupportedProcess
from ..kernel import procfs, shmobj
from ..precopy.policy import Policy
from ..transport import protocol, tls
from ..transport.auth import client_handshake, describe_protection
from ..transport.channel import Channel
from ..transport.errors import DestinationFailed
from ..transport.net import Address, connect
from ..transport.ratelimit import TokenBucket
from ..transport.sink import FreezeClock, NetSink
from ..transport.throttle import Throttle
from .converge import Controller, RoundRecord
from .dumping import DumpHooks, DumpOptions, run_dump
from .preflight import preflight

MIB = float(1 << 20)


@dataclass
class MigrateOptions:
    pid: int
    to: Address
    token: bytes
    policy: Policy
    tracker: str = "auto"
    tls: tls.TlsOptions = field(default_factory=tls.TlsOptions)
    max_bandwidth: float | None = None  # MiB/s on the wire
    throttle: str = "auto"
    level: int | None = None
    io_timeout: float = 20.0
    restore_timeout: float = 300.0
    connect_timeout: float = 10.0
    tree: bool = True  # the process's descendants too (sent as an image: no staging)
    tcp_established: bool = False
    cipher: str = protocol.CIPHER_AEAD  # CIPHER_CLEAR: --insecure-cleartext


@dataclass
class MigrationStats:
    """Everything --stats-json reports (also on failure)."""

    outcome: str = "failed"  # migrated | failed
    source_pid: int = 0
    destination: str = ""
    remote_pid: int | None = None
    tracker: str = ""
    stop_reason: str = ""
    converged: bool = False
    rounds: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    downtime_ms: float | None = None
    downtime: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    bytes_raw: int = 0
    bytes_wire: int = 0
    throttle: dict = field(default_factory=dict)
    max_bandwidth_mib_s: float | None = None
    handover_confirmed: bool = False
    error: str | None = None
    exit_code: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


class Layout:
    """The target's VMAs as of now, for the sink to send before each round's pages.

    Read right after the round collected its pages (or, in the final round, while
    the target is frozen); VmFlags come from the previous read when /proc/PID/maps
    is unchanged, so this costs one read of maps. A mapping the final capture would
    refuse is left out here (the capture fails the migration anyway).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self._maps: list | None = None

    def __call__(self) -> list:
        try:
            maps = procfs.maps_with_flags(self.pid, self._maps)
        except OSError as exc:
            raise DumpError(
                f"cannot read the memory layout of process {self.pid}: {exc}", pid=self.pid
            ) from None
        self._maps = maps
        vmas = []
        for m in maps:
            try:
                v = classify(self.pid, m)
            except UnsupportedProcess:
                continue
            if v is not None:
                vmas.append(v)
        return vmas


def traced_by_us(pid: int) -> bool:
    """Is pid in our ptrace stop (the final round's freeze)?"""
    try:
        return procfs.status(pid).get("TracerPid") == str(os.getpid())
    except (OSError, CkptError):
        return False


def _why_not_staged(opts: MigrateOptions) -> str:
    """Why the destination cannot build this process while the rounds arrive ("" if it
    can): the staged restore builds one process, makes memfds only with the fds, and
    places shared memory by address."""
    if opts.tree and descendants(opts.pid):
        return "the process has descendants"
    maps = procfs.maps(opts.pid)
    if any(m.deleted and m.name.startswith("/memfd:") for m in maps):
        return "the process maps a memfd"
    if any(unlinked_mapping(opts.pid, m) is not None for m in maps):
        return "the process maps an unlinked file"  # made with its fd record (restore/unlinked.py)
    if not _shared_memory_stageable(opts.pid, maps):
        return "the process maps part of a shared memory object, or one object twice"
    return ""


def _shared_memory_stageable(pid: int, maps) -> bool:
    """The staged restore places pages by address: each shared memory object must be
    mapped whole, once (capture/shm.py, project mode)."""
    seen: set[tuple[int, int]] = set()
    for m in maps:
        if not (m.shared and m.inode and shm_kind(m) in SHM_KINDS):
            continue
        ident = (m.dev_major, m.dev_minor, m.inode)
        whole = -(-shmobj.mapped_size(pid, m.start, m.end) // 4096) * 4096
        if ident in seen or m.offset != 0 or m.end - m.start != whole:
            return False
        seen.add(ident)
    return True


def _signal_throttle_ok(tracker: str) -> bool:
    """A SIGSTOP must never land while the tracker freezes the target between rounds."""
    if tracker == "auto":
        from ..kernel import features

        tracker = features.probe().dirty_backend
    return tracker != "soft-dirty"


def migrate(
    opts: MigrateOptions,
    report: Callable[[str], None],
    stats: MigrationStats,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> MigrationStats:
    """Move process opts.pid to opts.to; fills and returns `stats`. Raises CkptError on
    failure, after which the process still runs here (the message says so).
    report: one-line notes; on_round: each pre-copy round as the migration saw it."""
    t0 = time.monotonic()
    stats.source_pid = opts.pid
    stats.destination = str(opts.to)
    stats.max_bandwidth_mib_s = opts.max_bandwidth
    st = check_target(opts.pid)  # refuse a missing or unsupported target before connecting
    try:
        # (consume_errors: the source is killed once the destination runs)
        preflight(
            opts.pid, tree=opts.tree, tcp_established=opts.tcp_established, consume_errors=True
        )
    except TerminalFd as exc:
        raise UnsupportedProcess(
            f"{str(exc).split(': taken only with')[0]}: a migration cannot take a terminal "
            "(a shell job moves with `ckpt dump --shell-job` here and `ckpt restore "
            "--shell-job` on the other host)",
            pid=exc.pid,
        ) from None
    target = Target(opts.pid, st.starttime)
    if (outside := outside_terminal(opts.pid, tree=opts.tree)) is not None:
        raise UnsupportedProcess(
            f"{outside}: a migration cannot take it (only `ckpt restore --reattach-tty` on "
            "this host takes that terminal back)",
            pid=opts.pid,
        )

    peer = str(opts.to)
    ch = None
    try:
        ctx = tls.client_context(opts.tls)
        sock = connect(opts.to, opts.connect_timeout)
        sock.settimeout(opts.io_timeout)
        if ctx is not None:
            sock = tls.wrap_client(ctx, sock, opts.tls.server_name or opts.to.host, peer)
        ch = Channel(sock, peer, io_timeout=opts.io_timeout)
        info = client_handshake(ch, opts.token, opts.cipher)
    except CkptError as exc:
        if ch is not None:
            ch.close()
        exc = _annotate(exc, f"process {opts.pid} was not touched")
        stats.error, stats.exit_code = str(exc), exc.exit_code
        raise exc from None
    report(
        f"connected to {peer} ({info.host}, kernel {info.kernel}, ckpt {info.ckpt})"
        + "; authenticated, "
        + describe_protection(ch.cipher, ctx is not None)
    )
    if opts.max_bandwidth:
        ch.limiter = TokenBucket(opts.max_bandwidth * MIB)

    mode = opts.throttle
    if mode in ("auto", "signal") and not _signal_throttle_ok(opts.tracker):
        if mode == "signal":
            report("warning: the signal throttle cannot be used with this tracker; throttle off")
        mode = "cgroup" if mode == "auto" else "off"
    throttle = Throttle(
        opts.pid, st.starttime, mode, warn=lambda m: report(f"warning: {m}")
    )  # fmt: skip
    clock = FreezeClock()
    # A tree's members are only captured in the final freeze, and staged restore
    # builds one process: a process with descendants goes as an image (no layouts
    # sent, so the destination restores after the final round).
    why_image = _why_not_staged(opts)
    stage = not why_image
    if why_image:
        report(f"{why_image}: the destination restores it at the end")
    sink = NetSink(
        ch, opts.pid, clock, level=opts.level, restore_timeout=opts.restore_timeout,
        progress=report, layout=Layout(opts.pid) if stage else None,
        target_frozen=lambda: traced_by_us(opts.pid),
    )  # fmt: skip
    ctl = Controller(opts.policy, sink, clock, throttle, t0, report, on_round)
    try:
        dopts = DumpOptions(
            iterative=True, tracker=opts.tracker, policy=opts.policy, tree=opts.tree,
            tcp_established=opts.tcp_established,
        )  # fmt: skip
        hooks = DumpHooks(sink=sink, after_commit=sink.wait_running, staged=stage)
        res = run_dump(opts.pid, peer, dopts, on_round=ctl.on_round, hooks=hooks)
    except BaseException as exc:
        throttle.close()
        ch.close(abrupt=True)
        _fill(stats, ctl, sink, throttle, t0)
        if isinstance(exc, CkptError):
            exc = _where_now(exc, target, sink, peer)
            stats.error, stats.exit_code = str(exc), exc.exit_code
            raise exc from None
        stats.error = f"{type(exc).__name__}: {exc}"
        raise
    throttle.close()
    stats.handover_confirmed = sink.done()
    _fill(stats, ctl, sink, throttle, t0)
    stats.outcome = "migrated"
    stats.tracker = res.tracker
    stats.stop_reason = res.stop_reason
    stats.converged = res.stop_reason == "converged"
    stats.final["source_freeze_ms"] = res.freeze_ms
    return stats


def _fill(stats: MigrationStats, ctl: Controller, sink: NetSink, thr: Throttle, t0: float) -> None:
    stats.rounds = [r.to_dict() for r in ctl.records]
    final = sink.layers[len(ctl.records)] if len(sink.layers) > len(ctl.records) else None
    if final is not None:
        stats.final.update(pages_copied=final.pages, bytes_wire=final.bytes_stored)
    stats.bytes_raw = sum(lay.bytes_raw for lay in sink.layers)
    stats.bytes_wire = sink.ch.bytes_sent
    stats.total_seconds = time.monotonic() - t0
    stats.throttle = {
        "backend": thr.backend, "where": thr.where, "max_level": ctl.max_level,
        "period_s": thr.period,
    }  # fmt: skip
    run = sink.running
    if run is not None:
        stats.remote_pid = run.pid
        src = sink.frozen_for_ms or 0.0
        stats.downtime_ms = src + run.destination_ms
        freeze = sink.clock.last_round_end
        stats.downtime = {
            "source_freeze_to_marker_ms": src,
            "destination_ms": run.destination_ms,
            "destination_commit_ms": run.commit_ms,
            "destination_restore_ms": run.restore_ms,
            "source_view_ms": (run.received_at - freeze) * 1000,
            "source_state_sent_ms": (
                (sink.state_sent_at - freeze) * 1000 if sink.state_sent_at is not None else None
            ),
            "staged": bool(run.parts.get("staged")),
            "destination_parts": run.parts,
        }


def _where_now(exc: CkptError, target: Target, sink: NetSink, peer: str) -> CkptError:
    """The same error, with where the process is now appended to its message."""
    if target.alive():
        where = f"process {target.pid} keeps running here"
        if sink.running is None and sink.committed and not isinstance(exc, DestinationFailed):
            if sink.abort_sent:
                where += (
                    f"; {peer} was told to drop any copy it restores "
                    "(if that message was lost, check there)"
                )
            else:
                where += (
                    f", but {peer} may have started its copy too (the connection broke after "
                    "the final state was sent): check there before using either"
                )
    else:
        where = f"process {target.pid} is gone (it exited during the migration)"
    return _annotate(exc, where, prefix="migration failed: ")


def _annotate(exc: CkptError, where: str, prefix: str = "") -> CkptError:
    try:
        return type(exc)(f"{prefix}{exc}; {where}", pid=exc.pid, step=exc.step)
    except TypeError:  # a subclass with another constructor: keep it as it is
        return exc
