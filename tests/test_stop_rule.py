"""The pre-copy stop rule (precopy.stop_reason) as the pure function it is: each
reason, its threshold, and their order (docs/ARCHITECTURE.md "Stop rule")."""

from __future__ import annotations

import pytest

from ckpt.precopy import Policy, RoundStats, stop_reason


def rounds(written: list[int], est_ms: list[float] | None = None) -> list[RoundStats]:
    est = est_ms or [1000.0] * len(written)
    return [
        RoundStats(
            round=k,
            pages_written=w,
            pages_copied=w,
            bytes_copied=w * 4096,
            seconds=0.1,
            dirty_rate_pages_s=0.0,
            est_freeze_ms=e,
        )
        for k, (w, e) in enumerate(zip(written, est))
    ]


POLICY = Policy(max_rounds=8, target_downtime_ms=50.0, max_time=60.0)


def test_round_zero_never_converges():
    """Round 0 copies everything: its estimate is not a reason to stop."""
    assert stop_reason(rounds([1000], [1.0]), POLICY, 0, 0.0) == ""


@pytest.mark.parametrize(("est", "want"), [(50.0, "converged"), (50.1, "")])
def test_converged_at_the_downtime_target(est, want):
    assert stop_reason(rounds([1000, 10], [900.0, est]), POLICY, 1, 0.0) == want


def test_not_shrinking_needs_two_rounds_of_less_than_ten_percent():
    assert stop_reason(rounds([1000, 500, 460, 420]), POLICY, 3, 0.0) == "not-shrinking"
    # the last round shrank by more than 10 %: go on
    assert stop_reason(rounds([1000, 500, 460, 400]), POLICY, 3, 0.0) == ""
    # before round 3 there is no such judgement
    assert stop_reason(rounds([1000, 990, 985]), POLICY, 2, 0.0) == ""


def test_budgets():
    p = Policy(max_rounds=3, target_downtime_ms=50.0, max_time=5.0)
    assert stop_reason(rounds([1000, 500, 200]), p, 2, 0.0) == "max-rounds"
    assert stop_reason(rounds([1000, 500]), p, 1, 5.0) == "max-time"
    assert stop_reason(rounds([1000, 500]), p, 1, 4.9) == ""


def test_converged_comes_first():
    """A round that fits the target stops as converged even when budgets ran out too."""
    p = Policy(max_rounds=2, target_downtime_ms=50.0, max_time=1.0)
    assert stop_reason(rounds([1000, 5], [900.0, 10.0]), p, 1, 9.0) == "converged"
