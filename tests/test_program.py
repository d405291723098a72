"""Injected programs (kernel/program.py, kernel/inject_batch.py): the choices and checks
that need no process. Programs themselves run in tests/test_threads.py (dumps killed
inside them, the restore of every thread's state), test_users.py (credentials copied
from one thread to the others) and test_attrs.py."""

from __future__ import annotations

import errno
import signal

import pytest

from ckpt.errors import RestoreError
from ckpt.kernel import program
from ckpt.kernel.inject_batch import ignored_marker
from ckpt.kernel.remote import RemoteError

SIG_DFL, SIG_IGN, HANDLER = 0, 1, 0x401000


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def test_dump_marker_is_a_signal_the_process_ignores():
    # nothing set: SIGURG (ignored by default), the first choice
    assert ignored_marker({}, set()) == signal.SIGURG
    # a handler on it: the next default-ignored one
    assert ignored_marker({signal.SIGURG: HANDLER}, set()) == signal.SIGWINCH
    # pending somewhere: not that one (a second instance would be dropped)
    assert ignored_marker({}, {signal.SIGURG, signal.SIGWINCH}) == signal.SIGCHLD
    # handlers on all three: a signal set to SIG_IGN, but never a job-control one
    handlers = {signal.SIGURG: HANDLER, signal.SIGWINCH: HANDLER, signal.SIGCHLD: HANDLER,
                signal.SIGCONT: SIG_IGN, signal.SIGTSTP: SIG_IGN, signal.SIGUSR2: SIG_IGN}  # fmt: skip
    assert ignored_marker(handlers, set()) == signal.SIGUSR2
    # none ignored: 0 (one injected syscall at a time)
    del handlers[signal.SIGUSR2]
    assert ignored_marker(handlers, set()) == 0


def test_dump_marker_prefers_one_no_thread_blocks():
    blocked = bit(signal.SIGURG)
    assert ignored_marker({}, set(), blocked) == signal.SIGWINCH
    every = bit(signal.SIGURG) | bit(signal.SIGWINCH) | bit(signal.SIGCHLD)
    assert ignored_marker({}, set(), every) == signal.SIGURG  # blocked: parked first


def test_restore_marker_avoids_the_threads_pending_signals():
    assert program.marker_for(set()) == signal.SIGTRAP
    assert program.marker_for({signal.SIGTRAP}) == signal.SIGILL
    assert program.marker_for(set(program.RESTORE_MARKERS)) == 0


class _Tracee:
    def __init__(self, pid: int):
        self.pid = pid


class _Area:
    """Enough of program.Area for recording (no process)."""

    def __init__(self):
        self.stored = {}

    def alloc(self, size: int, align: int = 8) -> int:
        return 0x10000

    def store(self, addr: int, data: bytes) -> None:
        self.stored[addr] = data


def _program(pid: int, results: list[int | None]) -> program.Program:
    p = program.Program(_Area(), _Tracee(pid), {})
    p.results = results
    return p


def test_a_failed_call_is_raised_as_straight_code_raises_it():
    p = _program(42, [0, -errno.EPERM, None])
    p.call_nr(105, 0, name="setuid")
    p.call_nr(117, 1, 1, 1, name="setresuid")
    p.call_nr(126, 0, name="capset")
    with pytest.raises(RemoteError) as got:
        p.raise_first()
    assert got.value.errno == errno.EPERM
    assert str(got.value) == "[Errno 1] setresuid in process 42 failed: Operation not permitted"
    # raw calls may fail (best effort): not raised
    q = _program(42, [-errno.EINVAL, 0])
    q.raw(28, 0, 4096, 14)
    q.call_nr(10, 0, 4096, 1, name="mprotect")
    q.raise_first()


def test_a_failed_call_with_its_own_words():
    p = _program(7, [-errno.EEXIST])
    p.call(435, 0, 88, name="clone3", fail=lambda exc: RestoreError(f"TID in use ({exc.errno})"))
    with pytest.raises(RestoreError, match=r"TID in use \(17\)") as got:
        p.raise_first()
    assert isinstance(got.value.__cause__, RemoteError)


class _Recording:
    """Enough of program.Recording for same_as."""

    def __init__(self, calls):
        self.calls = calls
        self.tracee = _Tracee(100)


def test_a_copy_answers_as_the_first_thread_did():
    rec = _Recording([(119, (1, 1, 1), True, "setresgid", 0, b""),
                      (122, (-1,), False, "setfsuid", 0, b"")])  # fmt: skip
    program.same_as(rec, _program(101, [0, 0]))
    with pytest.raises(RemoteError) as got:
        program.same_as(rec, _program(102, [-errno.EPERM, None]))
    assert str(got.value) == "[Errno 1] setresgid in process 102 failed: Operation not permitted"
    with pytest.raises(RemoteError) as got:
        program.same_as(rec, _program(103, [0, 65534]))
    assert got.value.errno == errno.EPROTO
    assert "setfsuid in process 103 returned 65534, not 0 as in thread 100" in str(got.value)
