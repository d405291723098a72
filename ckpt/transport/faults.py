"""Fault points of the migration, for tests (CKPT_FAULT=<name>, like ckpt/faults.py).

    receive-midstream   the receiver SIGKILLs itself when layer 1 begins (after layer 0 is stored)
    receive-restore     the receiver's restore fails (RestoreError) instead of running
    receive-slow-restore  the receiver waits 5 s before its restore (the source gives up first)
    receive-stage       the staged restore fails when layer 2's layout is applied (mid pre-copy)
    migrate-cut-final   the source drops the connection right after the FROZEN marker

CKPT_TEST_FROZEN_CMD=<shell command> runs on the source right after the FROZEN
marker is sent (e.g. `ip link set veth0 down` to cut the network mid final round).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from ..errors import RestoreError

POINTS = (
    "receive-midstream", "receive-restore", "receive-slow-restore", "receive-stage",
    "migrate-cut-final",
)  # fmt: skip
SLOW_RESTORE_S = 5.0


def active(name: str) -> bool:
    return os.environ.get("CKPT_FAULT") == name


def kill_point(name: str) -> None:
    if active(name):
        if os.getpid() == 1:  # a PID namespace's init cannot SIGKILL itself: just vanish
            os._exit(128 + signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def restore_point() -> None:
    if active("receive-slow-restore"):
        time.sleep(SLOW_RESTORE_S)
    if active("receive-restore"):
        raise RestoreError("restore failed: injected fault (CKPT_FAULT=receive-restore)")


def stage_point(layer: int) -> None:
    if active("receive-stage") and layer == 2:
        raise RestoreError("staged restore failed: injected fault (CKPT_FAULT=receive-stage)")


def frozen_hook() -> None:
    cmd = os.environ.get("CKPT_TEST_FROZEN_CMD")
    if cmd:
        subprocess.run(["sh", "-c", cmd], check=False)
