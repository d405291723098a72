"""The convergence controller: per-round progress, throttling, and the freeze stamp.

dump() calls on_round() after each pre-copy round. The controller
- records the round (with the bytes it put on the wire) and prints a progress line;
- decides the throttle level: a round whose written set is more than TRIGGER of
  the previous one's means the process dirties memory nearly as fast as the link
  carries it (at 0.5 per round, 50k pages take six rounds to reach a 50 ms final
  round; at 0.9 they never do before the pre-copy loop's own "not shrinking"
  rule gives up), so it is slowed down, progressively (LEVELS), until rounds shrink;
- predicts whether this was the last pre-copy round (it asks the pre-copy loop's
  own stop rule, see predict_stop) and, if so, lifts the throttle before
  returning: dump() freezes the target right after, and the final round must
  neither capture a throttle SIGSTOP nor run starved;
- stamps the time it returns (FreezeClock): the freeze starts right after the
  last stamp, which is what the downtime measurement starts from.

Why the level rises only once it has been observed: pages written while level L
was in effect are reported one round later, so raising again before that would
punish the process for a slowdown it already got.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..precopy.policy import Policy, RoundStats, stop_reason
from ..transport.sink import FreezeClock, NetSink
from ..transport.throttle import Throttle

TRIGGER = 0.5  # a round that does not halve the written set converges too slowly
LEVELS = (0.0, 0.5, 0.75, 0.875, 0.95)  # fraction of CPU time taken away
MIB = float(1 << 20)


@dataclass
class RoundRecord:
    """One pre-copy round as the migration saw it (also the --stats-json entry)."""

    round: int
    pages_written: int
    pages_copied: int
    bytes_raw: int
    bytes_wire: int
    seconds: float
    wire_mib_s: float
    dirty_rate_pages_s: float
    est_freeze_ms: float
    throttle: float  # level in effect while this round's pages were written and copied
    throttle_next: float  # level set after it (0 before the final round)
    last: bool  # the pre-copy loop stops after this round

    def to_dict(self) -> dict:
        return asdict(self)


def predict_stop(rounds: list[RoundStats], policy: Policy, k: int, t_start: float) -> str:
    """Will the pre-copy loop stop after round k? The loop's own rule (precopy.stop_reason).

    t_start is taken before dump() starts its clock, so a time-budget stop is predicted
    no later than it happens (at worst one round early, which only lifts the throttle
    early)."""
    return stop_reason(rounds, policy, k, time.monotonic() - t_start)


def next_level(level: float, shrink: float, observed: bool) -> float:
    """The throttle level after a round whose written set was `shrink` x the previous one."""
    if shrink <= TRIGGER:
        return level
    if level <= 0:  # first reaction: the worse the stall, the harder
        return 0.875 if shrink >= 0.95 else 0.75 if shrink >= 0.85 else 0.5
    if not observed:
        return level
    higher = [x for x in LEVELS if x > level]
    return higher[0] if higher else level


class Controller:
    def __init__(
        self,
        policy: Policy,
        sink: NetSink,
        clock: FreezeClock,
        throttle: Throttle | None,
        t_start: float,
        report: Callable[[str], None],
        on_record: Callable[[RoundRecord], None] | None = None,
    ):
        self.policy = policy
        self.sink = sink
        self.clock = clock
        self.throttle = throttle
        self.t_start = t_start
        self.report = report
        self.on_record = on_record  # progress display (cli/progress.py)
        self.rounds: list[RoundStats] = []
        self.records: list[RoundRecord] = []
        self.level = 0.0

    def on_round(self, r: RoundStats) -> None:
        try:
            self._on_round(r)
        finally:
            self.clock.stamp()

    def _on_round(self, r: RoundStats) -> None:
        self.rounds.append(r)
        k = r.round
        during = self.level
        last = bool(predict_stop(self.rounds, self.policy, k, self.t_start))
        if last:
            new = 0.0
        elif k == 0:
            new = self.level
        else:
            prev = self.rounds[k - 1].pages_written if k >= 2 else self.rounds[0].pages_copied
            shrink = r.pages_written / max(prev, 1)
            observed = self.records[k - 1].throttle == self.level
            new = next_level(self.level, shrink, observed)
        self._apply(new)
        lay = self.sink.layers[-1] if self.sink.layers else None
        wire = lay.bytes_stored if lay is not None else 0
        rec = RoundRecord(
            round=k, pages_written=r.pages_written, pages_copied=r.pages_copied,
            bytes_raw=r.bytes_copied, bytes_wire=wire, seconds=r.seconds,
            wire_mib_s=wire / MIB / r.seconds if r.seconds > 0 else 0.0,
            dirty_rate_pages_s=r.dirty_rate_pages_s, est_freeze_ms=r.est_freeze_ms,
            throttle=during, throttle_next=self.level, last=last,
        )  # fmt: skip
        self.records.append(rec)
        self.report(self._line(rec))
        if self.on_record is not None:
            self.on_record(rec)

    def _apply(self, level: float) -> None:
        if self.throttle is None:
            return
        if level <= 0:
            self.throttle.lift()
            self.level = 0.0
        elif level != self.level:
            self.level = self.throttle.set(level)

    @staticmethod
    def _line(rec: RoundRecord) -> str:
        thr = f"throttle {rec.throttle * 100:3.0f}%"
        if rec.throttle_next != rec.throttle:
            thr += f" → {rec.throttle_next * 100:.0f}%"
        return (
            f"round {rec.round:>2}: {rec.pages_written:>8} pages written, "
            f"{rec.bytes_raw / MIB:>8.1f} MiB sent ({rec.bytes_wire / MIB:.1f} MiB on the wire) "
            f"in {rec.seconds * 1000:>5.0f} ms, {rec.wire_mib_s:>6.1f} MiB/s, {thr}, "
            f"est. freeze {rec.est_freeze_ms:>6.1f} ms" + ("; final round next" if rec.last else "")
        )

    @property
    def max_level(self) -> float:
        return max((r.throttle_next for r in self.records), default=0.0)
