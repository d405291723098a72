"""Parsing the TIME form of `--at`: ISO 8601 or relative (`-1h`, `-2d12h`, `-90s`).

Why these two shapes only: they can never be confused with a snapshot id. Ids
are `20261125T231800Z-0007` (basic format, no dash inside the date), while an
ISO time here must use the extended date `2026-11-25…`, and relative times
start with "-". So `resolve()` never has to guess which one the user meant.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

from ..errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_REL = re.compile(r"^-(?:\d+(?:\.\d+)?[smhdw])+$")
_REL_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}")


def looks_like_time(text: str) -> bool:
    return bool(_REL.match(text) or _ISO.match(text))


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds for `text`. ISO without a zone means local time."""
    if _REL.match(text):
        delta = sum(float(n) * _UNITS[u] for n, u in _REL_PART.findall(text))
        return (time.time() if now is None else now) - delta
    if _ISO.match(text):
        try:
            dt = datetime.fromisoformat(text.replace(" ", "T", 1))
        except ValueError:
            raise UsageError(
                f"cannot parse time {text!r}: use ISO 8601 (2026-11-25T23:18:00Z, "
                "2026-11-25 23:18) or relative (-1h, -2d, -1h30m)"
            ) from None
        return dt.timestamp()  # naive → local time, aware → its own zone
    raise UsageError(
        f"{text!r} is not a time (ISO 8601 like 2026-11-25T23:18 or relative like -1h)"
    )
