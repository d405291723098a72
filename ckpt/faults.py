"""Named fault-injection points for tests (CRIU's fault-injection, in miniature).

`CKPT_FAULT=<name>` makes ckpt SIGKILL itself when it reaches that point, so a
test can prove what a killed ckpt leaves behind. The failure points (`fail()`) raise
RestoreError instead, so a test can prove what a restore that fails and cleans up
after itself leaves behind:

    restore-files   after every process of the tree has its fds (TCP connections out
                    of repair mode) and attributes, before the rest
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "seized", "inject-setup", "inject", "inject-thread", "read-pages", "write-image", "commit",
)  # fmt: skip


FAIL_POINTS = ("restore-files",)


def point(name: str) -> None:
    if os.environ.get("CKPT_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fail(name: str) -> None:
    if os.environ.get("CKPT_FAULT") == name:
        from .errors import RestoreError

        raise RestoreError(f"restore failed: injected fault (CKPT_FAULT={name})")
