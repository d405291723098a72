"""Fault points of the migration, for tests (CKPT_FAULT=<name>; ckpt/faults.py's Point
lists them with the others, and every function here refuses a name it does not list).

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
from ..faults import ACT, FAIL, KILL, active

SLOW_RESTORE_S = 5.0


def kill_point(name: str) -> None:
    if active(name, KILL):
        if os.getpid() == 1:  # a PID namespace's init cannot SIGKILL itself: just vanish
            os._exit(128 + signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def restore_point() -> None:
    if active("receive-slow-restore", ACT):
        time.sleep(SLOW_RESTORE_S)
    if active("receive-restore", FAIL):
        raise RestoreError("restore failed: injected fault (CKPT_FAULT=receive-restore)")


def stage_point(layer: int) -> None:
    if active("receive-stage", FAIL) and layer == 2:
        raise RestoreError("staged restore failed: injected fault (CKPT_FAULT=receive-stage)")


def frozen_hook() -> None:
    cmd = os.environ.get("CKPT_TEST_FROZEN_CMD")
    if cmd:
        subprocess.run(["sh", "-c", cmd], check=False)
