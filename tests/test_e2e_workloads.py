"""The workloads themselves, without ckpt: each reaches READY and, left alone,
verifies OK. If one of these fails, the end-to-end failures are the workload's
fault, not ckpt's."""

from __future__ import annotations

import signal

import pytest
from helpers import current_syscall, wait_until

CASES = [
    ("memory", ("8",)),
    ("signals", ()),
    ("files", ()),
    ("threads", ()),
    ("traced", ()),
    ("syscalls", ("nanosleep", "1")),
    ("syscalls", ("futex", "1")),
    ("syscalls", ("pause",)),
    ("pywork", ("20",)),
]


@pytest.mark.parametrize(
    ("name", "args"), CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c)
)
def test_workload_verifies_without_ckpt(e2e, name, args):
    w = e2e.spawn(name, *args)
    sig = signal.SIGUSR2
    if name == "syscalls":
        nr = int(w.ready["nr"])
        wait_until(lambda: current_syscall(w.pid) == nr, 20, "the workload to block")
        sig = signal.SIGUSR2 if args[0] == "pause" else None
    v = e2e.verify(w, w.pid, sig)
    assert v.ok, v.line
    for key in ("sum", "digest"):
        if key in w.ready:
            assert v.fields[key] == w.ready[key]
    assert w.reap() == 0
