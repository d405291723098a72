"""Named fault-injection points for tests (CRIU's fault-injection, in miniature).

`CKPT_FAULT=<name>` makes ckpt SIGKILL itself when it reaches that point, so a
test can prove what a killed ckpt leaves behind.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "seized", "inject-setup", "inject", "inject-thread", "read-pages", "write-image", "commit",
)  # fmt: skip


def point(name: str) -> None:
    if os.environ.get("CKPT_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
