"""A token bucket for --max-bandwidth: makes slow links reproducible on fast ones.

The bucket holds at most `burst` bytes (default: 50 ms worth, at least 64 KiB),
so the sender never runs ahead by more than that, and a long pause does not buy
a burst that would distort the per-round rate the pre-copy loop measures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if rate <= 0:
            raise ValueError("rate must be > 0 bytes/s")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(64 << 10, rate * 0.05))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting for tokens (shows a link-bound sender)

    def take(self, n: int) -> None:
        """Block until n bytes may be sent (n may exceed the burst: we go into debt)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            wait = debt / self.rate
            self.waited += wait
            self._sleep(wait)
