"""The pre-copy policy and its stop rule: plain data and a pure function, so the rule is
unit-tested on its own (tests/test_stop_rule.py) and migration's controller asks the
same question the loop does (api/converge.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Defaults, justified in docs/ARCHITECTURE.md ("Stop rule").
DEFAULT_MAX_ROUNDS = 8
DEFAULT_TARGET_DOWNTIME_MS = 50.0
DEFAULT_MAX_TIME = 60.0
SHRINK_FACTOR = 0.9  # a "meaningful drop" is at least 10% fewer written pages
# A plain dump of a process with more private memory than this copies it once while it
# runs, then freezes for what changed (docs/ARCHITECTURE.md "One round before a plain
# dump's freeze"): copying 64 MiB frozen takes ~45 ms here, about what arming costs.
ONCE_MIN_BYTES = 64 << 20


@dataclass
class RoundStats:
    round: int
    pages_written: int
    pages_copied: int
    bytes_copied: int
    seconds: float
    dirty_rate_pages_s: float
    est_freeze_ms: float


@dataclass
class Policy:
    max_rounds: int = DEFAULT_MAX_ROUNDS
    target_downtime_ms: float = DEFAULT_TARGET_DOWNTIME_MS
    max_time: float = DEFAULT_MAX_TIME


@dataclass
class PrecopyStats:
    tracker: str
    rounds: list[RoundStats] = field(default_factory=list)
    stop_reason: str = ""
    copy_rate: float = 0.0  # bytes/s, measured
    base_freeze_ms: float = 0.0  # a freeze with no pages to copy (measured when arming)

    def to_dict(self) -> dict:
        return {
            "tracker": self.tracker,
            "rounds": [asdict(r) for r in self.rounds],
            "stop_reason": self.stop_reason,
        }


def stop_reason(rounds: list[RoundStats], policy: Policy, k: int, elapsed: float) -> str:
    """Why pre-copy stops after round k ("" to go on): the stop rule, as a pure
    function of the rounds so far, the policy and the seconds spent (docs/ARCHITECTURE.md
    "Stop rule"); migration's controller asks the same question before the loop does."""
    r = rounds
    if k >= 1 and r[-1].est_freeze_ms <= policy.target_downtime_ms:
        return "converged"
    if k >= 3 and all(
        r[i].pages_written > SHRINK_FACTOR * r[i - 1].pages_written for i in (k - 1, k)
    ):
        return "not-shrinking"
    if k + 1 >= policy.max_rounds:
        return "max-rounds"
    if elapsed >= policy.max_time:
        return "max-time"
    return ""
