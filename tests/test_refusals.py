"""Fds ckpt cannot bring back are refused in one line that says why, before the
target is touched (issue 14: packet, netlink and fanotify fds; raw IP sockets, character
devices ckpt does not know, io_uring)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import DEADLINE, assert_error, proc_status, untraced_and_running, wait_until

HOLDERS = {
    "netlink": "import socket; s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)",
    "packet": "import socket; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
    "fanotify": "import ctypes, os; fd = ctypes.CDLL(None, use_errno=True).fanotify_init(0, 0)\n"
    "assert fd >= 0, os.strerror(ctypes.get_errno())",
    "raw IP": "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, "
    "socket.IPPROTO_ICMP)",
    "MPTCP": "import socket, sys\ntry:\n    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)\n"
    "except OSError as e:\n    print('SKIP kernel without MPTCP:', e, flush=True); sys.exit()",
    "character device": "import os; fd = os.open('/dev/kmsg', os.O_RDONLY)",
    "io_uring": "import ctypes, os; p = ctypes.create_string_buffer(120)\n"
    "fd = ctypes.CDLL(None, use_errno=True).syscall(425, 4, p)  # io_uring_setup\n"
    "assert fd >= 0, os.strerror(ctypes.get_errno())",
}
WHY = {
    "netlink": "netlink conversation",
    "packet": "ring buffers",
    "fanotify": "marks",
    "raw IP": "only TCP and UDP",
    "MPTCP": "only TCP and UDP",
    "character device": "/dev/kmsg",
    "io_uring": "requests in flight",
}
NAMED = {
    "raw IP": "IPv4 raw",
    "MPTCP": "protocol 262",
}  # how the refusal names the kind, when not by its key


@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_refused_with_the_reason(e2e, kind):
    script = HOLDERS[kind] + "\nprint('READY', flush=True)\nimport time; time.sleep(600)\n"
    p = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=e2e.base
    )
    try:
        first = p.stdout.readline().strip()
        if first.startswith("SKIP"):
            pytest.skip(first[5:])
        assert first == "READY"
        res = e2e.dump(p.pid, e2e.path("img"))
        assert_error(res, 5, f"process {p.pid}", NAMED.get(kind, kind), "not supported", WHY[kind])
        wait_until(lambda: untraced_and_running(p.pid), DEADLINE, "the process to run on")
        assert (proc_status(p.pid) or {}).get("TracerPid") == "0"
    finally:
        p.kill()
        p.wait()
