"""Which snapshots a retention policy keeps (restic / borg semantics).

--keep-last N     the N newest snapshots
--keep-hourly N   the newest snapshot of each of the N newest hours that have snapshots
--keep-daily N    likewise per calendar day
Hours and days are local time (as in restic), so "daily" follows the wall clock
of the machine that runs cron. Rules add up: a snapshot is kept if any rule
keeps it. Always kept, whatever the policy: the newest snapshot of the store,
and the newest snapshot of every process with a tracking record (the next
incremental snapshot of that process continues from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .info import SnapshotInfo


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None

    @property
    def keeps_all(self) -> bool:
        return self.keep_last is None and self.keep_hourly is None and self.keep_daily is None


def _hour(t: float) -> tuple[int, ...]:
    lt = time.localtime(t)
    return (lt.tm_year, lt.tm_mon, lt.tm_mday, lt.tm_hour)


def _day(t: float) -> tuple[int, ...]:
    lt = time.localtime(t)
    return (lt.tm_year, lt.tm_mon, lt.tm_mday)


def _buckets(
    newest_first: list[SnapshotInfo], n: int, key: Callable[[float], tuple[int, ...]]
) -> list[str]:
    """The newest snapshot of each of the n newest buckets (restic's keep-hourly/daily)."""
    out: list[str] = []
    last = None
    for s in newest_first:
        if len(out) >= n:
            break
        b = key(s.time)
        if b != last:
            out.append(s.id)
            last = b
    return out


def select(
    snaps: list[SnapshotInfo], policy: Policy, tracked_pids: Iterable[int] = ()
) -> dict[str, list[str]]:
    """Kept snapshot ids → why each is kept. `snaps` oldest → newest."""
    newest_first = sorted(snaps, key=lambda s: s.seq, reverse=True)
    why: dict[str, list[str]] = {}

    def keep(ids: Iterable[str], reason: str) -> None:
        for i in ids:
            why.setdefault(i, []).append(reason)

    if not newest_first:
        return why
    if policy.keeps_all:
        keep((s.id for s in newest_first), "all")
        return why
    keep([newest_first[0].id], "newest")
    if policy.keep_last:
        keep((s.id for s in newest_first[: policy.keep_last]), "last")
    if policy.keep_hourly:
        keep(_buckets(newest_first, policy.keep_hourly, _hour), "hourly")
    if policy.keep_daily:
        keep(_buckets(newest_first, policy.keep_daily, _day), "daily")
    for pid in sorted(set(tracked_pids)):
        mine = [s for s in newest_first if s.pid == pid]
        if mine:
            keep([mine[0].id], f"tracked pid {pid}")
    return why
