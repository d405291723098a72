"""Kernel features this machine lacks, tested for real on a kernel that has them.

The host kernel has no CONFIG_MEM_SOFT_DIRTY, so the soft-dirty variants of the
pre-copy tests skip here. Debian 12's packaged 6.1 kernel has soft-dirty and
lacks userfaultfd WP_ASYNC and PAGEMAP_SCAN, so booting it (scripts/vm-run:
qemu under TCG, the host's filesystem over 9p) tests the soft-dirty backend
and proves that `--tracker auto` falls back to it. The selection below runs
inside the VM; it must pass there and none of it may be skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VM_RUN = ROOT / "scripts" / "vm-run"
VM_BOOT_FAILED = 125  # vm-run's exit status when the VM fails (see docs/VM.md)

IN_VM = [
    "tests/test_precopy.py::test_busy_writer_layers_restore[soft-dirty]",
    "tests/test_precopy.py::test_mutations_between_rounds[soft-dirty]",
    "tests/test_precopy.py::test_leave_running_leaves_nothing[soft-dirty]",
    "tests/test_precopy.py::test_target_exits_mid_rounds[soft-dirty]",
    "tests/test_precopy.py::test_killed_at_fault_point[soft-dirty-round]",
    "tests/test_precopy.py::test_unavailable_tracker_is_exit_13[uffd-wp]",
    "tests/test_precopy.py::test_auto_tracker_is_the_check_backend",
    # threads and process trees under soft-dirty (the tree test uses --tracker auto)
    "tests/test_threads.py::test_pthreads_iterative[soft-dirty]",
    "tests/test_tree.py::test_tree_members_are_precopied",
]


@pytest.mark.skipif(os.environ.get("CKPT_IN_VM") == "1", reason="already running inside the VM")
def test_soft_dirty_backend_on_debian_6_1_kernel():
    setup = subprocess.run([str(VM_RUN), "--setup"], capture_output=True, text=True, timeout=900)
    assert setup.returncode == 0, (
        f"cannot prepare the VM (qemu + Debian 6.1 kernel):\n{setup.stderr[-3000:]}"
    )
    cmd = [
        str(VM_RUN), "--timeout", "840", "--",
        sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
        *IN_VM,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode == VM_BOOT_FAILED:
        # the VM itself did not come up (qemu/TCG under load): boot it once more;
        # a failing test inside the VM is never retried
        print(f"vm-run could not boot the VM, retrying once:\n{r.stderr[-2000:]}")
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"tests failed inside the VM (exit {r.returncode}):\n{out[-6000:]}"
    m = re.search(r"(\d+) passed", r.stdout)
    assert m and int(m.group(1)) == len(IN_VM), (
        f"expected {len(IN_VM)} passed in the VM:\n{out[-3000:]}"
    )
    assert "skipped" not in r.stdout, f"nothing may be skipped inside the VM:\n{out[-3000:]}"
