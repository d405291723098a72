"""Pre-copy: rounds of page copies while the target runs, then the final frozen round.

policy.py   the stop rule (pure) and its defaults
collect.py  one round's page list
rounds.py   the loop (Precopy) and the descendants it follows (Member)
arm.py      arming a tracker inside a briefly frozen process
final.py    the final round: the frozen process's state and its last pages
"""

from .policy import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_MAX_TIME,
    DEFAULT_TARGET_DOWNTIME_MS,
    Policy,
    PrecopyStats,
    RoundStats,
    stop_reason,
)

__all__ = [
    "DEFAULT_MAX_ROUNDS",
    "DEFAULT_MAX_TIME",
    "DEFAULT_TARGET_DOWNTIME_MS",
    "Policy",
    "PrecopyStats",
    "RoundStats",
    "stop_reason",
]
